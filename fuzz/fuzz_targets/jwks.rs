//! JWKS documents as fetched from a provider's jwks_uri. The logic is `warden_fuzz::jwks` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::jwks(data));
