//! Group commit: one writer thread owns the only writing connection. It takes every operation
//! waiting in its queue (up to a bound) and commits them in one transaction: one WAL commit (and
//! its page writes) is shared by the group instead of paid per request. Replies are sent only
//! after that transaction has committed, so a caller never sees a result that is not stored.
//! Operations run one after the other, in arrival order, on one connection: each sees
//! everything queued before it, so what they compute is exactly what one transaction per
//! operation would. Each operation stays atomic and isolated from its group: if one fails, the
//! group is rolled back and run again with a savepoint per operation, and only the failed one
//! is rolled back. Reads use separate read-only connections (WAL readers see the last commit and
//! never wait for the writer).
//!
//! An operation is any closure over a connection: this module knows nothing of what the store
//! keeps, so the transaction machinery can be read, and changed, on its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::backend;
use super::schema::connection_pragmas;
use crate::store::{StoreError, StoreFuture};

/// A group's transaction takes operations until their weight reaches this; the rest waits for
/// the next group.
const MAX_GROUP_WEIGHT: usize = 4096;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 4;

/// What the writer has done, for the store's counters.
#[derive(Default)]
pub(super) struct Stats {
    pub(super) commits: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) failed_groups: AtomicU64,
}

/// The writer thread's queue. Dropping it closes the queue: the writer commits what is queued,
/// then stops, and the drop waits for that.
pub(super) struct WriteQueue {
    /// `None` only while dropping.
    queue: Option<mpsc::Sender<Box<dyn Op>>>,
    writer: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl WriteQueue {
    /// Start the writer thread on `conn`, which becomes the only connection that writes.
    pub(super) fn start(conn: Connection) -> Result<Self, StoreError> {
        let stats = Arc::new(Stats::default());
        let (queue, rx) = mpsc::channel();
        let writer = Writer { conn, rx, stats: stats.clone() };
        let writer = std::thread::Builder::new()
            .name("warden-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Backend(format!("cannot start the store's writer thread: {e}")))?;
        Ok(Self { queue: Some(queue), writer: Some(writer), stats })
    }

    pub(super) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queue `f` for the writer; resolves with its result once its group has committed. `f` may
    /// run twice (see `Writer::commit`): it must depend only on what it captured and the database.
    pub(super) fn write<T: Send + 'static>(&self, weight: usize, f: impl Fn(&Connection) -> Result<T, StoreError> + Send + 'static) -> StoreFuture<'static, T> {
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
}

impl Drop for WriteQueue {
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
pub(super) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub(super) fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), idle: Mutex::new(Vec::new()) }
    }

    /// Run `f` on a read connection, in one read transaction.
    pub(super) fn run<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
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
    /// The caller's measure of its work, at least one (see `MAX_GROUP_WEIGHT`).
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
