//! One append-only log over every attribution record, beside each session's hash chain. A chain
//! lets whoever holds the store rewrite a whole session and recompute its hashes; the log's
//! signed checkpoints, inclusion and consistency proofs (RFC 6962 / RFC 9162 Merkle tree,
//! C2SP tlog-checkpoint and signed-note) let anyone holding only the public key check that a
//! record was in the log, that the log only grew, and (with a witness) that everyone sees the
//! same log.
//!
//! Kept out of warden-core, which the proxy's filter compiles to wasm: the service (which keeps
//! and signs the log) and the CLI (which verifies it offline and witnesses it) share this crate,
//! the filter never needs it. The Merkle hashing and proofs are `tlog_tiles` (a port of Go's
//! `sumdb/tlog`), notes and Ed25519 keys `signed_note`: nothing of either is written by hand here
//! but the leaf format, the hash storage glue and the wire types.

mod keys;

use serde::{Deserialize, Serialize};

pub use keys::{
    generate_cosigner_key, generate_log_key, Cosigner, KeyRing, LogSigner, SessionHead, VerifiedCheckpoint, HEAD_HEADER,
};
pub use tlog_tiles::{Error as TreeError, Hash, HashReader, EMPTY_HASH};

/// Why a proof, note or key was refused: a sentence naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogError(pub String);

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LogError {}

fn err(m: impl Into<String>) -> LogError {
    LogError(m.into())
}

/// What a record is entered into the log as: its session, its place in the session and its
/// chain hash (which commits to its content and every record before it), as canonical JSON.
pub fn leaf_data(session_id: &str, seq: u64, chain_hash: &str) -> String {
    warden_core::canonical::to_string(&serde_json::json!({"hash": chain_hash, "seq": seq, "session_id": session_id}))
}

/// The Merkle leaf hash of a record: SHA-256(0x00 || leaf data), RFC 6962 section 2.1.
pub fn leaf_hash(session_id: &str, seq: u64, chain_hash: &str) -> Hash {
    tlog_tiles::record_hash(leaf_data(session_id, seq, chain_hash).as_bytes())
}

/// The hashes a store keeps when leaf `n` is appended, each with its storage index
/// (`tlog_tiles`' layout: the leaf, then every subtree it completes). Reads at most log2(n)
/// earlier hashes from `r`.
pub fn hashes_to_store<R: HashReader>(n: u64, leaf: Hash, r: &R) -> Result<Vec<(u64, Hash)>, LogError> {
    let first = tlog_tiles::stored_hash_index(0, n);
    let hashes = tlog_tiles::stored_hashes_for_record_hash(n, leaf, r).map_err(|e| err(format!("cannot extend the log: {e}")))?;
    Ok(hashes.into_iter().enumerate().map(|(i, h)| (first + i as u64, h)).collect())
}

