//! Identification (JWT, API key, SPIFFE via mTLS or trusted XFCC) from arbitrary headers. The logic is `warden_fuzz::identify` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::identify(data));
