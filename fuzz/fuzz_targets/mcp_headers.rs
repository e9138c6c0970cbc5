//! MCP 2026-07-28 requests: routing headers and a body, decided on the headers and then held to them. The logic is `warden_fuzz::mcp_headers` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::mcp_headers(data));
