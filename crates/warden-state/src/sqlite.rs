//! The embedded SQLite store: WAL, schema migrations by `user_version`, one writer connection.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use warden_core::session::{remember_value, SessionState};
use warden_core::trail::{chain_hash, GENESIS};
use warden_core::wire::{
    AppendResult, AuditEvent, BeginOutcome, BeginResponse, BeginStep, Revocation, RevocationFeed, SessionSummary, SessionView, StepRecord,
    TrailEntry,
};

use crate::store::{Search, Store, StoreError};
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
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        Self::init(conn)
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(backend)?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        // WAL: readers never block the writer; NORMAL sync is durable across process crashes.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
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
        // Hot statements are prepared once and reused (begin, append, load, save).
        conn.set_prepared_statement_cache_capacity(32);
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Backend("store lock poisoned".into()))
    }
}

struct Row {
    state: SessionState,
    revoked: bool,
    records: u64,
    head: String,
}

fn load(tx: &Transaction<'_>, id: &str) -> Result<Option<Row>, StoreError> {
    tx.prepare_cached("SELECT state, revoked_at_ms IS NOT NULL, records, head_hash FROM sessions WHERE id = ?1")
        .map_err(backend)?
        .query_row(params![id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?)))
    .optional()
    .map_err(backend)?
    .map(|(state, revoked, records, head)| {
        let mut state: SessionState = serde_json::from_str(&state).map_err(backend)?;
        state.revoked = revoked;
        Ok(Row { state, revoked, records: records as u64, head })
    })
    .transpose()
}

fn save(tx: &Transaction<'_>, id: &str, s: &SessionState, records: u64, head: &str) -> Result<(), StoreError> {
    let state = serde_json::to_string(s).map_err(backend)?;
    tx.prepare_cached(
        "INSERT INTO sessions (id, subject, started_at_ms, last_seen_at_ms, steps, state, records, head_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(id) DO UPDATE SET last_seen_at_ms = ?4, steps = ?5, state = ?6, records = ?7, head_hash = ?8",
    )
    .map_err(backend)?
    .execute(params![id, s.subject, s.started_at_ms as i64, s.last_seen_at_ms as i64, s.steps as i64, state, records as i64, head])
    .map_err(backend)?;
    Ok(())
}

fn audit(tx: &Transaction<'_>, id: &str, now_ms: u64, kind: &str, subject: &str, credential: Option<&str>, detail: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO audit (session_id, at_ms, kind, subject, credential, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, now_ms as i64, kind, subject, credential, detail],
    )
    .map_err(backend)?;
    Ok(())
}

/// Remember that `subject` presented `credential`; return every subject that has (bounded).
fn credential_subjects(tx: &Transaction<'_>, credential: Option<&str>, subject: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
    let Some(cred) = credential else { return Ok(Vec::new()) };
    tx.prepare_cached("INSERT OR IGNORE INTO credential_subjects (credential, subject, first_seen_ms) VALUES (?1, ?2, ?3)")
        .map_err(backend)?
        .execute(params![cred, subject, now_ms as i64])
        .map_err(backend)?;
    let mut stmt = tx
        .prepare_cached("SELECT subject FROM credential_subjects WHERE credential = ?1 ORDER BY first_seen_ms LIMIT 16")
        .map_err(backend)?;
    let rows = stmt.query_map(params![cred], |r| r.get::<_, String>(0)).map_err(backend)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(backend)
}

fn new_session(subject: &str, now_ms: u64) -> SessionState {
    SessionState {
        subject: subject.to_string(),
        started_at_ms: now_ms,
        last_seen_at_ms: now_ms,
        subjects: vec![subject.to_string()],
        ..Default::default()
    }
}

