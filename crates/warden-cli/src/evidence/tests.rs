//! The tamper suite over exports: each alteration is named by `verify --file --key`, and a
//! reformatted export still verifies.

use std::cell::RefCell;
use std::collections::HashMap;

use warden_core::session::SessionState;
use warden_core::trail::{self, chain_hash, GENESIS};
use warden_core::wire::{RecordedInput, SessionView, StepRecord, TrailEntry};
use warden_log::{Hash, HashReader, LeafProof, LogSigner, SessionEvidence, SessionHead};

use super::*;

#[derive(Default)]
struct Mem(RefCell<HashMap<u64, Hash>>);

impl HashReader for Mem {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, warden_log::TreeError> {
        let m = self.0.borrow();
        indexes.iter().map(|i| m.get(i).copied().ok_or(warden_log::TreeError::IndexesNotInTree)).collect()
    }
}

/// A service in miniature: trails, their log, its key.
struct Log {
    tree: Mem,
    leaves: Vec<(String, u64, String)>,
    signer: LogSigner,
    skey: String,
    vkey: String,
}

impl Log {
    fn new() -> Self {
        let (skey, vkey) = warden_log::generate_log_key("warden.test/log").unwrap();
        Self::with_key(skey, vkey)
    }

    /// An empty log signed with the given key.
    fn with_key(skey: String, vkey: String) -> Self {
        Self { tree: Mem::default(), leaves: Vec::new(), signer: LogSigner::from_keys(std::slice::from_ref(&skey)).unwrap(), skey, vkey }
    }

    fn session(&mut self, id: &str, n: u64) -> SessionView {
        let mut prev = GENESIS.to_string();
        let timeline = (1..=n)
            .map(|i| {
                let record = StepRecord {
                    session_id: id.into(),
                    step: i,
                    decision_id: format!("d{i}"),
                    subject: "agent-7".into(),
                    action: "allow".into(),
                    risk: 0.25 * i as f64,
                    path: Some(format!("/tickets/{i}")),
                    input: RecordedInput::new(&serde_json::json!({"request": {"path": format!("/tickets/{i}")}, "n": 1.5})),
                    ..Default::default()
                };
                let body = trail::canonical_body(&record).unwrap();
                let hash = chain_hash(&prev, &body);
                let e = TrailEntry { seq: i, record, body, prev_hash: prev.clone(), hash: hash.clone(), hash_version: trail::HASH_V2 };
                self.append(id, i, &hash);
                prev = hash;
                e
            })
            .collect();
        SessionView { id: id.into(), state: SessionState::default(), revoked_at_ms: None, revoke_reason: None, head: None, timeline, audit: vec![] }
    }

    fn append(&mut self, id: &str, seq: u64, hash: &str) {
        let n = self.leaves.len() as u64;
        let new = warden_log::hashes_to_store(n, warden_log::leaf_hash(id, seq, hash), &self.tree).unwrap();
        self.tree.0.borrow_mut().extend(new);
        self.leaves.push((id.into(), seq, hash.into()));
    }

    fn evidence(&self, id: &str) -> SessionEvidence {
        let size = self.leaves.len() as u64;
        let root = warden_log::root(size, &self.tree).unwrap();
        let leaves: Vec<LeafProof> = self
            .leaves
            .iter()
            .enumerate()
            .filter(|(_, (s, _, _))| s == id)
            .map(|(i, (_, seq, hash))| LeafProof {
                seq: *seq,
                hash: hash.clone(),
                leaf_index: i as u64,
                proof: warden_log::encode(&warden_log::prove_inclusion(i as u64, size, &self.tree).unwrap()),
            })
            .collect();
        let last = leaves.last().unwrap();
        let head = SessionHead { origin: "warden.test/log".into(), session_id: id.into(), tree_size: size, records: last.seq, hash: last.hash.clone() };
        SessionEvidence { session_id: id.into(), checkpoint: self.signer.checkpoint(size, root).unwrap(), head: self.signer.session_head(&head).unwrap(), leaves }
    }

