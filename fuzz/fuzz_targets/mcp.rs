//! MCP JSON-RPC request bodies, single and batched. The logic is `warden_fuzz::mcp` (src/lib.rs), replayed by tests/replay.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_fuzz::mcp(data));
