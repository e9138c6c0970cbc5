//! The embedded SQLite store: WAL, schema migrations by `user_version`, group commit.
//!
//! Writes (begin-steps, record batches, revocations) go to one writer thread that owns the only
//! writing connection. It takes every operation waiting in its queue (up to a bound) and commits
//! them in one transaction: one WAL commit (and its page writes) is shared by the group instead
//! of paid per request. Replies are sent only after that transaction has committed, so a caller
//! never sees a result that is not stored. Operations run one after the other, in arrival
//! order, on one connection: each sees everything queued before it, so step numbers and hash
//! chains are exactly those of one transaction per operation. Each operation stays atomic and
//! isolated from its group: if one fails, the group is rolled back and run again with a
//! savepoint per operation, and only the failed one is rolled back (requests that fail
//! validation, the 4xx, never reach the writer). Reads (`session`, `search`, `revocations`)
//! use separate read-only connections on blocking threads (WAL readers see the last commit and
//! never wait for the writer); an in-memory store has a single connection and reads through the
//! writer.
//!
//! Durability: `journal_mode=WAL`, `synchronous=NORMAL`. A reply means its transaction is in the
//! WAL: it survives the service crashing or being killed. After a power loss or an OS crash the
//! last transactions before it may be lost (the database stays consistent); in this mode SQLite
//! only fsyncs at checkpoints.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;
use warden_core::session::{BeginError, SessionState};
use warden_core::trail::GENESIS;
use warden_core::wire::{
    AppendResult, AuditEvent, BeginOutcome, BeginResponse, BeginStep, Revocation, RevocationFeed, SessionSummary, SessionView, StepRecord,
    TrailEntry,
};

use crate::store::{Search, Store, StoreCounter, StoreError, StoreFuture};
use crate::validate;

/// Each entry moves the schema one version up; applied in order, once, in a transaction.
const MIGRATIONS: &[&str] = &[
    // 1: sessions, their hash-chained records, revocations, audit events.
    "CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,
        last_seen_at_ms INTEGER NOT NULL,
        steps INTEGER NOT NULL,
        state TEXT NOT NULL,
        revoked_at_ms INTEGER,
        revoke_reason TEXT,
        records INTEGER NOT NULL DEFAULT 0,
        head_hash TEXT NOT NULL
     );
     CREATE INDEX sessions_subject ON sessions(subject, started_at_ms);
     CREATE INDEX sessions_last_seen ON sessions(last_seen_at_ms);
     CREATE TABLE records (
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        step INTEGER NOT NULL,
        decision_id TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        credential TEXT,
        workload TEXT,
        body TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (session_id, seq),
        UNIQUE (session_id, step, decision_id)
     );
     CREATE INDEX records_credential ON records(credential);
     CREATE INDEX records_workload ON records(workload);
     CREATE TABLE revocations (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        reason TEXT NOT NULL
     );
     CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        credential TEXT,
        detail TEXT NOT NULL
     );
     CREATE INDEX audit_session ON audit(session_id, id);",
    // 2: which subjects presented which credential (credential sharing across sessions).
    "CREATE TABLE credential_subjects (
        credential TEXT NOT NULL,
        subject TEXT NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        PRIMARY KEY (credential, subject)
     );",
    // 3: no query ever used sessions_last_seen (search filters on last_seen_at_ms by scanning),
    // yet every step rewrote its entry. A begin-step lists a credential's first subjects in
    // order: from an index, without sorting them on every step.
    "DROP INDEX IF EXISTS sessions_last_seen;
     CREATE INDEX credential_subjects_first_seen ON credential_subjects(credential, first_seen_ms, subject);",
];

/// A group's transaction takes operations until their weight (one per begin-step, revocation or
/// read, one per record of a batch) reaches this; the rest waits for the next group.
const MAX_GROUP_WEIGHT: usize = 4096;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 4;

