//! The append-only log in SQL: each record's leaf (`log_leaves`, in log order), the Merkle
//! tree's hashes (`log_hashes`, in `tlog_tiles`' storage layout, so a root or a proof reads
//! O(log n) rows and never the whole log) and the signed checkpoints. A record's leaf is
//! written in the same transaction as the record, so the log and the trails never disagree
//! about what was appended.

use rusqlite::{params, Connection, OptionalExtension};
use warden_log::{Hash, HashReader, InclusionProof, LeafProof, LogSigner, TreeError};

use super::backend;
use crate::store::StoreError;

/// The stored tree hashes, read inside the caller's transaction.
struct Hashes<'a>(&'a Connection);

impl HashReader for Hashes<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, TreeError> {
        let mut stmt = self.0.prepare_cached("SELECT hash FROM log_hashes WHERE idx = ?1").map_err(|e| TreeError::InvalidInput(e.to_string()))?;
        indexes
            .iter()
            .map(|i| {
                let blob: Option<Vec<u8>> = stmt.query_row(params![*i as i64], |r| r.get(0)).optional().map_err(|e| TreeError::InvalidInput(e.to_string()))?;
                let bytes: [u8; 32] = blob.and_then(|b| b.try_into().ok()).ok_or(TreeError::IndexesNotInTree)?;
                Ok(Hash(bytes))
            })
            .collect()
    }
}

fn tree(e: warden_log::LogError) -> StoreError {
    StoreError::Backend(format!("log: {e}"))
}

/// How many leaves the log has.
pub(super) fn size(conn: &Connection) -> Result<u64, StoreError> {
    let n: i64 = conn.prepare_cached("SELECT COALESCE(MAX(idx) + 1, 0) FROM log_leaves").map_err(backend)?.query_row([], |r| r.get(0)).map_err(backend)?;
    Ok(n as u64)
}

/// Enter a record into the log as its next leaf.
pub(super) fn append_leaf(conn: &Connection, session_id: &str, seq: u64, chain_hash: &str) -> Result<(), StoreError> {
    let n = size(conn)?;
    let leaf = warden_log::leaf_hash(session_id, seq, chain_hash);
    let hashes = warden_log::hashes_to_store(n, leaf, &Hashes(conn)).map_err(tree)?;
    conn.prepare_cached("INSERT INTO log_leaves (idx, session_id, seq, hash) VALUES (?1, ?2, ?3, ?4)")
        .map_err(backend)?
        .execute(params![n as i64, session_id, seq as i64, chain_hash])
        .map_err(backend)?;
    let mut insert = conn.prepare_cached("INSERT INTO log_hashes (idx, hash) VALUES (?1, ?2)").map_err(backend)?;
    for (idx, h) in hashes {
        insert.execute(params![idx as i64, h.0.as_slice()]).map_err(backend)?;
    }
    Ok(())
}

/// The migration's step: the records stored before the log existed, in stored order.
pub(super) fn enter_stored_records(conn: &Connection) -> Result<(), StoreError> {
    let rows: Vec<(String, i64, String)> = {
        let mut stmt = conn.prepare("SELECT session_id, seq, hash FROM records ORDER BY rowid").map_err(backend)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)?
    };
    for (session, seq, hash) in rows {
        append_leaf(conn, &session, seq as u64, &hash)?;
    }
    Ok(())
}

fn root(conn: &Connection, n: u64) -> Result<Hash, StoreError> {
    warden_log::root(n, &Hashes(conn)).map_err(tree)
}

