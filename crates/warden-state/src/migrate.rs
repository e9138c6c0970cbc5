//! `warden-state migrate --from sqlite:PATH --to redis://…`: copy a SQLite store into an empty
//! Redis. Sessions (state, revocation, records with their bodies and hashes unchanged, audit
//! events), the revocation feed with its cursors, which subjects presented which credential, the
//! subjects' behavioural profiles and
//! the log (the same leaves in the same order, the same stored tree hashes, the signed
//! checkpoints): a trail verifies after as before, and a checkpoint signed before the migration
//! is consistent with every one signed after.
//!
//! Stop the service (or every proxy's writes) first: records appended during the copy would be
//! missed. The source is read in one read transaction, so what is copied is one instant.

use rusqlite::{params, Connection, OpenFlags};
use warden_core::wire::{AuditEvent, Revocation};
use warden_log::Hash;

use crate::redis::import::{Importer, SessionImport};
use crate::redis::is_redis_url;
use crate::redis::StoredRecord;
use crate::sqlite::SqliteStore;
use crate::store::StoreError;

fn sql(e: rusqlite::Error) -> String {
    format!("reading the SQLite store: {e}")
}

fn hash(blob: Vec<u8>) -> Result<Hash, String> {
    <[u8; 32]>::try_from(blob).map(Hash).map_err(|_| "a stored log hash is not 32 bytes".to_string())
}

/// What a migration copied, for its report.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub sessions: u64,
    pub records: u64,
    pub audit: u64,
    pub revocations: u64,
    pub leaves: u64,
    pub checkpoints: u64,
}

pub async fn run(from: &str, to: &str) -> Result<(), String> {
    let c = copy(from, to).await?;
    println!(
        "migrated {} sessions, {} records, {} audit events, {} revocations, {} log leaves and {} checkpoints into {}",
        c.sessions,
        c.records,
        c.audit,
        c.revocations,
        c.leaves,
        c.checkpoints,
        crate::redis::redacted(to)
    );
    Ok(())
}

