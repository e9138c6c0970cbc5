//! JWT verification: arbitrary tokens, and arbitrary claims signed with the test HS256 key. The logic is `warden_fuzz::jwt` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::jwt(data));
