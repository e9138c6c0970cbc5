//! Request paths and their canonical form. The logic is `warden_fuzz::path` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::path(data));