pub struct SqliteStore {
    /// `None` only while dropping (closing the queue stops the writer).
    queue: Option<mpsc::Sender<Box<dyn Op>>>,
    writer: Option<JoinHandle<()>>,
    /// `None` for an in-memory database: reads go through the writer's connection.
    readers: Option<Arc<Readers>>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    commits: AtomicU64,
    writes: AtomicU64,
    failed_groups: AtomicU64,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(backend)?;
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::Backend(format!(
            "the database has schema version {version}, newer than this warden-state knows ({}): upgrade warden-state",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(backend)?;
        tx.execute_batch(sql).map_err(|e| StoreError::Backend(format!("migration {}: {e}", i + 1)))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(backend)?;
        tx.commit().map_err(backend)?;
    }
    Ok(())
}

/// The writer's connection. WAL: readers never block the writer; NORMAL sync is durable across
/// process crashes (see the module's documentation).
fn pragmas(conn: &Connection) -> Result<(), StoreError> {
    conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(backend)?;
    connection_pragmas(conn)
}

/// Every connection, the readers' too.
fn connection_pragmas(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
    // Query-planner stability: a cached statement keeps its plan whatever is bound to it. Without
    // it (the bundled SQLite has STAT4), statements whose plan looked at a bound value are
    // recompiled on every use, which was a tenth of the writer's time.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(backend)?;
    // Savepoint sub-journals (and temporary sort b-trees) in memory: a record batch's savepoint
    // otherwise spills its journal to a temporary file past 64 KiB.
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(backend)?;
    Ok(())
}

/// `warden_core::trail::chain_hash`, with a SHA-256 that uses the CPU's SHA extensions when it
/// has them (the chain hash was a sixth of the writer's time on a record batch).
pub fn chain_hash(prev_hash: &str, body: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    warden_core::hash::hex(&h.finalize())
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        let readers = Readers { path: path.to_path_buf(), idle: Mutex::new(Vec::new()) };
        Self::init(conn, Some(Arc::new(readers)))
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(backend)?, None)
    }

    fn init(mut conn: Connection, readers: Option<Arc<Readers>>) -> Result<Self, StoreError> {
        pragmas(&conn)?;
        migrate(&mut conn)?;
        // Hot statements are prepared once and reused (begin, append, load, save, transaction control).
        conn.set_prepared_statement_cache_capacity(32);
        let stats = Arc::new(Stats::default());
        let (queue, rx) = mpsc::channel();
        let writer = Writer { conn, rx, stats: stats.clone() };
        let writer = std::thread::Builder::new()
            .name("warden-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Backend(format!("cannot start the store's writer thread: {e}")))?;
        Ok(Self { queue: Some(queue), writer: Some(writer), readers, stats })
    }

    /// Queue `f` for the writer; resolves with its result once its group has committed. `f` may
    /// run twice (see `Writer::commit`): it must depend only on what it captured and the database.
    fn write<T: Send + 'static>(&self, weight: usize, f: impl Fn(&Connection) -> Result<T, StoreError> + Send + 'static) -> StoreFuture<'static, T> {
        let (tx, rx) = oneshot::channel();
        let op: Box<dyn Op> = Box::new(Pending { weight: weight.max(1), f, result: None, tx });
        let queued = self.queue.as_ref().map(|q| q.send(op).is_ok()).unwrap_or(false);
        Box::pin(async move {
            if !queued {
                return Err(StoreError::Backend("the store's writer has stopped".into()));
            }
            // A dropped sender: the writer gave up on the group (its error is in the log).
            rx.await.map_err(|_| StoreError::Backend("the store's writer failed the transaction; see the log".into()))?
        })
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

impl Drop for SqliteStore {
    /// Close the queue; the writer commits what is queued, then stops.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(w) = self.writer.take() {
            if w.join().is_err() {
                log::error!("the store's writer thread panicked");
            }
        }
    }
}

/// Read connections to the database file, opened on demand and kept for reuse.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    fn run<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
        let conn = match idle {
            Some(c) => c,
            None => {
                let c = Connection::open(&self.path).map_err(backend)?;
                connection_pragmas(&c)?;
                c.pragma_update(None, "query_only", "ON").map_err(backend)?;
                c
            }
        };
        let result = {
            // One snapshot for every query of the call.
            let tx = conn.unchecked_transaction().map_err(backend)?;
            f(&tx)
        };
        if let Ok(mut v) = self.idle.lock() {
            if v.len() < MAX_IDLE_READERS {
                v.push(conn);
            }
        }
        result
    }
}

/// One operation queued for the writer.
trait Op: Send {
    /// One per begin-step, revocation or read; one per record of a batch.
    fn weight(&self) -> usize;
    /// Run on the writer's connection, inside the group's transaction; keep the result (a later
    /// run replaces it). False if it failed: the changes it made must be rolled back.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Send the kept result once the group's transaction has committed, or the group's error.
    fn reply(self: Box<Self>, committed: Result<(), &str>);
}

