//! Envoy's x-forwarded-client-cert values. The logic is `warden_fuzz::xfcc` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::xfcc(data));