pub async fn copy(from: &str, to: &str) -> Result<Copied, String> {
    let path = from.strip_prefix("sqlite:").ok_or_else(|| format!("--from {from:?}: expected sqlite:PATH"))?;
    if !is_redis_url(to) {
        return Err(format!("--to {to:?}: expected redis://…, rediss://… or redis+cluster://…"));
    }
    if !std::path::Path::new(path).exists() {
        return Err(format!("--from: no such file {path}"));
    }
    // Bring the file to the current schema (what the service would do on start), then read it.
    drop(SqliteStore::open(std::path::Path::new(path)).map_err(|e| e.to_string())?);
    let mut conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql)?;
    let tx = conn.transaction().map_err(sql)?;
    let mut target = Importer::connect(to).await.map_err(|e: StoreError| e.to_string())?;
    target.ensure_empty().await.map_err(|e| e.to_string())?;
    let mut copied = Copied::default();

    let feed: Vec<Revocation> = {
        let mut stmt = tx.prepare("SELECT cursor, session_id, at_ms, reason FROM revocations ORDER BY cursor").map_err(sql)?;
        let rows = stmt
            .query_map([], |r| Ok(Revocation { cursor: r.get::<_, i64>(0)? as u64, session_id: r.get(1)?, at_ms: r.get::<_, i64>(2)? as u64, reason: r.get(3)? }))
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)?
    };
    let fed: std::collections::HashMap<&str, u64> = feed.iter().map(|r| (r.session_id.as_str(), r.cursor)).collect();

    let ids: Vec<(String, String, Option<i64>, Option<String>)> = {
        let mut stmt = tx.prepare("SELECT id, state, revoked_at_ms, revoke_reason FROM sessions ORDER BY id").map_err(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)?
    };
    let mut records = tx
        .prepare("SELECT seq, step, decision_id, credential, workload, body, prev_hash, hash, hash_version FROM records WHERE session_id = ?1 ORDER BY seq")
        .map_err(sql)?;
    let mut audit = tx.prepare("SELECT at_ms, kind, subject, credential, detail, record FROM audit WHERE session_id = ?1 ORDER BY id").map_err(sql)?;
    for (id, state, revoked_at_ms, revoke_reason) in ids {
        let mut state: warden_core::session::SessionState = serde_json::from_str(&state).map_err(|e| format!("session {id}: its state does not parse: {e}"))?;
        state.revoked = revoked_at_ms.is_some();
        let recs = records
            .query_map(params![id], |r| {
                Ok((
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    StoredRecord { seq: r.get::<_, i64>(0)? as u64, body: r.get(5)?, prev_hash: r.get(6)?, hash: r.get(7)?, hash_version: r.get(8)? },
                ))
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        let events = audit
            .query_map(params![id], |r| {
                Ok(AuditEvent { at_ms: r.get::<_, i64>(0)? as u64, kind: r.get(1)?, subject: r.get(2)?, credential: r.get(3)?, detail: r.get(4)?, record: r.get(5)? })
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        copied.sessions += 1;
        copied.records += recs.len() as u64;
        copied.audit += events.len() as u64;
        let s = SessionImport {
            fed: fed.get(id.as_str()).copied(),
            id,
            state,
            revoked_at_ms: revoked_at_ms.map(|v| v as u64),
            revoke_reason,
            records: recs,
            audit: events,
        };
        target.session(&s).await.map_err(|e| e.to_string())?;
    }
    target.revocations(&feed).await.map_err(|e| e.to_string())?;
    copied.revocations = feed.len() as u64;

    {
        let mut stmt = tx.prepare("SELECT credential, subject, first_seen_ms FROM credential_subjects").map_err(sql)?;
        let rows: Vec<(String, String, i64)> = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?;
        for (cred, subject, at) in rows {
            target.credential_subject(&cred, &subject, at as u64).await.map_err(|e| e.to_string())?;
        }
    }

    {
        let mut stmt = tx.prepare("SELECT subject, profile FROM profiles").map_err(sql)?;
        let rows: Vec<(String, String)> = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?;
        for (subject, profile) in rows {
            target.profile(&subject, &profile).await.map_err(|e| e.to_string())?;
        }
    }

    let leaves: Vec<(String, u64, String)> = {
        let mut stmt = tx.prepare("SELECT idx, session_id, seq, hash FROM log_leaves ORDER BY idx").map_err(sql)?;
        let rows: Vec<(i64, String, i64, String)> = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?;
        if rows.iter().enumerate().any(|(i, r)| r.0 != i as i64) {
            return Err("the SQLite log's leaf indexes are not 0, 1, 2, …: the file was edited; not migrated".into());
        }
        rows.into_iter().map(|(_, s, q, h)| (s, q as u64, h)).collect()
    };
    let hashes: Vec<(u64, Hash)> = {
        let mut stmt = tx.prepare("SELECT idx, hash FROM log_hashes ORDER BY idx").map_err(sql)?;
        let rows: Vec<(i64, Vec<u8>)> = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?;
        rows.into_iter().map(|(i, b)| hash(b).map(|h| (i as u64, h))).collect::<Result<_, _>>()?
    };
    let checkpoints: Vec<(u64, Hash, String, u64)> = {
        let mut stmt = tx.prepare("SELECT size, root, note, at_ms FROM checkpoints ORDER BY size").map_err(sql)?;
        let rows: Vec<(i64, Vec<u8>, String, i64)> = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?;
        rows.into_iter().map(|(s, root, note, at)| hash(root).map(|h| (s as u64, h, note, at as u64))).collect::<Result<_, _>>()?
    };
    target.log(&leaves, &hashes, &checkpoints).await.map_err(|e| e.to_string())?;
    copied.leaves = leaves.len() as u64;
    copied.checkpoints = checkpoints.len() as u64;
    Ok(copied)
}