fn revoke_in(tx: &Transaction<'_>, id: &str, reason: &str, now_ms: u64) -> Result<bool, StoreError> {
    if load(tx, id)?.is_none() {
        // Revoking a session no proxy has reported yet: it must never start.
        save(tx, id, &new_session("", now_ms), 0, GENESIS)?;
    }
    let changed = tx
        .execute(
            "UPDATE sessions SET revoked_at_ms = ?2, revoke_reason = ?3 WHERE id = ?1 AND revoked_at_ms IS NULL",
            params![id, now_ms as i64, reason],
        )
        .map_err(backend)?;
    if changed > 0 {
        tx.execute("INSERT INTO revocations (session_id, at_ms, reason) VALUES (?1, ?2, ?3)", params![id, now_ms as i64, reason])
            .map_err(backend)?;
    }
    Ok(changed > 0)
}

impl Store for SqliteStore {
    fn begin_step(&self, req: &BeginStep, now_ms: u64) -> Result<BeginResponse, StoreError> {
        validate::begin(req)?;
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(backend)?;
        let (mut state, records, head, is_new) = match load(&tx, &req.session_id)? {
            Some(row) => {
                if row.revoked {
                    audit(&tx, &req.session_id, now_ms, "revoked_session_used", &req.subject, req.credential.as_deref(), "a revoked session was presented")?;
                    tx.commit().map_err(backend)?;
                    return Ok(BeginResponse { outcome: BeginOutcome::Revoked, step: 0, new: false, session: row.state });
                }
                if row.state.subject != req.subject {
                    let detail = format!("session bound to {:?} presented by {:?}", row.state.subject, req.subject);
                    audit(&tx, &req.session_id, now_ms, "subject_mismatch", &req.subject, req.credential.as_deref(), &detail)?;
                    tx.commit().map_err(backend)?;
                    return Ok(BeginResponse { outcome: BeginOutcome::SubjectMismatch, step: 0, new: false, session: row.state });
                }
                (row.state, row.records, row.head, false)
            }
            None => {
                let mut s = new_session(&req.subject, now_ms);
                s.scopes = req.scopes.iter().take(64).cloned().collect();
                (s, 0, GENESIS.to_string(), true)
            }
        };
        let sharing = credential_subjects(&tx, req.credential.as_deref(), &req.subject, now_ms)?;
        if let Some(known) = req.known_steps {
            state.steps = state.steps.max(known);
        }
        let mut before = state.clone();
        before.credential_subjects = sharing;
        state.steps += 1;
        state.last_seen_at_ms = now_ms;
        remember_value(&mut state.credentials, req.credential.as_deref());
        remember_value(&mut state.workloads, req.workload.as_deref());
        remember_value(&mut state.regions, req.region.as_deref());
        remember_value(&mut state.devices, req.device.as_deref());
        for t in &req.tools {
            remember_value(&mut state.tools, Some(t));
        }
        save(&tx, &req.session_id, &state, records, &head)?;
        tx.commit().map_err(backend)?;
        Ok(BeginResponse { outcome: BeginOutcome::Ok, step: state.steps, new: is_new, session: before })
    }

