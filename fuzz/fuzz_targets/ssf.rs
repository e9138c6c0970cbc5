//! Security Event Tokens at the state service's SSF receiver: arbitrary tokens, and arbitrary claims signed as a SET by the transmitter's key. The logic is `warden_fuzz::ssf` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::ssf(data));
