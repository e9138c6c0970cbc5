//! The store behind the service. SQLite is the embedded default; a shared store for many
//! proxies and replicas implements the same trait.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use warden_core::profile::Profile;
use warden_core::session::BeginError;
use warden_core::wire::{AppendResult, BeginOutcome, BeginResponse, BeginStep, RevocationFeed, SessionSummary, SessionView, StepRecord};
use warden_log::{InclusionProof, LeafProof, LogSigner};

/// A store only fails as a backend: what a client could get wrong is refused before the store
/// is called (see `Store`).
#[derive(Debug)]
pub enum StoreError {
    /// The store failed; the message is for the log, not for clients.
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
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

/// What a store call returns: the store's work happens off the async runtime (the SQLite store
/// hands writes to its writer thread and reads to blocking threads), the handler awaits it.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store's own counters for `/metrics`: (name, help, value).
pub type StoreCounter = (&'static str, &'static str, u64);

/// Every request reaching a store has been validated at the API edge (`crate::validate`:
/// session ids, field lengths, batch sizes, record actions): a store checks none of it, and a
/// new store inherits those checks instead of having to repeat them.
pub trait Store: Send + Sync + 'static {
    /// Atomically: create the session if new and bind it to the subject, refuse another subject
    /// or a revoked session (recording an audit event), count the step, merge what was seen.
    /// Resolves once the step is durably stored.
    fn begin_step(&self, req: BeginStep, now_ms: u64) -> StoreFuture<'_, BeginResponse>;
    /// Append attribution records to their sessions' hash chains, atomically per session (SQLite:
    /// the whole batch at once; Redis: each session's records at once, so a failed batch may
    /// leave some sessions' records stored, which its retry counts as duplicates); a record
    /// already stored (same session, step and decision id) is counted as a duplicate.
    fn append(&self, records: Vec<StepRecord>, now_ms: u64) -> StoreFuture<'_, AppendResult>;
    fn session(&self, id: String) -> StoreFuture<'_, Option<SessionView>>;
    fn search(&self, q: Search) -> StoreFuture<'_, Vec<SessionSummary>>;
    /// Revoke a session (a session not seen yet is created revoked). True if it was not revoked before.
    fn revoke(&self, id: String, reason: String, now_ms: u64) -> StoreFuture<'_, bool>;
    fn revocations(&self, after: u64, limit: usize) -> StoreFuture<'_, RevocationFeed>;
    /// A subject's behavioural profile (`warden_core::profile`): begin-step must hand it out with
    /// the step's snapshot (`SessionState::profile`), and append must update it with
    /// `Profile::observe` for every record it appends, in the record's transaction.
    fn profile(&self, subject: String) -> StoreFuture<'_, Option<Profile>>;
    /// Forget a subject's profile (it is learned again). True if there was one.
    fn reset_profile(&self, subject: String) -> StoreFuture<'_, bool>;
    /// The append-only log over every record (`warden_log`). `append` must enter each new
    /// record into it as its next leaf, in the record's transaction.
    /// Sign a checkpoint of the log as it is now unless the latest covers it; refuse (an error)
    /// when the log no longer extends the latest checkpoint. Returns (tree size, signed note).
    fn log_checkpoint(&self, signer: Arc<LogSigner>, now_ms: u64) -> StoreFuture<'_, (u64, String)>;
    fn log_latest(&self) -> StoreFuture<'_, Option<(u64, String)>>;
    /// `None` when `to` is beyond the log or `from` > `to`.
    fn log_consistency(&self, from: u64, to: u64) -> StoreFuture<'_, Option<Vec<String>>>;
    /// `None` when the record is not among the first `tree_size` leaves.
    fn log_inclusion(&self, session_id: String, seq: u64, tree_size: u64) -> StoreFuture<'_, Option<InclusionProof>>;
    /// The session's leaves among the first `tree_size`, in sequence order, with their proofs.
    fn log_session(&self, session_id: String, tree_size: u64) -> StoreFuture<'_, Vec<LeafProof>>;
    /// Counters the store keeps about itself (none by default).
    fn counters(&self) -> Vec<StoreCounter> {
        Vec::new()
    }
    /// Whether the store answers now (`/readyz`): resolves with an error when it does not.
    fn ready(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// More of `/metrics` in Prometheus text (histograms, gauges), after the counters.
    fn metrics_text(&self) -> String {
        String::new()
    }
}

/// A refused begin-step as every store answers and audits it: (outcome, audit kind, detail).
pub fn refusal(why: BeginError, bound_to: &str, presented_by: &str) -> (BeginOutcome, &'static str, String) {
    match why {
        BeginError::Revoked => (BeginOutcome::Revoked, "revoked_session_used", "a revoked session was presented".to_string()),
        BeginError::SubjectMismatch => {
            (BeginOutcome::SubjectMismatch, "subject_mismatch", format!("session bound to {bound_to:?} presented by {presented_by:?}"))
        }
    }
}

/// The reason a session revoked by an enforced `terminate` decision is given.
pub fn terminate_reason(r: &StepRecord) -> String {
    format!("terminated by policy: {}", r.reasons.join(","))
}
