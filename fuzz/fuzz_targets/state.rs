//! The state service's request bodies (begin-step, record batches) and their validation. The logic is `warden_fuzz::state` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::state(data));