/// The root hash of the log's first `size` leaves.
pub fn root<R: HashReader>(size: u64, r: &R) -> Result<Hash, LogError> {
    tlog_tiles::tree_hash(size, r).map_err(|e| err(format!("cannot compute the root of {size} leaves: {e}")))
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves (RFC 9162 section 2.1.3).
pub fn prove_inclusion<R: HashReader>(index: u64, size: u64, r: &R) -> Result<Vec<Hash>, LogError> {
    if index >= size {
        return Err(err(format!("leaf {index} is not in a tree of {size} leaves")));
    }
    tlog_tiles::prove_record(size, index, r).map_err(|e| err(format!("cannot prove leaf {index} in {size}: {e}")))
}

/// The consistency proof from the tree of `from` leaves to the tree of `to` (RFC 9162 section 2.1.4).
pub fn prove_consistency<R: HashReader>(from: u64, to: u64, r: &R) -> Result<Vec<Hash>, LogError> {
    if from > to {
        return Err(err(format!("no consistency proof from {from} leaves back to {to}")));
    }
    if from == 0 || from == to {
        return Ok(Vec::new());
    }
    tlog_tiles::prove_tree(to, from, r).map_err(|e| err(format!("cannot prove {from} consistent with {to}: {e}")))
}

/// Check that `leaf` is leaf `index` of the tree of `size` leaves whose root is `root`.
pub fn check_inclusion(proof: &[Hash], index: u64, size: u64, leaf: Hash, root: Hash) -> Result<(), LogError> {
    if index >= size {
        return Err(err(format!("leaf {index} cannot be in a tree of {size} leaves")));
    }
    tlog_tiles::check_record(&proof.to_vec(), size, root, index, leaf)
        .map_err(|_| err(format!("leaf {index} is not in the tree of {size} leaves with root {root} (its inclusion proof fails)")))
}

/// Check that the tree of `to` leaves with root `to_root` extends the tree of `from` leaves with
/// root `from_root`: the log only grew between them. Names a fork or a rollback.
pub fn check_consistency(proof: &[Hash], from: u64, from_root: Hash, to: u64, to_root: Hash) -> Result<(), LogError> {
    if to < from {
        return Err(err(format!("the log went backwards: {to} leaves after {from}")));
    }
    if from == to {
        return if from_root == to_root && proof.is_empty() {
            Ok(())
        } else {
            Err(err(format!("the log forked: two different roots for {from} leaves ({from_root} and {to_root})")))
        };
    }
    if from == 0 {
        return if proof.is_empty() { Ok(()) } else { Err(err("a consistency proof from the empty tree must be empty")) };
    }
    tlog_tiles::check_tree(&proof.to_vec(), to, to_root, from, from_root)
        .map_err(|_| err(format!("the log forked or was rewritten: the tree of {to} leaves does not extend the tree of {from} leaves (consistency proof fails)")))
}

/// Hashes on the wire as in checkpoints: standard base64.
pub fn encode(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(|h| h.to_string()).collect()
}

pub fn decode(hashes: &[String]) -> Result<Vec<Hash>, LogError> {
    hashes.iter().map(|s| decode_hash(s)).collect()
}

pub fn decode_hash(s: &str) -> Result<Hash, LogError> {
    Hash::parse_hash(s).map_err(|_| err(format!("{s:?} is not a base64 SHA-256 hash")))
}

/// `GET /v1/log/proof/inclusion`: a record's leaf and its path to the root of `tree_size` leaves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InclusionProof {
    pub session_id: String,
    pub seq: u64,
    /// The record's chain hash, hex: with `session_id` and `seq` it gives the leaf.
    pub hash: String,
    pub leaf_index: u64,
    pub tree_size: u64,
    pub proof: Vec<String>,
}

/// `GET /v1/log/proof/consistency`: the log of `to` leaves extends the log of `from`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    pub from: u64,
    pub to: u64,
    pub proof: Vec<String>,
}

/// A later checkpoint of a log with the consistency proofs from the earlier sizes an export's
/// evidence was proven at (`warden log consistency`): what `warden session verify --later`
/// checks an export against, offline, to show its log was not rewritten since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaterCheckpoint {
    /// The signed checkpoint note.
    pub checkpoint: String,
    pub proofs: Vec<ConsistencyProof>,
}

/// One record's place in the log, inside a session's evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeafProof {
    pub seq: u64,
    pub hash: String,
    pub leaf_index: u64,
    pub proof: Vec<String>,
}

/// `GET /v1/log/proof/session/{id}` and the `evidence` of an export: what a session's trail is
/// checked against offline with only the log's public key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEvidence {
    pub session_id: String,
    /// The signed checkpoint every proof below is against.
    pub checkpoint: String,
    /// The session's head in the log at the checkpoint (`SessionHead`), a signed note: what
    /// says how many records the session had, so a removed tail is named.
    pub head: String,
    /// Each of the session's records in the log at the checkpoint, in sequence order.
    pub leaves: Vec<LeafProof>,
}

#[cfg(test)]
mod tests;