    fn keys(&self) -> KeyRing {
        KeyRing::new(std::slice::from_ref(&self.vkey)).unwrap()
    }
}

/// An export of one session, as `warden session export` writes it.
fn export(view: &SessionView, ev: &SessionEvidence) -> String {
    let mut v = serde_json::to_value(view).unwrap();
    v["evidence"] = serde_json::to_value(ev).unwrap();
    serde_json::to_string(&v).unwrap() + "\n"
}

/// `verify --file --key` on an export's text: Ok, or the reason it gives.
fn verify(text: &str, keys: &KeyRing) -> Result<(), String> {
    let sessions = read(text)?;
    assert_eq!(sessions.len(), 1);
    let (view, raw) = &sessions[0];
    check_chain(view, Some(raw))?;
    let ev: SessionEvidence = serde_json::from_value(raw["evidence"].clone()).map_err(|e| e.to_string())?;
    check(view, &ev, keys).map(|_| ())
}

/// Two sessions interleaved in the log, the second's export under test.
fn setup() -> (Log, SessionView) {
    let mut log = Log::new();
    log.session("other", 3);
    let view = log.session("ses-1", 5);
    log.session("later", 2);
    (log, view)
}

fn edit(text: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    f(&mut v);
    serde_json::to_string(&v).unwrap()
}

#[test]
fn an_intact_export_verifies_and_so_does_a_reformatted_one() {
    let (log, view) = setup();
    let text = export(&view, &log.evidence("ses-1"));
    verify(&text, &log.keys()).unwrap();
    // Pretty-printed over many lines, keys in another order, numbers written otherwise.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pretty = serde_json::to_string_pretty(&v).unwrap().replace("\"risk\": 0.5", "\"risk\": 5e-1").replace("\"n\": 1.5", "\"n\": 1.50");
    assert!(pretty.contains("5e-1") && pretty.contains("1.50"));
    verify(&pretty, &log.keys()).unwrap();
    // Another formatter's escapes for the same characters.
    let escaped = text.replace("/tickets/3", "\\/tickets\\/3").replace("agent-7", "\\u0061gent-7");
    verify(&escaped, &log.keys()).unwrap();
}

