//! The attribution trail's hash chain. Each record commits to the previous record of its session,
//! so altering, removing or reordering a stored record breaks every hash after it. The service
//! computes it on append; `warden session verify` recomputes it from what is stored.
//!
//! Two versions of the rule, one per record (`TrailEntry::hash_version`), because a stored
//! hash is never recomputed (that would launder whatever the history held): version 1 hashed
//! the record's JSON text exactly as the service had written it; version 2, for every record
//! appended since, hashes its canonical JSON form (`canonical`, RFC 8785), so a record whose
//! JSON is re-written by another formatter keeps its hash and a changed value never does.

use std::borrow::Cow;

use crate::canonical;
use crate::hash::{hex, sha256};
use crate::wire::{SessionHead, StepRecord, TrailEntry};

/// The `prev_hash` of a session's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash was taken over the body's text as stored (records written before version 2).
pub const HASH_V1: u8 = 1;
/// The hash is taken over the record's canonical JSON form, which is also its stored body.
pub const HASH_V2: u8 = 2;

/// The version of entries that do not say (exports written before versions existed).
pub fn legacy_hash_version() -> u8 {
    HASH_V1
}

/// `sha256(prev_hash || "\n" || body)`, hex.
pub fn chain_hash(prev_hash: &str, body: &str) -> String {
    let mut buf = Vec::with_capacity(prev_hash.len() + 1 + body.len());
    buf.extend_from_slice(prev_hash.as_bytes());
    buf.push(b'\n');
    buf.extend_from_slice(body.as_bytes());
    hex(&sha256(&buf))
}

/// A new record's body: its canonical JSON form, what a version 2 hash is taken over.
pub fn canonical_body(record: &StepRecord) -> Result<String, serde_json::Error> {
    Ok(canonical::to_string(&serde_json::to_value(record)?))
}

/// The text an entry's hash is taken over, by its version.
pub fn hashed_text(e: &TrailEntry) -> Result<Cow<'_, str>, String> {
    match e.hash_version {
        HASH_V1 => Ok(Cow::Borrowed(&e.body)),
        HASH_V2 => canonical::of_text(&e.body).map(Cow::Owned).map_err(|e| format!("its body is not JSON ({e})")),
        v => Err(format!("unknown hash version {v}")),
    }
}

/// Two records are the same when their canonical forms are: how their JSON was written
/// (the recorded policy input is carried as text) does not matter, any value does.
pub fn same_record(a: &StepRecord, b: &StepRecord) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(x), Ok(y)) => canonical::to_string(&x) == canonical::to_string(&y),
        _ => false,
    }
}

/// Why a trail does not verify, naming the first bad entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub seq: u64,
    pub step: u64,
    pub why: String,
}

/// Check a session's trail in stored order: sequence without gaps, each `prev_hash` equal to the
/// previous hash, each hash recomputed from the stored body by the entry's rule, and the parsed
/// record equal to the body (so a column edited beside the body is caught too).
pub fn verify(entries: &[TrailEntry]) -> Result<(), Broken> {
    let mut prev = GENESIS.to_string();
    for (i, e) in entries.iter().enumerate() {
        let broken = |why: String| Broken { seq: e.seq, step: e.record.step, why };
        if e.seq != i as u64 + 1 {
            return Err(broken(format!("sequence number {} where {} was expected (a record was removed or reordered)", e.seq, i + 1)));
        }
        if e.prev_hash != prev {
            return Err(broken("does not follow the previous record (a record was removed, inserted or reordered)".into()));
        }
        let text = hashed_text(e).map_err(|why| broken(format!("{why} (the record was altered)")))?;
        if chain_hash(&prev, &text) != e.hash {
            return Err(broken("its content does not match its hash (the record was altered)".into()));
        }
        match serde_json::from_str::<StepRecord>(&e.body) {
            Ok(r) if same_record(&r, &e.record) => {}
            _ => return Err(broken("the stored fields differ from the hashed record (the record was altered)".into())),
        }
        prev = e.hash.clone();
    }
    Ok(())
}

