//! The database's shape and the settings of its connections. A database file outlives the
//! binary that wrote it, so its schema moves only forward, one numbered migration at a time,
//! and a binary refuses a file newer than it knows.

use rusqlite::config::DbConfig;
use rusqlite::Connection;

use super::backend;
use crate::store::StoreError;

/// Each entry moves the schema one version up; applied in order, once, in a transaction.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 4: the append-only log over every record (`super::log`): each record's leaf, the Merkle
    // tree's stored hashes (tlog_tiles' layout), signed checkpoints; and each record's hash
    // version (records already stored keep version 1: their hashes are never recomputed). The
    // records already stored are entered into the log by `LOG_MIGRATION`'s Rust step.
    "ALTER TABLE records ADD COLUMN hash_version INTEGER NOT NULL DEFAULT 1;
     CREATE TABLE log_leaves (
        idx INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL,
        UNIQUE (session_id, seq)
     );
     CREATE TABLE log_hashes (idx INTEGER PRIMARY KEY, hash BLOB NOT NULL);
     CREATE TABLE checkpoints (
        size INTEGER PRIMARY KEY,
        root BLOB NOT NULL,
        note TEXT NOT NULL,
        at_ms INTEGER NOT NULL
     );",
    // 5: a record refused by the trail's invariants is kept whole in its session's audit event.
    "ALTER TABLE audit ADD COLUMN record TEXT;",
    // 6: each subject's behavioural profile across its sessions (`super::profiles`).
    "CREATE TABLE profiles (subject TEXT PRIMARY KEY, profile TEXT NOT NULL, updated_at_ms INTEGER NOT NULL);",
];

/// The migration that creates the log: after its SQL, the records already stored are entered
/// into the log, in stored order, once. Never again later: a record that appears in the file
/// without having been appended by the service (a forgery) must stay out of the log.
const LOG_MIGRATION: usize = 4;

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
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
        if i + 1 == LOG_MIGRATION {
            super::log::enter_stored_records(&tx)?;
        }
        tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(backend)?;
        tx.commit().map_err(backend)?;
    }
    Ok(())
}

/// The writer's connection. WAL: readers never block the writer; NORMAL sync is durable across
/// process crashes (see the store's documentation, in `sqlite`).
pub(super) fn pragmas(conn: &Connection) -> Result<(), StoreError> {
    conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(backend)?;
    connection_pragmas(conn)
}

/// Every connection, the readers' too.
pub(super) fn connection_pragmas(conn: &Connection) -> Result<(), StoreError> {
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