#[test]
fn each_tampering_of_an_export_is_named() {
    let (log, view) = setup();
    let keys = log.keys();
    let text = export(&view, &log.evidence("ses-1"));
    let why = |t: &str| verify(t, &keys).err().unwrap_or_else(|| panic!("not detected: {}", &t[..t.len().min(300)]));

    // One field edited, in the record or in its hashed body.
    let e = why(&edit(&text, |v| v["timeline"][2]["record"]["action"] = "deny".into()));
    assert!(e.contains("at step 3") && e.contains("altered"), "{e}");
    let e = why(&edit(&text, |v| {
        let body = v["timeline"][1]["body"].as_str().unwrap().replace("\"action\":\"allow\"", "\"action\":\"deny\"");
        v["timeline"][1]["body"] = body.into();
    }));
    assert!(e.contains("at step 2") && e.contains("altered"), "{e}");
    // A field added to a record.
    let e = why(&edit(&text, |v| v["timeline"][1]["record"]["approved_by"] = "ceo".into()));
    assert!(e.contains("\"approved_by\""), "{e}");
    // A middle record deleted.
    let e = why(&edit(&text, |v| {
        v["timeline"].as_array_mut().unwrap().remove(2);
    }));
    assert!(e.contains("removed or reordered"), "{e}");
    // The last records deleted (the chain alone still holds): the signed head names them.
    let cut = edit(&text, |v| {
        v["timeline"].as_array_mut().unwrap().truncate(3);
        v["evidence"]["leaves"].as_array_mut().unwrap().truncate(3);
    });
    let e = why(&cut);
    assert!(e.contains("the last 2 record(s) are missing"), "{e}");
    // Reordered.
    let e = why(&edit(&text, |v| v["timeline"].as_array_mut().unwrap().swap(1, 3)));
    assert!(e.contains("removed or reordered") || e.contains("does not follow"), "{e}");
    // A forged record inserted at the end, with a correct chain hash.
    let forged = edit(&text, |v| {
        let t = v["timeline"].as_array_mut().unwrap();
        let last: TrailEntry = serde_json::from_value(t[4].clone()).unwrap();
        let mut record = last.record.clone();
        record.step = 6;
        record.decision_id = "d6".into();
        let body = trail::canonical_body(&record).unwrap();
        let hash = chain_hash(&last.hash, &body);
        t.push(serde_json::to_value(TrailEntry { seq: 6, record, body, prev_hash: last.hash, hash, hash_version: 2 }).unwrap());
    });
    let e = why(&forged);
    assert!(e.contains("record 6 and after are beyond the signed head") && e.contains("inserted"), "{e}");
    // The whole session rewritten with recomputed hashes: the chain verifies, the log does not.
    let rewritten = edit(&text, |v| {
        let mut prev = GENESIS.to_string();
        for e in v["timeline"].as_array_mut().unwrap() {
            let mut entry: TrailEntry = serde_json::from_value(e.clone()).unwrap();
            entry.record.path = Some("/nothing-to-see".into());
            entry.body = trail::canonical_body(&entry.record).unwrap();
            entry.prev_hash = prev.clone();
            entry.hash = chain_hash(&prev, &entry.body);
            prev = entry.hash.clone();
            *e = serde_json::to_value(entry).unwrap();
        }
    });
    let e = why(&rewritten);
    assert!(e.contains("not the signed head's") || e.contains("rewritten"), "{e}");
    // Re-signed with another key (the checkpoint and head made anew by someone else).
    let mallory = Log::new();
    let resigned = edit(&text, |v| {
        let mut ev: SessionEvidence = serde_json::from_value(v["evidence"].clone()).unwrap();
        let cp = keys.verify_checkpoint(&ev.checkpoint).unwrap();
        ev.checkpoint = mallory.signer.checkpoint(cp.size, cp.root).unwrap();
        v["evidence"] = serde_json::to_value(ev).unwrap();
    });
    let e = why(&resigned);
    assert!(e.contains("unknown keys (warden.test/log+"), "{e}");
    // The checkpoint's text edited (another size): its signature fails.
    let e = why(&text.replacen("warden.test/log\\n10\\n", "warden.test/log\\n9\\n", 1));
    assert!(e.contains("does not match the note's text"), "{e}");
    // An inclusion proof that does not lead to the checkpoint's root.
    let e = why(&edit(&text, |v| v["evidence"]["leaves"][1]["leaf_index"] = 0.into()));
    assert!(e.contains("record 2") && e.contains("inclusion proof fails"), "{e}");
    // The evidence of another session.
    let other = export(&view, &log.evidence("other"));
    let e = why(&other);
    assert!(e.contains("evidence is of session other"), "{e}");
}

#[test]
fn a_legacy_trail_verifies_its_chain_and_an_export_without_evidence_is_named() {
    let (log, view) = setup();
    let mut v = serde_json::to_value(&view).unwrap();
    v.as_object_mut().unwrap().remove("evidence");
    let text = serde_json::to_string(&v).unwrap();
    let sessions = read(&text).unwrap();
    check_chain(&sessions[0].0, Some(&sessions[0].1)).unwrap();
    assert!(sessions[0].1.get("evidence").is_none());
    let _ = log;
}

#[test]
fn exports_are_read_as_json_lines_or_any_layout_naming_the_bad_line() {
    let (log, view) = setup();
    let one = export(&view, &log.evidence("ses-1"));
    assert_eq!(read(&format!("{one}\n\n{one}")).unwrap().len(), 2);
    let e = read(&format!("{one}{{\"id\": 3}}\n")).err().unwrap();
    assert!(e.starts_with("line 2:"), "{e}");
    let e = read(&format!("{one}not json\n")).err().unwrap();
    assert!(e.starts_with("line 2:"), "{e}");
}