struct Pending<T, F> {
    weight: usize,
    f: F,
    result: Option<Result<T, StoreError>>,
    tx: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send, F: Fn(&Connection) -> Result<T, StoreError> + Send> Op for Pending<T, F> {
    fn weight(&self) -> usize {
        self.weight
    }

    fn run(&mut self, conn: &Connection) -> bool {
        let result = (self.f)(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn reply(self: Box<Self>, committed: Result<(), &str>) {
        let result = match (self.result, committed) {
            (None, _) => Err(StoreError::Backend("the operation did not run".into())),
            (Some(result), Ok(())) => result,
            // An operation that failed by itself keeps its own error.
            (Some(result), Err(e)) => result.and(Err(StoreError::Backend(format!("the transaction did not commit: {e}")))),
        };
        // The caller may have gone (client disconnected): what committed stays committed.
        let _ = self.tx.send(result);
    }
}

struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Box<dyn Op>>,
    stats: Arc<Stats>,
}

fn exec(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

impl Writer {
    fn run(self) {
        // Until the store is dropped and the queue is empty.
        while let Ok(first) = self.rx.recv() {
            let mut weight = first.weight();
            let mut group = vec![first];
            // Everything that queued up while the previous group committed joins this one.
            while weight < MAX_GROUP_WEIGHT {
                match self.rx.try_recv() {
                    Ok(op) => {
                        weight += op.weight();
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit(group);
        }
    }

    /// One transaction for the group; replies after the commit. First every operation runs
    /// straight in the transaction. If one fails, that transaction is rolled back and the group
    /// is run again with a savepoint per operation, so the failed one is rolled back alone
    /// (operations are deterministic given the database, so the others do the same again).
    /// When the transaction itself fails, every operation of the group gets an error and
    /// nothing of it is stored.
    fn commit(&self, mut group: Vec<Box<dyn Op>>) {
        let conn = &self.conn;
        let outcome = match self.attempt(&mut group, false) {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.rollback();
                self.attempt(&mut group, true).map(|_| ())
            }
            Err(e) => Err(e),
        };
        let outcome = outcome.and_then(|()| exec(conn, "COMMIT").map_err(|e| format!("commit: {e}")));
        match outcome {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.writes.fetch_add(group.len() as u64, Ordering::Relaxed);
                for op in group {
                    op.reply(Ok(()));
                }
            }
            Err(e) => {
                self.stats.failed_groups.fetch_add(1, Ordering::Relaxed);
                log::error!("store transaction failed, none of its {} operations is stored: {e}", group.len());
                self.rollback();
                for op in group {
                    op.reply(Err(&e));
                }
            }
        }
    }

    /// Begin a transaction and run the group in it. Without savepoints, stop at the first
    /// failed operation and return false (the transaction is left open for the caller to roll
    /// back); with them, roll each failed operation back alone. An error is the transaction's.
    fn attempt(&self, group: &mut [Box<dyn Op>], savepoints: bool) -> Result<bool, String> {
        let conn = &self.conn;
        exec(conn, "BEGIN IMMEDIATE").map_err(|e| format!("begin: {e}"))?;
        for op in group.iter_mut() {
            if savepoints {
                exec(conn, "SAVEPOINT op").map_err(|e| format!("savepoint: {e}"))?;
            }
            let ok = op.run(conn);
            if conn.is_autocommit() {
                // SQLite rolled the whole transaction back (I/O error, disk full, …).
                return Err("the transaction was rolled back by SQLite".into());
            }
            match (ok, savepoints) {
                (true, false) => {}
                (false, false) => return Ok(false),
                (true, true) => exec(conn, "RELEASE op").map_err(|e| format!("release: {e}"))?,
                (false, true) => exec(conn, "ROLLBACK TO op")
                    .and_then(|()| exec(conn, "RELEASE op"))
                    .map_err(|e| format!("rollback to savepoint: {e}"))?,
            }
        }
        Ok(true)
    }

    fn rollback(&self) {
        if !self.conn.is_autocommit() {
            if let Err(e) = exec(&self.conn, "ROLLBACK") {
                log::error!("store rollback failed: {e}");
            }
        }
    }
}

struct Row {
    /// `revoked` set from the row's `revoked_at_ms`, which is what says it.
    state: SessionState,
    records: u64,
    head: String,
}

fn load(conn: &Connection, id: &str) -> Result<Option<Row>, StoreError> {
    conn.prepare_cached("SELECT state, revoked_at_ms IS NOT NULL, records, head_hash FROM sessions WHERE id = ?1")
        .map_err(backend)?
        .query_row(params![id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?)))
        .optional()
        .map_err(backend)?
        .map(|(state, revoked, records, head)| {
            let mut state: SessionState = serde_json::from_str(&state).map_err(backend)?;
            state.revoked = revoked;
            Ok(Row { state, records: records as u64, head })
        })
        .transpose()
}

fn save(conn: &Connection, id: &str, s: &SessionState, records: u64, head: &str) -> Result<(), StoreError> {
    let state = serde_json::to_string(s).map_err(backend)?;
    conn.prepare_cached(
        "INSERT INTO sessions (id, subject, started_at_ms, last_seen_at_ms, steps, state, records, head_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(id) DO UPDATE SET last_seen_at_ms = ?4, steps = ?5, state = ?6, records = ?7, head_hash = ?8",
    )
    .map_err(backend)?
    .execute(params![id, s.subject, s.started_at_ms as i64, s.last_seen_at_ms as i64, s.steps as i64, state, records as i64, head])
    .map_err(backend)?;
    Ok(())
}

fn audit(conn: &Connection, id: &str, now_ms: u64, kind: &str, subject: &str, credential: Option<&str>, detail: &str) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO audit (session_id, at_ms, kind, subject, credential, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        .map_err(backend)?
        .execute(params![id, now_ms as i64, kind, subject, credential, detail])
        .map_err(backend)?;
    Ok(())
}

/// Remember that `subject` presented `credential`.
fn credential_seen(conn: &Connection, credential: &str, subject: &str, now_ms: u64) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT OR IGNORE INTO credential_subjects (credential, subject, first_seen_ms) VALUES (?1, ?2, ?3)")
        .map_err(backend)?
        .execute(params![credential, subject, now_ms as i64])
        .map_err(backend)?;
    Ok(())
}

/// The first subjects that presented a credential.
const CREDENTIAL_SUBJECTS: &str = "SELECT subject FROM credential_subjects WHERE credential = ?1 ORDER BY first_seen_ms LIMIT 16";

/// Remember that `subject` presented `credential`; return every subject that has (bounded).
fn credential_subjects(conn: &Connection, credential: Option<&str>, subject: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
    let Some(cred) = credential else { return Ok(Vec::new()) };
    let list = |conn: &Connection| -> Result<Vec<String>, StoreError> {
        let mut stmt = conn.prepare_cached(CREDENTIAL_SUBJECTS).map_err(backend)?;
        let rows = stmt.query_map(params![cred], |r| r.get::<_, String>(0)).map_err(backend)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend)
    };
    // Usually the subject has presented this credential before: then nothing is inserted.
    let known = list(conn)?;
    if known.iter().any(|s| s == subject) {
        return Ok(known);
    }
    credential_seen(conn, cred, subject, now_ms)?;
    list(conn)
}

fn revoke_in(conn: &Connection, id: &str, reason: &str, now_ms: u64) -> Result<bool, StoreError> {
    if load(conn, id)?.is_none() {
        // Revoking a session no proxy has reported yet: it must never start.
        save(conn, id, &SessionState::open("", &[], now_ms), 0, GENESIS)?;
    }
    let changed = conn
        .prepare_cached("UPDATE sessions SET revoked_at_ms = ?2, revoke_reason = ?3 WHERE id = ?1 AND revoked_at_ms IS NULL")
        .map_err(backend)?
        .execute(params![id, now_ms as i64, reason])
        .map_err(backend)?;
    if changed > 0 {
        conn.prepare_cached("INSERT INTO revocations (session_id, at_ms, reason) VALUES (?1, ?2, ?3)")
            .map_err(backend)?
            .execute(params![id, now_ms as i64, reason])
            .map_err(backend)?;
    }
    Ok(changed > 0)
}

fn begin_in(conn: &Connection, req: &BeginStep, now_ms: u64) -> Result<BeginResponse, StoreError> {
    let (mut state, records, head, is_new) = match load(conn, &req.session_id)? {
        Some(row) => (row.state, row.records, row.head, false),
        None => (SessionState::open(&req.subject, &req.scopes, now_ms), 0, GENESIS.to_string(), true),
    };
    let stored_steps = state.steps;
    if let Some(known) = req.known_steps {
        state.steps = state.steps.max(known);
    }
    let mut before = match state.begin_step(&req.subject, &req.seen(), now_ms) {
        Ok(before) => before,
        Err(why) => {
            // A refused step answers with the session as stored: the proxy's count is only
            // taken into a step that is counted.
            state.steps = stored_steps;
            let (outcome, kind, detail) = match why {
                BeginError::Revoked => (BeginOutcome::Revoked, "revoked_session_used", "a revoked session was presented".to_string()),
                BeginError::SubjectMismatch => (
                    BeginOutcome::SubjectMismatch,
                    "subject_mismatch",
                    format!("session bound to {:?} presented by {:?}", state.subject, req.subject),
                ),
            };
            audit(conn, &req.session_id, now_ms, kind, &req.subject, req.credential.as_deref(), &detail)?;
            return Ok(BeginResponse { outcome, step: 0, new: false, session: state });
        }
    };
    before.credential_subjects = credential_subjects(conn, req.credential.as_deref(), &req.subject, now_ms)?;
    save(conn, &req.session_id, &state, records, &head)?;
    Ok(BeginResponse { outcome: BeginOutcome::Ok, step: state.steps, new: is_new, session: before })
}

fn append_in(conn: &Connection, batch: &[StepRecord], now_ms: u64) -> Result<AppendResult, StoreError> {
    let (mut appended, mut duplicates) = (0, 0);
    // The session being appended to, saved when the batch moves to another session, before a
    // revocation and at the end: a batch's records of one session load and save its row once.
    let mut open: Option<(&str, Row)> = None;
    // The last (credential, subject) pair remembered, so a batch's records do not repeat it.
    let mut seen: Option<(&str, &str)> = None;
    for r in batch {
        let exists: Option<i64> = conn
            .prepare_cached("SELECT seq FROM records WHERE session_id = ?1 AND step = ?2 AND decision_id = ?3")
            .map_err(backend)?
            .query_row(params![r.session_id, r.step as i64, r.decision_id], |row| row.get(0))
            .optional()
            .map_err(backend)?;
        if exists.is_some() {
            duplicates += 1;
            continue;
        }
        let mut row = match open.take() {
            Some((id, row)) if id == r.session_id => row,
            other => {
                if let Some((id, row)) = other {
                    save(conn, id, &row.state, row.records, &row.head)?;
                }
                // In cached or degraded mode the trail may be the first the service hears of a session.
                load(conn, &r.session_id)?.unwrap_or_else(|| Row {
                    state: SessionState::open(&r.subject, &[], r.at_ms),
                    records: 0,
                    head: GENESIS.to_string(),
                })
            }
        };
        let body = serde_json::to_string(r).map_err(backend)?;
        let seq = row.records + 1;
        let hash = chain_hash(&row.head, &body);
        conn.prepare_cached(
            "INSERT INTO records (session_id, seq, step, decision_id, at_ms, credential, workload, body, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(backend)?
        .execute(params![r.session_id, seq as i64, r.step as i64, r.decision_id, r.at_ms as i64, r.credential, r.workload, body, row.head, hash])
        .map_err(backend)?;
        row.state.apply_record(r);
        row.records = seq;
        row.head = hash;
        if let Some(cred) = r.credential.as_deref() {
            if seen != Some((cred, r.subject.as_str())) {
                credential_seen(conn, cred, &r.subject, r.at_ms)?;
                seen = Some((cred, r.subject.as_str()));
            }
        }
        if r.action == "terminate" && r.enforced {
            save(conn, &r.session_id, &row.state, row.records, &row.head)?;
            revoke_in(conn, &r.session_id, &format!("terminated by policy: {}", r.reasons.join(",")), now_ms)?;
        } else {
            open = Some((&r.session_id, row));
        }
        appended += 1;
    }
    if let Some((id, row)) = open {
        save(conn, id, &row.state, row.records, &row.head)?;
    }
    Ok(AppendResult { appended, duplicates })
}

fn session_in(conn: &Connection, id: &str) -> Result<Option<SessionView>, StoreError> {
    let Some(row) = load(conn, id)? else { return Ok(None) };
    let (revoked_at_ms, revoke_reason): (Option<i64>, Option<String>) = conn
        .prepare_cached("SELECT revoked_at_ms, revoke_reason FROM sessions WHERE id = ?1")
        .map_err(backend)?
        .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(backend)?;
    let mut timeline = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT seq, body, prev_hash, hash FROM records WHERE session_id = ?1 ORDER BY seq")
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?)))
            .map_err(backend)?;
        for row in rows {
            let (seq, body, prev_hash, hash) = row.map_err(backend)?;
            // A body that no longer parses is still shown (and fails verification), not hidden.
            let record = serde_json::from_str(&body).unwrap_or_default();
            timeline.push(TrailEntry { seq: seq as u64, record, body, prev_hash, hash });
        }
    }
    let mut audit = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT at_ms, kind, subject, credential, detail FROM audit WHERE session_id = ?1 ORDER BY id")
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![id], |r| {
                Ok(AuditEvent { at_ms: r.get::<_, i64>(0)? as u64, kind: r.get(1)?, subject: r.get(2)?, credential: r.get(3)?, detail: r.get(4)? })
            })
            .map_err(backend)?;
        for row in rows {
            audit.push(row.map_err(backend)?);
        }
    }
    Ok(Some(SessionView {
        id: id.to_string(),
        state: row.state,
        revoked_at_ms: revoked_at_ms.map(|v| v as u64),
        revoke_reason,
        timeline,
        audit,
    }))
}

