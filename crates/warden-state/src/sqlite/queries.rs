//! What the store keeps, in SQL: a session's row, its hash-chained records, its audit events,
//! revocations and which subjects presented which credential. Every function here runs inside
//! a transaction it is given (the writer's, or a reader's snapshot) and depends only on its
//! arguments and the database: the writer may run a write twice (see `writer`).

use rusqlite::{params, Connection, OptionalExtension};
use warden_core::admission::{self, Admitted};
use warden_core::session::SessionState;
use warden_core::trail::{self, GENESIS};
use warden_core::wire::{
    AppendResult, AuditEvent, BeginOutcome, BeginResponse, BeginStep, ProofUse, RefusedRecord, Revocation, RevocationFeed, SessionHead, SessionSummary,
    SessionView, StepRecord, TrailEntry,
};

use super::backend;
use crate::store::{refusal, terminate_reason, Search, StoreError};

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
         ON CONFLICT(id) DO UPDATE SET subject = ?2, started_at_ms = ?3, last_seen_at_ms = ?4, steps = ?5, state = ?6, records = ?7, head_hash = ?8",
    )
    .map_err(backend)?
    .execute(params![id, s.subject, s.started_at_ms as i64, s.last_seen_at_ms as i64, s.steps as i64, state, records as i64, head])
    .map_err(backend)?;
    Ok(())
}

fn audit(conn: &Connection, id: &str, now_ms: u64, kind: &str, subject: &str, credential: Option<&str>, detail: &str) -> Result<(), StoreError> {
    audit_record(conn, id, now_ms, kind, subject, credential, detail, None)
}