impl Log {
    /// The log's checkpoint now, with a consistency proof from `from` leaves.
    fn later(&self, from: u64) -> LaterCheckpoint {
        let size = self.leaves.len() as u64;
        let root = warden_log::root(size, &self.tree).unwrap();
        let proof = warden_log::encode(&warden_log::prove_consistency(from, size, &self.tree).unwrap());
        LaterCheckpoint { checkpoint: self.signer.checkpoint(size, root).unwrap(), proofs: vec![warden_log::ConsistencyProof { from, to: size, proof }] }
    }

    /// The same log with the record at `index` rewritten from there on: what a database
    /// rewritten and re-signed with the log's own key would serve.
    fn rewritten_from(&self, index: usize) -> Log {
        let mut other = Log::with_key(self.skey.clone(), self.vkey.clone());
        for (i, (id, seq, hash)) in self.leaves.iter().enumerate() {
            let hash = if i == index { format!("{hash}-rewritten") } else { hash.clone() };
            other.append(id, *seq, &hash);
        }
        other
    }
}

#[test]
fn an_export_is_checked_against_a_later_checkpoint_of_its_log() {
    let mut log = Log::new();
    log.session("other", 3);
    let view = log.session("ses-1", 4);
    let ev = log.evidence("ses-1");
    let keys = log.keys();
    let exported_at = log.leaves.len() as u64;
    assert_eq!(check(&view, &ev, &keys).map(|p| p.tree_size), Ok(exported_at));
    // The log grows honestly: the later checkpoint extends the export's.
    log.session("later", 5);
    assert_eq!(check_later(&ev.checkpoint, &log.later(exported_at), &keys), Ok(()));
    // The same size, unchanged: nothing to prove.
    let same = LaterCheckpoint { checkpoint: ev.checkpoint.clone(), proofs: vec![] };
    assert_eq!(check_later(&ev.checkpoint, &same, &keys), Ok(()));
    // Rewritten before the export's size and re-signed with the log's key: named.
    let rewritten = log.rewritten_from(2);
    let e = check_later(&ev.checkpoint, &rewritten.later(exported_at), &keys).unwrap_err();
    assert!(e.contains("inconsistent with the later one") && e.contains("forked or was rewritten"), "{e}");
    // A fork: another tree of the export's very size.
    let mut fork = log.rewritten_from(1);
    fork.leaves.truncate(exported_at as usize);
    let mut forked = Log::with_key(log.skey.clone(), log.vkey.clone());
    for (id, seq, hash) in fork.leaves.clone() {
        forked.append(&id, seq, &hash);
    }
    let same_size = LaterCheckpoint { checkpoint: forked.later(exported_at).checkpoint, proofs: vec![] };
    let e = check_later(&ev.checkpoint, &same_size, &keys).unwrap_err();
    assert!(e.contains("the log forked"), "{e}");
    // Backwards: a smaller later checkpoint.
    let mut small = Log::with_key(log.skey.clone(), log.vkey.clone());
    small.session("other", 3);
    let backwards = LaterCheckpoint { checkpoint: small.later(3).checkpoint, proofs: vec![] };
    let e = check_later(&ev.checkpoint, &backwards, &keys).unwrap_err();
    assert!(e.contains("went backwards"), "{e}");
    // No proof from the export's size, or a checkpoint of an unknown key: said so.
    let unproven = LaterCheckpoint { checkpoint: log.later(exported_at).checkpoint, proofs: vec![] };
    assert!(check_later(&ev.checkpoint, &unproven, &keys).unwrap_err().contains("warden log consistency"));
    let stranger = Log::new();
    let e = check_later(&ev.checkpoint, &LaterCheckpoint { checkpoint: stranger.later(0).checkpoint, proofs: vec![] }, &keys).unwrap_err();
    assert!(e.starts_with("the later checkpoint:"), "{e}");
    // A witness's state file (a bare note) is read as a later checkpoint without proofs.
    assert_eq!(read_later(&ev.checkpoint).unwrap().checkpoint, ev.checkpoint);
    assert!(read_later("{not json").unwrap_err().contains("warden log consistency"));
}
