//! Session resolution from session headers and token claims. The logic is `warden_fuzz::session` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::session(data));
