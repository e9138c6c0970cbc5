//! Writing a whole store into an empty Redis (`warden-state migrate`): every key as the store
//! itself would have written it, records and log hashes copied as they are (never recomputed),
//! so chains verify and earlier checkpoints stay consistent with the log.

use redis::AsyncCommands;
use warden_core::session::SessionState;
use warden_core::wire::{AuditEvent, Revocation};
use warden_log::Hash;

use super::conn::{self, Conn};
use super::session::StoredRecord;
use super::{backend, keys};
use crate::store::StoreError;

pub struct Importer {
    conn: Conn,
}

/// A record as copied: (step, decision id, credential, workload, the record as stored).
pub type RecordImport = (u64, String, Option<String>, Option<String>, StoredRecord);

/// One session as it is copied.
pub struct SessionImport {
    pub id: String,
    pub state: SessionState,
    pub revoked_at_ms: Option<u64>,
    pub revoke_reason: Option<String>,
    /// Its revocation's feed cursor.
    pub fed: Option<u64>,
    /// (step, decision id, credential, workload, stored record), in sequence order.
    pub records: Vec<RecordImport>,
    pub audit: Vec<AuditEvent>,
}

impl Importer {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(Self { conn: conn::connect(url).await? })
    }

    /// Refuse a Redis that already holds Session Warden data.
    pub async fn ensure_empty(&mut self) -> Result<(), StoreError> {
        for k in [keys::log::meta(), keys::feed::counter(), keys::index::started()] {
            let n: u64 = self.conn.exists(&k).await.map_err(backend)?;
            if n > 0 {
                return Err(StoreError::Backend(format!("the target already holds Session Warden data ({k} exists): migrate into an empty Redis")));
            }
        }
        Ok(())
    }

    pub async fn session(&mut self, s: &SessionImport) -> Result<(), StoreError> {
        let c = &mut self.conn;
        let id = s.id.as_str();
        let head = s.records.last().map(|r| r.4.hash.clone()).unwrap_or_else(|| warden_core::trail::GENESIS.to_string());
        let mut fields: Vec<(&str, String)> = vec![
            ("state", serde_json::to_string(&s.state).map_err(backend)?),
            ("ver", "1".into()),
            ("records", s.records.len().to_string()),
            ("head", head),
        ];
        if let Some(at) = s.revoked_at_ms {
            fields.push(("revoked_at_ms", at.to_string()));
            fields.push(("revoke_reason", s.revoke_reason.clone().unwrap_or_default()));
        }
        if let Some(f) = s.fed {
            fields.push(("fed", f.to_string()));
        }
        let _: () = c.hset_multiple(keys::session(id), &fields).await.map_err(backend)?;
        for chunk in s.records.chunks(500) {
            let entries: Vec<String> = chunk.iter().map(|r| r.4.encode()).collect();
            let _: () = c.rpush(keys::records(id), entries).await.map_err(backend)?;
            let dedupe: Vec<(String, u64)> = chunk.iter().map(|r| (keys::dedupe_field(r.0, &r.1), r.4.seq)).collect();
            let _: () = c.hset_multiple(keys::dedupe(id), &dedupe).await.map_err(backend)?;
            // Each step's first decision (records from before the invariants may hold two).
            for r in chunk {
                let _: bool = c.hset_nx(keys::dedupe(id), r.0.to_string(), &r.1).await.map_err(backend)?;
            }
        }
        for chunk in s.audit.chunks(500) {
            let events = chunk.iter().map(|a| serde_json::to_string(a).map_err(backend)).collect::<Result<Vec<_>, _>>()?;
            let _: () = c.rpush(keys::audit(id), events).await.map_err(backend)?;
        }
        let _: () = c.zadd(keys::index::started(), id, s.state.started_at_ms).await.map_err(backend)?;
        let _: () = c.zadd(keys::index::subject(&s.state.subject), id, s.state.started_at_ms).await.map_err(backend)?;
        for (_, _, cred, workload, _) in &s.records {
            if let Some(v) = cred {
                let _: () = c.sadd(keys::index::credential(v), id).await.map_err(backend)?;
            }
            if let Some(v) = workload {
                let _: () = c.sadd(keys::index::workload(v), id).await.map_err(backend)?;
            }
        }
        Ok(())
    }

    pub async fn credential_subject(&mut self, credential: &str, subject: &str, first_seen_ms: u64) -> Result<(), StoreError> {
        let _: () = redis::cmd("ZADD").arg(keys::credential_subjects(credential)).arg("NX").arg(first_seen_ms).arg(subject).query_async(&mut self.conn).await.map_err(backend)?;
        Ok(())
    }

    /// A subject's behavioural profile (its JSON as stored).
    pub async fn profile(&mut self, subject: &str, profile: &str) -> Result<(), StoreError> {
        let _: () = self.conn.hset_multiple(keys::profile(subject), &[("p", profile), ("ver", "1")]).await.map_err(backend)?;
        Ok(())
    }

    /// The feed with its cursors unchanged (proxies' cursors stay valid).
    pub async fn revocations(&mut self, feed: &[Revocation]) -> Result<(), StoreError> {
        let c = &mut self.conn;
        for r in feed {
            let entry = serde_json::json!({"session_id": r.session_id, "at_ms": r.at_ms, "reason": r.reason}).to_string();
            let _: () = c.zadd(keys::feed::cursors(), r.cursor, r.cursor).await.map_err(backend)?;
            let _: () = c.hset(keys::feed::entries(), r.cursor, entry).await.map_err(backend)?;
            let _: () = c.hset(keys::feed::by_session(), &r.session_id, r.cursor).await.map_err(backend)?;
        }
        if let Some(last) = feed.iter().map(|r| r.cursor).max() {
            let _: () = c.set(keys::feed::counter(), last).await.map_err(backend)?;
        }
        Ok(())
    }

    /// The log: leaves in their order (session, seq, chain hash), the stored tree hashes as they
    /// are, and the signed checkpoints (size, root, note, at_ms).
    pub async fn log(&mut self, leaves: &[(String, u64, String)], hashes: &[(u64, Hash)], checkpoints: &[(u64, Hash, String, u64)]) -> Result<(), StoreError> {
        let c = &mut self.conn;
        for (chunk_no, chunk) in leaves.chunks(500).enumerate() {
            let base = (chunk_no * 500) as u64;
            let data: Vec<(u64, String)> = chunk.iter().enumerate().map(|(i, (s, q, h))| (base + i as u64, warden_log::leaf_data(s, *q, h))).collect();
            let _: () = c.hset_multiple(keys::log::leaves(), &data).await.map_err(backend)?;
            let index: Vec<(String, u64)> = chunk.iter().enumerate().map(|(i, (s, q, _))| (keys::log::index_field(s, *q), base + i as u64)).collect();
            let _: () = c.hset_multiple(keys::log::index(), &index).await.map_err(backend)?;
            for (i, (s, q, _)) in chunk.iter().enumerate() {
                let _: () = c.zadd(keys::log::session(s), base + i as u64, *q).await.map_err(backend)?;
            }
        }
        for chunk in hashes.chunks(1000) {
            let pairs: Vec<(u64, &[u8])> = chunk.iter().map(|(i, h)| (*i, h.0.as_slice())).collect();
            let _: () = c.hset_multiple(keys::log::hashes(), &pairs).await.map_err(backend)?;
        }
        for (size, root, note, at_ms) in checkpoints {
            let cp = serde_json::json!({"root": root.to_string(), "note": note, "at_ms": at_ms}).to_string();
            let _: () = c.hset(keys::log::checkpoints(), *size, cp).await.map_err(backend)?;
        }
        let epoch = format!("migrated-{}", std::process::id());
        let mut meta: Vec<(&str, String)> = vec![("size", leaves.len().to_string()), ("epoch", epoch)];
        if let Some(latest) = checkpoints.iter().map(|c| c.0).max() {
            meta.push(("checkpoint", latest.to_string()));
        }
        let _: () = c.hset_multiple(keys::log::meta(), &meta).await.map_err(backend)?;
        Ok(())
    }
}
