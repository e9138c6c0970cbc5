//! The plugin configuration: parse, validate, load keys, compile the policy. The logic is `warden_fuzz::config` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::config(data));