#[allow(clippy::too_many_arguments)]
fn audit_record(
    conn: &Connection,
    id: &str,
    now_ms: u64,
    kind: &str,
    subject: &str,
    credential: Option<&str>,
    detail: &str,
    record: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO audit (session_id, at_ms, kind, subject, credential, detail, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
        .map_err(backend)?
        .execute(params![id, now_ms as i64, kind, subject, credential, detail, record])
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

pub(super) fn revoke_in(conn: &Connection, id: &str, reason: &str, now_ms: u64) -> Result<bool, StoreError> {
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

/// The DPoP replay rule, the one thing a store adds for sender-constrained tokens: a proof's use
/// (`ProofUse`: hash of key thumbprint and jti, and when the proof stops being acceptable) is
/// taken once. True when it had not been taken (it is now); false for a replay. Expired uses
/// are pruned first, so the table holds only proofs some proxy could still accept. Runs in the
/// begin-step's transaction, so two proxies racing with one proof cannot both take it.
fn proof_unused(conn: &Connection, proof: &ProofUse, now_ms: u64) -> Result<bool, StoreError> {
    conn.prepare_cached("DELETE FROM proof_uses WHERE expires_at_ms <= ?1").map_err(backend)?.execute(params![now_ms as i64]).map_err(backend)?;
    let inserted = conn
        .prepare_cached("INSERT OR IGNORE INTO proof_uses (id, expires_at_ms) VALUES (?1, ?2)")
        .map_err(backend)?
        .execute(params![proof.id, proof.expires_at_ms.min(i64::MAX as u64) as i64])
        .map_err(backend)?;
    Ok(inserted == 1)
}

pub(super) fn begin_in(conn: &Connection, req: &BeginStep, now_ms: u64) -> Result<BeginResponse, StoreError> {
    let (mut state, records, head, is_new) = match load(conn, &req.session_id)? {
        Some(row) => (row.state, row.records, row.head, false),
        None => (SessionState::open(&req.subject, &req.scopes, now_ms), 0, GENESIS.to_string(), true),
    };
    // A replayed DPoP proof changes nothing but the audit trail (of a session that exists).
    if let Some(proof) = &req.proof {
        if !proof_unused(conn, proof, now_ms)? {
            if !is_new {
                audit(conn, &req.session_id, now_ms, "dpop_replayed", &req.subject, req.credential.as_deref(), "a DPoP proof was presented again")?;
            }
            return Ok(BeginResponse { outcome: BeginOutcome::ProofReplayed, step: 0, new: false, session: state });
        }
    }
    let mut before = match state.begin_step_after(&req.subject, &req.seen(), now_ms, req.known_steps.unwrap_or(0)) {
        Ok(before) => before,
        Err(why) => {
            let (outcome, kind, detail) = refusal(why, &state.subject, &req.subject);
            audit(conn, &req.session_id, now_ms, kind, &req.subject, req.credential.as_deref(), &detail)?;
            return Ok(BeginResponse { outcome, step: 0, new: false, session: state });
        }
    };
    before.credential_subjects = credential_subjects(conn, req.credential.as_deref(), &req.subject, now_ms)?;
    before.profile = super::profiles::load(conn, &req.subject)?.map(Box::new);
    save(conn, &req.session_id, &state, records, &head)?;
    Ok(BeginResponse { outcome: BeginOutcome::Ok, step: state.steps, new: is_new, session: before })
}

/// The decision id stored for a record's step: the record's own if it is stored, else another's.
fn recorded_decision(conn: &Connection, r: &StepRecord) -> Result<Option<String>, StoreError> {
    conn.prepare_cached("SELECT decision_id FROM records WHERE session_id = ?1 AND step = ?2 ORDER BY decision_id = ?3 DESC LIMIT 1")
        .map_err(backend)?
        .query_row(params![r.session_id, r.step as i64, r.decision_id], |row| row.get(0))
        .optional()
        .map_err(backend)
}

/// Append a batch record by record, each admitted or refused by `warden_core::admission`.
pub(super) fn append_in(conn: &Connection, batch: &[StepRecord], now_ms: u64) -> Result<AppendResult, StoreError> {
    let mut res = AppendResult::default();
    // The session being appended to (`None` inside: the store has no such session yet), saved
    // when the batch moves to another session, before a revocation and at the end: a batch's
    // records of one session load and save its row once.
    let mut open: Option<(&str, Option<Row>)> = None;
    // The last (credential, subject) pair remembered, so a batch's records do not repeat it.
    let mut seen: Option<(&str, &str)> = None;
    let mut learning = super::profiles::Learning::default();
    for r in batch {
        let mut row = match open.take() {
            Some((id, row)) if id == r.session_id => row,
            other => {
                if let Some((id, Some(row))) = other {
                    save(conn, id, &row.state, row.records, &row.head)?;
                }
                load(conn, &r.session_id)?
            }
        };
        let recorded = recorded_decision(conn, r)?;
        // The session's state is lent to the rule and put back; a refusal leaves it unchanged.
        let (mut state, records, head) = match row {
            Some(row) => (Some(row.state), row.records, row.head),
            None => (None, 0, GENESIS.to_string()),
        };
        let admitted = admission::admit(&mut state, recorded.as_deref(), r, now_ms);
        let seen_credential = match admitted {
            Ok(Admitted::Append { seen_credential, .. }) => seen_credential,
            other => {
                match other {
                    Err(why) => {
                        let body = trail::canonical_body(r).map_err(backend)?;
                        audit_record(conn, &r.session_id, now_ms, why.code(), &r.subject, r.credential.as_deref(), &why.detail(r), Some(&body))?;
                        res.refused.push(RefusedRecord { session_id: r.session_id.clone(), step: r.step, decision_id: r.decision_id.clone(), code: why.code().into() });
                    }
                    _ => res.duplicates += 1,
                }
                open = Some((&r.session_id, state.map(|state| Row { state, records, head })));
                continue;
            }
        };
        let Some(state) = state else { return Err(StoreError::Backend("an admitted record left no session".into())) };
        let body = trail::canonical_body(r).map_err(backend)?;
        let seq = records + 1;
        let hash = chain_hash(&head, &body);
        conn.prepare_cached(
            "INSERT INTO records (session_id, seq, step, decision_id, at_ms, credential, workload, body, prev_hash, hash, hash_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .map_err(backend)?
        .execute(params![
            r.session_id,
            seq as i64,
            r.step as i64,
            r.decision_id,
            r.at_ms as i64,
            r.credential,
            r.workload,
            body,
            head,
            hash,
            trail::HASH_V2
        ])
        .map_err(backend)?;
        super::log::append_leaf(conn, &r.session_id, seq, &hash)?;
        learning.observe(conn, r, &state)?;
        row = Some(Row { state, records: seq, head: hash });
        if let (true, Some(cred)) = (seen_credential, r.credential.as_deref()) {
            if seen != Some((cred, r.subject.as_str())) {
                credential_seen(conn, cred, &r.subject, r.at_ms)?;
                seen = Some((cred, r.subject.as_str()));
            }
        }
        if r.action == "terminate" && r.enforced {
            if let Some(row) = &row {
                save(conn, &r.session_id, &row.state, row.records, &row.head)?;
            }
            revoke_in(conn, &r.session_id, &terminate_reason(r), now_ms)?;
        } else {
            open = Some((&r.session_id, row));
        }
        res.appended += 1;
    }
    if let Some((id, Some(row))) = open {
        save(conn, id, &row.state, row.records, &row.head)?;
    }
    learning.save(conn, now_ms)?;
    Ok(res)
}

pub(super) fn session_in(conn: &Connection, id: &str) -> Result<Option<SessionView>, StoreError> {
    let Some(row) = load(conn, id)? else { return Ok(None) };
    let head = SessionHead { records: row.records, hash: row.head.clone() };
    let (revoked_at_ms, revoke_reason): (Option<i64>, Option<String>) = conn
        .prepare_cached("SELECT revoked_at_ms, revoke_reason FROM sessions WHERE id = ?1")
        .map_err(backend)?
        .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(backend)?;
    let mut timeline = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT seq, body, prev_hash, hash, hash_version FROM records WHERE session_id = ?1 ORDER BY seq")
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![id], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, u8>(4)?))
            })
            .map_err(backend)?;
        for row in rows {
            let (seq, body, prev_hash, hash, hash_version) = row.map_err(backend)?;
            // A body that no longer parses is still shown (and fails verification), not hidden.
            let record = serde_json::from_str(&body).unwrap_or_default();
            timeline.push(TrailEntry { seq: seq as u64, record, body, prev_hash, hash, hash_version });
        }
    }
    let mut audit = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT at_ms, kind, subject, credential, detail, record FROM audit WHERE session_id = ?1 ORDER BY id")
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![id], |r| {
                Ok(AuditEvent {
                    at_ms: r.get::<_, i64>(0)? as u64,
                    kind: r.get(1)?,
                    subject: r.get(2)?,
                    credential: r.get(3)?,
                    detail: r.get(4)?,
                    record: r.get(5)?,
                })
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
        head: Some(head),
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

pub(super) fn search_in(conn: &Connection, q: &Search) -> Result<Vec<SessionSummary>, StoreError> {
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

pub(super) fn revocations_in(conn: &Connection, after: u64, limit: usize) -> Result<RevocationFeed, StoreError> {
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

#[cfg(test)]
mod tests {
    use crate::sqlite::schema::migrate;
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

