//! The store behind the service. SQLite is the embedded default; a shared store for many
//! proxies and replicas implements the same trait.

use std::fmt;

use warden_core::wire::{AppendResult, BeginResponse, BeginStep, RevocationFeed, SessionSummary, SessionView, StepRecord};

#[derive(Debug)]
pub enum StoreError {
    /// The request is well-formed JSON but not acceptable (nothing was changed).
    Invalid(String),
    /// The store failed; the message is for the log, not for clients.
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(m) => write!(f, "invalid: {m}"),
            Self::Backend(m) => write!(f, "store failure: {m}"),
        }
    }
}

impl std::error::Error for StoreError {}

#[derive(Debug, Clone, Default)]
pub struct Search {
    pub subject: Option<String>,
    pub credential: Option<String>,
    pub workload: Option<String>,
    /// Sessions seen at or after this time (ms).
    pub since_ms: Option<u64>,
    /// Sessions started at or before this time (ms).
    pub until_ms: Option<u64>,
    pub limit: usize,
}

pub trait Store: Send + Sync + 'static {
    /// Atomically: create the session if new and bind it to the subject, refuse another subject
    /// or a revoked session (recording an audit event), count the step, merge what was seen.
    fn begin_step(&self, req: &BeginStep, now_ms: u64) -> Result<BeginResponse, StoreError>;
    /// Append attribution records to their sessions' hash chains, all or nothing; a record
    /// already stored (same session, step and decision id) is counted as a duplicate.
    fn append(&self, records: &[StepRecord], now_ms: u64) -> Result<AppendResult, StoreError>;
    fn session(&self, id: &str) -> Result<Option<SessionView>, StoreError>;
    fn search(&self, q: &Search) -> Result<Vec<SessionSummary>, StoreError>;
    /// Revoke a session (a session not seen yet is created revoked). True if it was not revoked before.
    fn revoke(&self, id: &str, reason: &str, now_ms: u64) -> Result<bool, StoreError>;
    fn revocations(&self, after: u64, limit: usize) -> Result<RevocationFeed, StoreError>;
}
