//! The embedded SQLite store: WAL, schema migrations by `user_version`, group commit.
//!
//! Writes (begin-steps, record batches, revocations) go through the group-commit writer
//! (`writer`): operations waiting together share one transaction, each is answered only once it
//! has committed, and each stays atomic and isolated from its group, so step numbers and hash
//! chains are exactly those of one transaction per request. Requests that fail validation, the
//! 4xx, never reach the writer. Reads (`session`, `search`, `revocations`) use separate
//! read-only connections on blocking threads; an in-memory store has a single connection and
//! reads through the writer.
//!
//! Durability: `journal_mode=WAL`, `synchronous=NORMAL`. A reply means its transaction is in the
//! WAL: it survives the service crashing or being killed. After a power loss or an OS crash the
//! last transactions before it may be lost (the database stays consistent); in this mode SQLite
//! only fsyncs at checkpoints.
//!
//! The layers, each in its own file: `schema` (the database's shape and connection settings),
//! `writer` (group commit and read connections, blind to what is stored), `queries` (what a
//! session, its trail and revocations are in SQL) and here the `Store` they make together.

mod log;
mod profiles;
mod queries;
mod schema;
mod writer;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rusqlite::Connection;
use warden_core::profile::Profile;
use warden_core::wire::{AppendResult, BeginResponse, BeginStep, RevocationFeed, SessionSummary, SessionView, StepRecord};
use warden_log::{InclusionProof, LeafProof, LogSigner};

pub use queries::chain_hash;
use queries::{append_in, begin_in, revocations_in, revoke_in, search_in, session_in};
use writer::{Readers, WriteQueue};

use crate::store::{Search, Store, StoreCounter, StoreError, StoreFuture};

pub struct SqliteStore {
    writes: WriteQueue,
    /// `None` for an in-memory database: reads go through the writer's connection.
    readers: Option<Arc<Readers>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        Self::init(conn, Some(Arc::new(Readers::new(path))))
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(backend)?, None)
    }

    fn init(mut conn: Connection, readers: Option<Arc<Readers>>) -> Result<Self, StoreError> {
        schema::pragmas(&conn)?;
        schema::migrate(&mut conn)?;
        // Hot statements are prepared once and reused (begin, append, load, save, transaction control).
        conn.set_prepared_statement_cache_capacity(32);
        Ok(Self { writes: WriteQueue::start(conn)?, readers })
    }

    /// Weight: one per begin-step or revocation, one per record of a batch (a group's
    /// transaction is bounded by its writes' weight).
    fn write<T: Send + 'static>(&self, weight: usize, f: impl Fn(&Connection) -> Result<T, StoreError> + Send + 'static) -> StoreFuture<'static, T> {
        self.writes.write(weight, f)
    }

    /// Run `f` on a read connection in a read transaction, on a blocking thread.
    fn read<T: Send + 'static>(&self, f: impl Fn(&Connection) -> Result<T, StoreError> + Send + 'static) -> StoreFuture<'static, T> {
        match &self.readers {
            None => self.write(1, f),
            Some(readers) => {
                let readers = readers.clone();
                Box::pin(async move { tokio::task::spawn_blocking(move || readers.run(f)).await.map_err(backend)? })
            }
        }
    }
}


impl Store for SqliteStore {
    fn begin_step(&self, req: BeginStep, now_ms: u64) -> StoreFuture<'_, BeginResponse> {
        self.write(1, move |conn| begin_in(conn, &req, now_ms))
    }

    fn append(&self, batch: Vec<StepRecord>, now_ms: u64) -> StoreFuture<'_, AppendResult> {
        self.write(batch.len(), move |conn| append_in(conn, &batch, now_ms))
    }

    fn session(&self, id: String) -> StoreFuture<'_, Option<SessionView>> {
        self.read(move |conn| session_in(conn, &id))
    }

    fn search(&self, q: Search) -> StoreFuture<'_, Vec<SessionSummary>> {
        self.read(move |conn| search_in(conn, &q))
    }

    fn revoke(&self, id: String, reason: String, now_ms: u64) -> StoreFuture<'_, bool> {
        self.write(1, move |conn| revoke_in(conn, &id, &reason, now_ms))
    }

    fn revocations(&self, after: u64, limit: usize) -> StoreFuture<'_, RevocationFeed> {
        self.read(move |conn| revocations_in(conn, after, limit))
    }

    fn profile(&self, subject: String) -> StoreFuture<'_, Option<Profile>> {
        self.read(move |conn| profiles::load(conn, &subject))
    }

    fn reset_profile(&self, subject: String) -> StoreFuture<'_, bool> {
        self.write(1, move |conn| profiles::reset(conn, &subject))
    }

    fn log_checkpoint(&self, signer: Arc<LogSigner>, now_ms: u64) -> StoreFuture<'_, (u64, String)> {
        self.write(1, move |conn| log::checkpoint_in(conn, &signer, now_ms))
    }

    fn log_latest(&self) -> StoreFuture<'_, Option<(u64, String)>> {
        self.read(log::latest_in)
    }

    fn log_consistency(&self, from: u64, to: u64) -> StoreFuture<'_, Option<Vec<String>>> {
        self.read(move |conn| log::consistency_in(conn, from, to))
    }

    fn log_inclusion(&self, session_id: String, seq: u64, tree_size: u64) -> StoreFuture<'_, Option<InclusionProof>> {
        self.read(move |conn| log::inclusion_in(conn, &session_id, seq, tree_size))
    }

    fn log_session(&self, session_id: String, tree_size: u64) -> StoreFuture<'_, Vec<LeafProof>> {
        self.read(move |conn| log::session_leaves_in(conn, &session_id, tree_size))
    }

    fn ready(&self) -> StoreFuture<'_, ()> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(backend))
    }

    fn counters(&self) -> Vec<StoreCounter> {
        let s = self.writes.stats();
        vec![
            ("warden_state_store_commits_total", "SQLite write transactions committed (each carries a group of writes)", s.commits.load(Ordering::Relaxed)),
            ("warden_state_store_writes_total", "Writes (begin-steps, record batches, revocations) committed in those transactions", s.writes.load(Ordering::Relaxed)),
            ("warden_state_store_failed_transactions_total", "Write transactions that failed as a whole (their writes got a store error)", s.failed_groups.load(Ordering::Relaxed)),
        ]
    }
}
