//! The whole request flow (Warden::on_request and resume) on arbitrary headers and body. The logic is `warden_fuzz::request` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::request(data));
