//! The attribution trail's hash chain. Each record commits to the previous record of its session,
//! so altering, removing or reordering a stored record breaks every hash after it. The service
//! computes it on append; `warden session verify` recomputes it from what is stored.

use crate::hash::{hex, sha256};
use crate::wire::TrailEntry;

/// The `prev_hash` of a session's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `sha256(prev_hash || "\n" || body)`, hex.
pub fn chain_hash(prev_hash: &str, body: &str) -> String {
    let mut buf = Vec::with_capacity(prev_hash.len() + 1 + body.len());
    buf.extend_from_slice(prev_hash.as_bytes());
    buf.push(b'\n');
    buf.extend_from_slice(body.as_bytes());
    hex(&sha256(&buf))
}

/// Why a trail does not verify, naming the first bad entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub seq: u64,
    pub step: u64,
    pub why: String,
}

/// Check a session's trail in stored order: sequence without gaps, each `prev_hash` equal to the
/// previous hash, each hash recomputed from the stored body, and the parsed record equal to the
/// body (so a column edited beside the body is caught too).
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
        if chain_hash(&prev, &e.body) != e.hash {
            return Err(broken("its content does not match its hash (the record was altered)".into()));
        }
        match serde_json::from_str::<crate::wire::StepRecord>(&e.body) {
            Ok(r) if r == e.record => {}
            _ => return Err(broken("the stored fields differ from the hashed record (the record was altered)".into())),
        }
        prev = e.hash.clone();
    }
    Ok(())
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
                let body = serde_json::to_string(&record).unwrap();
                let hash = chain_hash(&prev, &body);
                let e = TrailEntry { seq: i, record, body, prev_hash: prev.clone(), hash: hash.clone() };
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
}