/// The search's SQL and its parameters: only the filters given, so SQLite can use an index for
/// them (`subject` is served by `sessions_subject`, credential and workload by the records'
/// indexes).
fn search_sql(q: &Search) -> (String, Vec<(&'static str, rusqlite::types::Value)>) {
    use rusqlite::types::Value;
    let mut sql = String::from("SELECT id, subject, started_at_ms, last_seen_at_ms, steps, revoked_at_ms IS NOT NULL FROM sessions WHERE 1");
    let mut args = Vec::new();
    if let Some(v) = &q.subject {
        sql.push_str(" AND subject = :subject");
        args.push((":subject", Value::Text(v.clone())));
    }
    if let Some(v) = &q.credential {
        sql.push_str(" AND id IN (SELECT session_id FROM records WHERE credential = :credential)");
        args.push((":credential", Value::Text(v.clone())));
    }
    if let Some(v) = &q.workload {
        sql.push_str(" AND id IN (SELECT session_id FROM records WHERE workload = :workload)");
        args.push((":workload", Value::Text(v.clone())));
    }
    if let Some(v) = q.since_ms {
        sql.push_str(" AND last_seen_at_ms >= :since");
        args.push((":since", Value::Integer(v as i64)));
    }
    if let Some(v) = q.until_ms {
        sql.push_str(" AND started_at_ms <= :until");
        args.push((":until", Value::Integer(v as i64)));
    }
    sql.push_str(" ORDER BY started_at_ms DESC, id LIMIT :limit");
    args.push((":limit", Value::Integer(q.limit as i64)));
    (sql, args)
}

fn search_in(conn: &Connection, q: &Search) -> Result<Vec<SessionSummary>, StoreError> {
    let (sql, args) = search_sql(q);
    let args: Vec<(&str, &dyn rusqlite::ToSql)> = args.iter().map(|(k, v)| (*k, v as &dyn rusqlite::ToSql)).collect();
    let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
    let rows = stmt
        .query_map(args.as_slice(), |r| {
            Ok(SessionSummary {
                id: r.get(0)?,
                subject: r.get(1)?,
                started_at_ms: r.get::<_, i64>(2)? as u64,
                last_seen_at_ms: r.get::<_, i64>(3)? as u64,
                steps: r.get::<_, i64>(4)? as u64,
                revoked: r.get(5)?,
            })
        })
        .map_err(backend)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(backend)
}

fn revocations_in(conn: &Connection, after: u64, limit: usize) -> Result<RevocationFeed, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT cursor, session_id, at_ms, reason FROM revocations WHERE cursor > ?1 ORDER BY cursor LIMIT ?2")
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![after as i64, limit as i64], |r| {
            Ok(Revocation { cursor: r.get::<_, i64>(0)? as u64, session_id: r.get(1)?, at_ms: r.get::<_, i64>(2)? as u64, reason: r.get(3)? })
        })
        .map_err(backend)?;
    let revocations = rows.collect::<Result<Vec<_>, _>>().map_err(backend)?;
    let cursor = revocations.last().map(|r| r.cursor).unwrap_or(after);
    Ok(RevocationFeed { revocations, cursor })
}