    fn append(&self, batch: &[StepRecord], now_ms: u64) -> Result<AppendResult, StoreError> {
        for r in batch {
            validate::record(r)?;
        }
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(backend)?;
        let (mut appended, mut duplicates) = (0, 0);
        for r in batch {
            let exists: Option<i64> = tx
                .prepare_cached("SELECT seq FROM records WHERE session_id = ?1 AND step = ?2 AND decision_id = ?3")
                .map_err(backend)?
                .query_row(params![r.session_id, r.step as i64, r.decision_id], |row| row.get(0))
                .optional()
                .map_err(backend)?;
            if exists.is_some() {
                duplicates += 1;
                continue;
            }
            // In cached or degraded mode the trail may be the first the service hears of a session.
            let row = load(&tx, &r.session_id)?.unwrap_or_else(|| Row {
                state: new_session(&r.subject, r.at_ms),
                revoked: false,
                records: 0,
                head: GENESIS.to_string(),
            });
            let body = serde_json::to_string(r).map_err(backend)?;
            let seq = row.records + 1;
            let hash = chain_hash(&row.head, &body);
            tx.prepare_cached(
                "INSERT INTO records (session_id, seq, step, decision_id, at_ms, credential, workload, body, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .map_err(backend)?
            .execute(params![r.session_id, seq as i64, r.step as i64, r.decision_id, r.at_ms as i64, r.credential, r.workload, body, row.head, hash])
            .map_err(backend)?;
            let mut state = row.state;
            state.steps = state.steps.max(r.step);
            state.last_seen_at_ms = state.last_seen_at_ms.max(r.at_ms);
            if state.subject.is_empty() {
                state.subject = r.subject.clone();
            }
            remember_value(&mut state.credentials, r.credential.as_deref());
            remember_value(&mut state.workloads, r.workload.as_deref());
            remember_value(&mut state.regions, r.region.as_deref());
            remember_value(&mut state.devices, r.device.as_deref());
            remember_value(&mut state.tools, r.tool.as_deref());
            for f in &r.flags {
                remember_value(&mut state.flags, Some(f));
            }
            if r.step_up {
                state.last_step_up_ms = state.last_step_up_ms.max(Some(r.at_ms));
            }
            // Records may arrive out of order; the latest step's risk is the session's.
            if r.step >= state.steps {
                state.risk = r.risk;
            }
            credential_subjects(&tx, r.credential.as_deref(), &r.subject, r.at_ms)?;
            save(&tx, &r.session_id, &state, seq, &hash)?;
            if r.action == "terminate" && r.enforced {
                revoke_in(&tx, &r.session_id, &format!("terminated by policy: {}", r.reasons.join(",")), now_ms)?;
            }
            appended += 1;
        }
        tx.commit().map_err(backend)?;
        Ok(AppendResult { appended, duplicates })
    }

    fn session(&self, id: &str) -> Result<Option<SessionView>, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(backend)?;
        let Some(row) = load(&tx, id)? else { return Ok(None) };
        let (revoked_at_ms, revoke_reason): (Option<i64>, Option<String>) = tx
            .query_row("SELECT revoked_at_ms, revoke_reason FROM sessions WHERE id = ?1", params![id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(backend)?;
        let mut timeline = Vec::new();
        {
            let mut stmt = tx
                .prepare("SELECT seq, body, prev_hash, hash FROM records WHERE session_id = ?1 ORDER BY seq")
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
            let mut stmt = tx
                .prepare("SELECT at_ms, kind, subject, credential, detail FROM audit WHERE session_id = ?1 ORDER BY id")
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

    fn search(&self, q: &Search) -> Result<Vec<SessionSummary>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare(
                "SELECT id, subject, started_at_ms, last_seen_at_ms, steps, revoked_at_ms IS NOT NULL FROM sessions
                 WHERE (?1 IS NULL OR subject = ?1)
                   AND (?2 IS NULL OR id IN (SELECT session_id FROM records WHERE credential = ?2))
                   AND (?3 IS NULL OR id IN (SELECT session_id FROM records WHERE workload = ?3))
                   AND (?4 IS NULL OR last_seen_at_ms >= ?4)
                   AND (?5 IS NULL OR started_at_ms <= ?5)
                 ORDER BY started_at_ms DESC, id LIMIT ?6",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map(
                params![q.subject, q.credential, q.workload, q.since_ms.map(|v| v as i64), q.until_ms.map(|v| v as i64), q.limit as i64],
                |r| {
                    Ok(SessionSummary {
                        id: r.get(0)?,
                        subject: r.get(1)?,
                        started_at_ms: r.get::<_, i64>(2)? as u64,
                        last_seen_at_ms: r.get::<_, i64>(3)? as u64,
                        steps: r.get::<_, i64>(4)? as u64,
                        revoked: r.get(5)?,
                    })
                },
            )
            .map_err(backend)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend)
    }

    fn revoke(&self, id: &str, reason: &str, now_ms: u64) -> Result<bool, StoreError> {
        validate::session_id(id)?;
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(backend)?;
        let changed = revoke_in(&tx, id, reason, now_ms)?;
        tx.commit().map_err(backend)?;
        Ok(changed)
    }

    fn revocations(&self, after: u64, limit: usize) -> Result<RevocationFeed, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare("SELECT cursor, session_id, at_ms, reason FROM revocations WHERE cursor > ?1 ORDER BY cursor LIMIT ?2")
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
}
