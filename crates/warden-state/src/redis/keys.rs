//! Every key the Redis store writes. A session's keys share the hash tag `{<session id>}`, so
//! they live in one hash slot (one node of a Redis Cluster) and one Lua script can change them
//! together. The log, the revocation feed, a credential's subjects and the search indexes each
//! have their own keys (and slots): they are written after the session, idempotently.
//!
//! A session id is 1-256 visible ASCII characters (`validate`) and may itself contain `{` or
//! `}`: Redis hashes the text between the first `{` and the first `}` after it (the whole key
//! when that text is empty), which for `warden:{s:<id>}:<suffix>` is never empty and the same
//! for every suffix, so a session's keys still share one slot.

/// The prefix of every key: one Redis may hold other data beside it.
pub const PREFIX: &str = "warden";

/// The session's hash: `state` (the `SessionState`, JSON), `ver` (bumped by every write: the
/// compare-and-swap's version), `records`, `head`, `revoked_at_ms`, `revoke_reason`, `fed` (the
/// revocation's cursor in the feed, once it is there).
pub fn session(id: &str) -> String {
    format!("{PREFIX}:{{s:{id}}}:s")
}

/// The session's records, in sequence order (a list; entry `seq - 1` is record `seq`).
pub fn records(id: &str) -> String {
    format!("{PREFIX}:{{s:{id}}}:r")
}

/// Which records are stored: field `<step>\n<decision id>` → seq (what makes retries
/// duplicates), and field `<step>` → the decision id first stored for that step.
pub fn dedupe(id: &str) -> String {
    format!("{PREFIX}:{{s:{id}}}:d")
}

/// The session's audit events, in order (a list of JSON `AuditEvent`s).
pub fn audit(id: &str) -> String {
    format!("{PREFIX}:{{s:{id}}}:a")
}

pub fn dedupe_field(step: u64, decision_id: &str) -> String {
    format!("{step}\n{decision_id}")
}

/// The append-only log: one hash tag, so its keys are in one slot and one script extends it.
pub mod log {
    use super::PREFIX;

    /// `size` (leaves), `epoch` (random, set when the log is created: a log emptied and
    /// rebuilt behind a running replica is a new epoch), `checkpoint` (latest signed size).
    pub fn meta() -> String {
        format!("{PREFIX}:{{log}}:m")
    }
    /// Leaf index → its leaf data (`warden_log::leaf_data`: session, seq, chain hash).
    pub fn leaves() -> String {
        format!("{PREFIX}:{{log}}:l")
    }
    /// Stored hash index (`tlog_tiles`' layout) → 32 bytes.
    pub fn hashes() -> String {
        format!("{PREFIX}:{{log}}:h")
    }
    /// `<seq>\n<session id>` → leaf index: whether a record is in the log, and where.
    pub fn index() -> String {
        format!("{PREFIX}:{{log}}:i")
    }
    pub fn index_field(session_id: &str, seq: u64) -> String {
        format!("{seq}\n{session_id}")
    }
    /// A session's leaves: a sorted set, score seq, member the leaf index.
    pub fn session(id: &str) -> String {
        format!("{PREFIX}:{{log}}:s:{id}")
    }
    /// Signed checkpoints: tree size → JSON {root, note, at_ms}.
    pub fn checkpoints() -> String {
        format!("{PREFIX}:{{log}}:c")
    }
}

/// The revocation feed: a counter (the cursor) and its entries, in one slot.
pub mod feed {
    use super::PREFIX;

    /// INCR gives the next cursor.
    pub fn counter() -> String {
        format!("{PREFIX}:{{feed}}:n")
    }
    /// Sorted set: score and member the cursor.
    pub fn cursors() -> String {
        format!("{PREFIX}:{{feed}}:z")
    }
    /// Cursor → JSON {session_id, at_ms, reason}.
    pub fn entries() -> String {
        format!("{PREFIX}:{{feed}}:e")
    }
    /// Session id → its cursor: a revocation enters the feed once, however often it is retried.
    pub fn by_session() -> String {
        format!("{PREFIX}:{{feed}}:b")
    }
}

/// Which subjects presented a credential: a sorted set, score first seen (ms), member subject.
pub fn credential_subjects(credential: &str) -> String {
    format!("{PREFIX}:cred:{{c:{credential}}}")
}

/// A subject's behavioural profile: hash `p` (the `Profile`, JSON), `ver` (its compare-and-swap
/// version).
/// A DPoP proof's use (`ProofUse::id`): set once, expiring when no proxy would accept the proof.
pub fn proof(id: &str) -> String {
    format!("{PREFIX}:{{dpop:{id}}}")
}

pub fn profile(subject: &str) -> String {
    format!("{PREFIX}:profile:{{p:{subject}}}")
}

/// Search indexes (each its own key, written after the session: search is eventually consistent).
pub mod index {
    use super::PREFIX;

    /// Every session: sorted set, score started_at_ms.
    pub fn started() -> String {
        format!("{PREFIX}:ix:started")
    }
    /// A subject's sessions: sorted set, score started_at_ms.
    pub fn subject(subject: &str) -> String {
        format!("{PREFIX}:ix:subject:{subject}")
    }
    /// Sessions with a record of this credential (set).
    pub fn credential(credential: &str) -> String {
        format!("{PREFIX}:ix:credential:{credential}")
    }
    /// Sessions with a record of this workload (set).
    pub fn workload(workload: &str) -> String {
        format!("{PREFIX}:ix:workload:{workload}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The text Redis Cluster hashes: between the first `{` and the first `}` after it.
    fn hash_tag(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    #[test]
    fn a_session_s_keys_share_one_hash_tag_whatever_its_id() {
        for id in ["s1", "a}b", "{x}", "}{", "ses_{}", "x{"] {
            let keys = [session(id), records(id), dedupe(id), audit(id)];
            let tags: Vec<&str> = keys.iter().map(|k| hash_tag(k)).collect();
            assert!(tags.iter().all(|t| *t == tags[0] && t.starts_with("s:")), "{id}: {tags:?}");
        }
        assert_eq!(hash_tag(&log::meta()), "log");
        assert_eq!(hash_tag(&log::session("a}b")), "log");
        assert_eq!(hash_tag(&feed::entries()), "feed");
    }
}
