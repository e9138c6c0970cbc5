//! What the proxy sends out of its own accord, on the root tick: attribution records and
//! revocation polls to the session-state service (`state.rs`), JWKS fetches (`jwks.rs`). Both
//! talk through `Host::http_call` and are answered by the call's token, so their batching,
//! retries and back-off are tested natively with `FakeHost`.

pub mod jwks;
pub mod state;

/// A call's answer: its status and body, or `None` when the call failed (no cluster, refused
/// connection, timeout, reset).
pub type Answer = Option<(String, Vec<u8>)>;