fn ready<T: Send + 'static>(r: Result<T, StoreError>) -> StoreFuture<'static, T> {
    Box::pin(std::future::ready(r))
}

impl Store for SqliteStore {
    fn begin_step(&self, req: BeginStep, now_ms: u64) -> StoreFuture<'_, BeginResponse> {
        if let Err(e) = validate::begin(&req) {
            return ready(Err(e));
        }
        self.write(1, move |conn| begin_in(conn, &req, now_ms))
    }

    fn append(&self, batch: Vec<StepRecord>, now_ms: u64) -> StoreFuture<'_, AppendResult> {
        if let Err(e) = batch.iter().try_for_each(validate::record) {
            return ready(Err(e));
        }
        self.write(batch.len(), move |conn| append_in(conn, &batch, now_ms))
    }

    fn session(&self, id: String) -> StoreFuture<'_, Option<SessionView>> {
        self.read(move |conn| session_in(conn, &id))
    }

    fn search(&self, q: Search) -> StoreFuture<'_, Vec<SessionSummary>> {
        self.read(move |conn| search_in(conn, &q))
    }

    fn revoke(&self, id: String, reason: String, now_ms: u64) -> StoreFuture<'_, bool> {
        if let Err(e) = validate::session_id(&id) {
            return ready(Err(e));
        }
        self.write(1, move |conn| revoke_in(conn, &id, &reason, now_ms))
    }

    fn revocations(&self, after: u64, limit: usize) -> StoreFuture<'_, RevocationFeed> {
        self.read(move |conn| revocations_in(conn, after, limit))
    }

    fn counters(&self) -> Vec<StoreCounter> {
        let s = &self.stats;
        vec![
            ("warden_state_store_commits_total", "SQLite write transactions committed (each carries a group of writes)", s.commits.load(Ordering::Relaxed)),
            ("warden_state_store_writes_total", "Writes (begin-steps, record batches, revocations) committed in those transactions", s.writes.load(Ordering::Relaxed)),
            ("warden_state_store_failed_transactions_total", "Write transactions that failed as a whole (their writes got a store error)", s.failed_groups.load(Ordering::Relaxed)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_hash_is_the_trail_s_hash() {
        // Bodies around SHA-256's block boundaries, and a long one.
        for len in [0, 1, 54, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 70_000] {
            let body: String = (0..len).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            assert_eq!(chain_hash(GENESIS, &body), warden_core::trail::chain_hash(GENESIS, &body), "{len}");
        }
        assert_eq!(chain_hash("ab", "ü\n"), warden_core::trail::chain_hash("ab", "ü\n"));
    }

    fn plan(conn: &Connection, q: &Search) -> String {
        let (sql, args) = search_sql(q);
        let args: Vec<(&str, &dyn rusqlite::ToSql)> = args.iter().map(|(k, v)| (*k, v as &dyn rusqlite::ToSql)).collect();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map(args.as_slice(), |r| r.get::<_, String>(3)).unwrap();
        rows.collect::<Result<Vec<_>, _>>().unwrap().join("; ")
    }

    #[test]
    fn search_uses_the_indexes_of_the_filters_given() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let q = |f: fn(&mut Search)| {
            let mut q = Search { limit: 10, ..Default::default() };
            f(&mut q);
            q
        };
        let by_subject = plan(&conn, &q(|q| q.subject = Some("a".into())));
        assert!(by_subject.contains("USING INDEX sessions_subject"), "{by_subject}");
        let by_credential = plan(&conn, &q(|q| q.credential = Some("c".into())));
        assert!(by_credential.contains("USING INDEX records_credential"), "{by_credential}");
        let by_workload = plan(&conn, &q(|q| q.workload = Some("w".into())));
        assert!(by_workload.contains("USING INDEX records_workload"), "{by_workload}");
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sessions' AND sql IS NOT NULL")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indexes, vec!["sessions_subject"]);
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {CREDENTIAL_SUBJECTS}")).unwrap();
        let steps: Vec<String> = stmt.query_map(["c"], |r| r.get(3)).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(steps, vec!["SEARCH credential_subjects USING COVERING INDEX credential_subjects_first_seen (credential=?)"]);
    }
}
