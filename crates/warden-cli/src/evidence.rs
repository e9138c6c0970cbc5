//! Checking a session's evidence with only the log's public key: its chain, then each record's
//! inclusion proof against a signed checkpoint and the signed session head, so an export (or
//! the service's answer) that was edited, cut, padded, re-ordered or re-signed is named. Kept
//! apart from session.rs, which only fetches, prints and dispatches.

use std::collections::BTreeSet;

use serde_json::Value;
use warden_core::trail;
use warden_core::wire::{SessionHead, SessionView, StepRecord};
use warden_log::{KeyRing, LaterCheckpoint, SessionEvidence};

/// What checked out: the checkpoint's size and who signed it.
pub struct Proven {
    pub tree_size: u64,
    pub signed_by: Vec<String>,
}

/// Every session of an export: its typed view, its raw JSON (to catch fields added to a record)
/// and its evidence when it was exported with one. Reads JSON Lines and any other layout of
/// the same values (a pretty-printed export), naming the line of what does not parse.
pub fn read(text: &str) -> Result<Vec<(SessionView, Value)>, String> {
    let mut out = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    loop {
        let start = stream.byte_offset();
        let blank = text[start..].len() - text[start..].trim_start().len();
        let line = text[..start + blank].matches('\n').count() + 1;
        match stream.next() {
            None => break,
            Some(Err(e)) => return Err(format!("line {}: not an exported session ({e})", e.line())),
            Some(Ok(v)) => {
                let view = serde_json::from_value::<SessionView>(v.clone()).map_err(|e| format!("line {line}: not an exported session ({e})"))?;
                out.push((view, v));
            }
        }
    }
    Ok(out)
}

/// Fields of each exported record that a record does not have: an addition that the typed
/// reading would drop silently, so it is named instead.
fn unknown_fields(raw: &Value) -> Result<(), String> {
    let known: BTreeSet<String> = match serde_json::to_value(StepRecord::default()) {
        Ok(Value::Object(m)) => m.into_iter().map(|(k, _)| k).collect(),
        _ => return Ok(()),
    };
    for (i, e) in raw.get("timeline").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if let Some(Value::Object(r)) = e.get("record") {
            if let Some(k) = r.keys().find(|k| !known.contains(*k)) {
                return Err(format!("record {} has a field {k:?} that no record has (the record was altered)", i + 1));
            }
        }
    }
    Ok(())
}

/// The chain of one exported session, and its raw records' fields.
pub fn check_chain(view: &SessionView, raw: Option<&Value>) -> Result<(), String> {
    trail::verify(&view.timeline).map_err(|b| format!("at step {} (record {}): {}", b.step, b.seq, b.why))?;
    if let Some(head) = &view.head {
        trail::verify_head(&view.timeline, head, "the session's head")?;
    }
    match raw {
        Some(raw) => unknown_fields(raw),
        None => Ok(()),
    }
}

/// Check a session's trail against its evidence with the given keys: the checkpoint's and the
/// head's signatures, the head against the trail (a missing tail, records beyond it), and each
/// record's leaf in the checkpoint's tree.
pub fn check(view: &SessionView, evidence: &SessionEvidence, keys: &KeyRing) -> Result<Proven, String> {
    let id = &view.id;
    if evidence.session_id != *id {
        return Err(format!("the evidence is of session {}, not of {id}", evidence.session_id));
    }
    let cp = keys.verify_checkpoint(&evidence.checkpoint).map_err(|e| e.0)?;
    let head = keys.verify_head(&evidence.head).map_err(|e| e.0)?;
    if head.session_id != *id || head.origin != cp.origin || head.tree_size != cp.size {
        return Err(format!(
            "the signed head is of session {} in {} at {} leaves, not of this session at this checkpoint ({} at {})",
            head.session_id, head.origin, head.tree_size, cp.origin, cp.size
        ));
    }
    let n = view.timeline.len() as u64;
    let signed = SessionHead { records: head.records, hash: head.hash.clone() };
    trail::verify_head(&view.timeline, &signed, "the signed head")?;
    if evidence.leaves.len() as u64 != n {
        return Err(format!("the evidence proves {} records, the trail has {n}", evidence.leaves.len()));
    }
    for (e, leaf) in view.timeline.iter().zip(&evidence.leaves) {
        if leaf.seq != e.seq {
            return Err(format!("record {} has the proof of record {} (the evidence was reordered)", e.seq, leaf.seq));
        }
        if leaf.hash != e.hash {
            return Err(format!("record {} (step {}) is not the record the log holds: it was rewritten after it was logged", e.seq, e.record.step));
        }
        let proof = warden_log::decode(&leaf.proof).map_err(|e| e.0)?;
        let hash = warden_log::leaf_hash(id, e.seq, &e.hash);
        warden_log::check_inclusion(&proof, leaf.leaf_index, cp.size, hash, cp.root)
            .map_err(|err| format!("record {} (step {}): {err}", e.seq, e.record.step))?;
    }
    Ok(Proven { tree_size: cp.size, signed_by: cp.signed_by })
}

/// A `--later` file: a `LaterCheckpoint` (JSON), or a bare checkpoint note (a witness's state
/// file), which can only show a fork at its own size or a log gone backwards.
pub fn read_later(text: &str) -> Result<LaterCheckpoint, String> {
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| format!("--later: not a later checkpoint ({e}); make one with `warden log consistency`"));
    }
    Ok(LaterCheckpoint { checkpoint: text.to_string(), proofs: Vec::new() })
}

/// Check the checkpoint a session's evidence was proven against (`evidence_note`) against a
/// later checkpoint of the same log: the later one must extend it, by its consistency proof.
pub fn check_later(evidence_note: &str, later: &LaterCheckpoint, keys: &KeyRing) -> Result<(), String> {
    let cp = keys.verify_checkpoint(evidence_note).map_err(|e| e.0)?;
    let new = keys.verify_checkpoint(&later.checkpoint).map_err(|e| format!("the later checkpoint: {}", e.0))?;
    if new.origin != cp.origin {
        return Err(format!("the later checkpoint is of the log {:?}, the evidence of {:?}", new.origin, cp.origin));
    }
    let inconsistent = |why: String| format!("the evidence's checkpoint ({} leaves) is inconsistent with the later one ({} leaves): {why}", cp.size, new.size);
    let proof = match later.proofs.iter().find(|p| p.from == cp.size && p.to == new.size) {
        Some(p) => warden_log::decode(&p.proof).map_err(|e| e.0)?,
        None if new.size <= cp.size => Vec::new(),
        None => return Err(format!("the later checkpoint has no consistency proof from {} leaves: make it with `warden log consistency --file EXPORT`", cp.size)),
    };
    warden_log::check_consistency(&proof, cp.size, cp.root, new.size, new.root).map_err(|e| inconsistent(e.0))
}

#[cfg(test)]
mod tests;