/// The latest checkpoint: (tree size, signed note).
pub(super) fn latest_in(conn: &Connection) -> Result<Option<(u64, String)>, StoreError> {
    conn.prepare_cached("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1")
        .map_err(backend)?
        .query_row([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .optional()
        .map_err(backend)
}

/// Sign a checkpoint of the log as it is now, unless the latest already covers it. Refuses to
/// sign a log that no longer extends its latest checkpoint (the database was rolled back, or
/// leaves already checkpointed were changed): the service never vouches for a rewritten history.
pub(super) fn checkpoint_in(conn: &Connection, signer: &LogSigner, now_ms: u64) -> Result<(u64, String), StoreError> {
    let n = size(conn)?;
    let latest: Option<(u64, Vec<u8>, String)> = conn
        .prepare_cached("SELECT size, root, note FROM checkpoints ORDER BY size DESC LIMIT 1")
        .map_err(backend)?
        .query_row([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)))
        .optional()
        .map_err(backend)?;
    if let Some((size, old_root, note)) = latest {
        if n < size {
            return Err(StoreError::Backend(format!(
                "the log has {n} leaves, fewer than its last checkpoint's {size}: the database was rolled back or cut; no checkpoint signed"
            )));
        }
        if root(conn, size)?.0.as_slice() != old_root.as_slice() {
            return Err(StoreError::Backend(format!(
                "the log's first {size} leaves are not those of its last checkpoint: the database was rewritten; no checkpoint signed"
            )));
        }
        if n == size {
            return Ok((size, note));
        }
    }
    let r = root(conn, n)?;
    let note = signer.checkpoint(n, r).map_err(tree)?;
    conn.prepare_cached("INSERT OR REPLACE INTO checkpoints (size, root, note, at_ms) VALUES (?1, ?2, ?3, ?4)")
        .map_err(backend)?
        .execute(params![n as i64, r.0.as_slice(), note, now_ms as i64])
        .map_err(backend)?;
    Ok((n, note))
}

/// The consistency proof from `from` leaves to `to`; `None` if `to` is beyond the log.
pub(super) fn consistency_in(conn: &Connection, from: u64, to: u64) -> Result<Option<Vec<String>>, StoreError> {
    if to > size(conn)? || from > to {
        return Ok(None);
    }
    Ok(Some(warden_log::encode(&warden_log::prove_consistency(from, to, &Hashes(conn)).map_err(tree)?)))
}

/// A record's inclusion proof in the tree of `tree_size` leaves; `None` if it is not in it.
pub(super) fn inclusion_in(conn: &Connection, session_id: &str, seq: u64, tree_size: u64) -> Result<Option<InclusionProof>, StoreError> {
    if tree_size > size(conn)? {
        return Ok(None);
    }
    let leaf: Option<(i64, String)> = conn
        .prepare_cached("SELECT idx, hash FROM log_leaves WHERE session_id = ?1 AND seq = ?2")
        .map_err(backend)?
        .query_row(params![session_id, seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(backend)?;
    let Some((idx, hash)) = leaf.filter(|(idx, _)| (*idx as u64) < tree_size) else { return Ok(None) };
    let proof = warden_log::prove_inclusion(idx as u64, tree_size, &Hashes(conn)).map_err(tree)?;
    Ok(Some(InclusionProof { session_id: session_id.to_string(), seq, hash, leaf_index: idx as u64, tree_size, proof: warden_log::encode(&proof) }))
}

/// Every leaf of a session in the tree of `tree_size` leaves, in sequence order, with its proof.
/// Read from the log, not from the records: a record removed from the store is still named by
/// its leaf.
pub(super) fn session_leaves_in(conn: &Connection, session_id: &str, tree_size: u64) -> Result<Vec<LeafProof>, StoreError> {
    let rows: Vec<(i64, String, i64)> = {
        let mut stmt = conn.prepare_cached("SELECT seq, hash, idx FROM log_leaves WHERE session_id = ?1 AND idx < ?2 ORDER BY seq").map_err(backend)?;
        let rows = stmt.query_map(params![session_id, tree_size as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)?
    };
    rows.into_iter()
        .map(|(seq, hash, idx)| {
            let proof = warden_log::prove_inclusion(idx as u64, tree_size, &Hashes(conn)).map_err(tree)?;
            Ok(LeafProof { seq: seq as u64, hash, leaf_index: idx as u64, proof: warden_log::encode(&proof) })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rusqlite::{params, Connection};
    use warden_core::trail::{self, GENESIS};
    use warden_core::wire::StepRecord;

    use super::*;
    use crate::sqlite::queries::session_in;
    use crate::sqlite::schema::{migrate, MIGRATIONS};

    #[test]
    fn records_stored_before_the_log_are_logged_once_at_the_migration_and_keep_their_hashes() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        // Two sessions as the service wrote them before: serde_json text, hashed as written.
        let mut expected = Vec::new();
        for (sid, n) in [("old-a", 3u64), ("old-b", 2)] {
            let mut prev = GENESIS.to_string();
            for seq in 1..=n {
                let r = StepRecord { session_id: sid.into(), step: seq, decision_id: format!("d{seq}"), action: "allow".into(), risk: 0.1, ..Default::default() };
                let body = serde_json::to_string(&r).unwrap();
                let hash = trail::chain_hash(&prev, &body);
                conn.execute(
                    "INSERT INTO records (session_id, seq, step, decision_id, at_ms, body, prev_hash, hash) VALUES (?1, ?2, ?2, ?3, 0, ?4, ?5, ?6)",
                    params![sid, seq as i64, r.decision_id, body, prev, hash],
                )
                .unwrap();
                expected.push((sid.to_string(), seq, hash.clone()));
                prev = hash;
            }
            conn.execute(
                "INSERT INTO sessions (id, subject, started_at_ms, last_seen_at_ms, steps, state, records, head_hash) VALUES (?1, '', 0, 0, ?2, '{}', ?2, ?3)",
                params![sid, n as i64, prev],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        assert_eq!(size(&conn).unwrap(), 5);
        let view = session_in(&conn, "old-a").unwrap().unwrap();
        assert!(view.timeline.iter().all(|e| e.hash_version == trail::HASH_V1));
        trail::verify(&view.timeline).unwrap();
        let r = root(&conn, 5).unwrap();
        for (i, (sid, seq, hash)) in expected.iter().enumerate() {
            let p = inclusion_in(&conn, sid, *seq, 5).unwrap().unwrap();
            assert_eq!((p.leaf_index, &p.hash), (i as u64, hash));
            warden_log::check_inclusion(&warden_log::decode(&p.proof).unwrap(), p.leaf_index, 5, warden_log::leaf_hash(sid, *seq, hash), r).unwrap();
        }
        // Migrating again does nothing: a record slipped into the file later is never logged.
        conn.execute("INSERT INTO records (session_id, seq, step, decision_id, at_ms, body, prev_hash, hash) VALUES ('old-b', 3, 3, 'x', 0, '{}', '', '')", []).unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(size(&conn).unwrap(), 5);
    }
}