/// Check a trail against its session's head (`whose` says which: the store's, or a signed
/// one): a trail shorter than its head lost its tail, a longer one gained records, a different
/// last hash was rewritten.
pub fn verify_head(entries: &[TrailEntry], head: &SessionHead, whose: &str) -> Result<(), String> {
    let n = entries.len() as u64;
    if n < head.records {
        let missing = head.records - n;
        return Err(format!("the last {missing} record(s) are missing: {whose} says {} records, the trail has {n} (truncated)", head.records));
    }
    if n > head.records {
        return Err(format!("record {} and after are beyond {whose}: it says {} records, the trail has {n} (inserted)", head.records + 1, head.records));
    }
    match entries.last() {
        Some(last) if last.hash != head.hash => {
            Err(format!("the last record's hash is not {whose}'s (the session was rewritten up to record {})", last.seq))
        }
        None if head.hash != GENESIS => Err(format!("the trail is empty, but {whose} names a last record")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::StepRecord;

    fn chain(n: u64) -> Vec<TrailEntry> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|i| {
                let record = StepRecord { session_id: "s".into(), step: i, decision_id: format!("d{i}"), action: "allow".into(), ..Default::default() };
                let body = canonical_body(&record).unwrap();
                let hash = chain_hash(&prev, &body);
                let e = TrailEntry { seq: i, record, body, prev_hash: prev.clone(), hash: hash.clone(), hash_version: HASH_V2 };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn an_intact_trail_verifies() {
        assert_eq!(verify(&chain(5)), Ok(()));
        assert_eq!(verify(&[]), Ok(()));
    }

    #[test]
    fn alteration_removal_and_reordering_are_caught_at_the_right_step() {
        let mut t = chain(5);
        t[2].body = t[2].body.replace("allow", "deny");
        assert_eq!(verify(&t).unwrap_err().step, 3);

        let mut t = chain(5);
        t[3].record.action = "deny".into();
        assert_eq!(verify(&t).unwrap_err().step, 4);

        let mut t = chain(5);
        t.remove(1);
        assert_eq!(verify(&t).unwrap_err().seq, 3);

        let mut t = chain(5);
        t.swap(1, 2);
        assert_eq!(verify(&t).unwrap_err().step, 3);
    }

    /// A trail as the service wrote it before hash version 2: each body the record's
    /// serde_json text (struct order), hashed exactly as written.
    fn legacy_chain(n: u64) -> Vec<TrailEntry> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|i| {
                let record = StepRecord { session_id: "s".into(), step: i, decision_id: format!("d{i}"), action: "allow".into(), risk: 0.35, ..Default::default() };
                let body = serde_json::to_string(&record).unwrap();
                let hash = chain_hash(&prev, &body);
                let e = TrailEntry { seq: i, record, body, prev_hash: prev.clone(), hash: hash.clone(), hash_version: HASH_V1 };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn records_of_both_versions_verify_by_their_own_rule() {
        assert_eq!(verify(&legacy_chain(3)), Ok(()));
        // A session whose first records predate version 2 goes on with version 2 records.
        let mut t = legacy_chain(2);
        let record = StepRecord { session_id: "s".into(), step: 3, decision_id: "d3".into(), action: "deny".into(), ..Default::default() };
        let body = canonical_body(&record).unwrap();
        let hash = chain_hash(&t[1].hash, &body);
        t.push(TrailEntry { seq: 3, record, body, prev_hash: t[1].hash.clone(), hash, hash_version: HASH_V2 });
        assert_eq!(verify(&t), Ok(()));
        // A legacy record relabelled version 2 no longer matches its hash (its text is not canonical).
        let mut bad = t.clone();
        bad[0].hash_version = HASH_V2;
        assert_eq!(verify(&bad).unwrap_err().seq, 1);
        let mut bad = t;
        bad[2].hash_version = 7;
        assert!(verify(&bad).unwrap_err().why.contains("unknown hash version 7"));
    }

    #[test]
    fn a_reformatted_body_or_record_keeps_its_hash_and_a_changed_value_does_not() {
        let mut t = chain(3);
        for e in &mut t {
            // Another formatter: pretty-printed, keys reordered by it, 0 written as 0.0.
            let v: serde_json::Value = serde_json::from_str(&e.body).unwrap();
            e.body = serde_json::to_string_pretty(&v).unwrap().replace("\"risk\": 0", "\"risk\": 0.0");
        }
        assert_eq!(verify(&t), Ok(()));
        t[1].body = t[1].body.replace("\"d2\"", "\"d9\"");
        assert_eq!(verify(&t).unwrap_err().step, 2);
    }

    #[test]
    fn a_recorded_input_written_another_way_is_the_same_record() {
        let mut t = chain(2);
        let input = crate::wire::RecordedInput::new(&serde_json::json!({"b": 1, "a": [1.5, "x"]})).unwrap();
        t[1].record.input = Some(input);
        t[1].body = canonical_body(&t[1].record).unwrap();
        t[1].hash = chain_hash(&t[0].hash, &t[1].body);
        // What a reader of a reformatted export gets: the same input, spaced and reordered.
        let spaced: crate::wire::RecordedInput = serde_json::from_str("{ \"a\": [1.50, \"x\"],\n \"b\": 1.0 }").unwrap();
        t[1].record.input = Some(spaced);
        assert_eq!(verify(&t), Ok(()));
        t[1].record.input = Some(serde_json::from_str("{\"a\": [1.5, \"y\"], \"b\": 1}").unwrap());
        assert_eq!(verify(&t).unwrap_err().step, 2);
    }
}
