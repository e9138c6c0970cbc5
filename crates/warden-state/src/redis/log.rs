//! The append-only log on Redis. The log is global, so its keys share their own hash tag
//! (`{log}`) and cannot be written in a session's script on a Cluster: a record is first
//! appended to its session (`session::append`), then entered into the log by `LOG_APPEND`, a
//! compare-and-swap on the log's size and epoch that writes the leaves, their stored tree hashes
//! (computed in Rust by `warden_log::hashes_to_store`) and an index `seq\nsession → leaf`. The
//! append is answered only after both. A record whose leaf is missing (the replica died between
//! the two) is a duplicate when the proxy retries its batch, and the retry enters its leaf.
//!
//! One writer task per replica groups the leaves of every append waiting into one log write
//! (the log is the one place all writes meet); replicas race on the size and retry.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use redis::AsyncCommands;
use tokio::sync::{mpsc, oneshot};
use warden_log::{Hash, HashReader, InclusionProof, LeafProof, LogSigner, TreeError};

use super::conn::Conn;
use super::metrics::Metrics;
use super::{backend, keys, scripts};
use crate::store::StoreError;

/// A record's place in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub session_id: String,
    pub seq: u64,
    /// The record's chain hash (hex).
    pub hash: String,
}

fn tree(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("log: {e}"))
}

/// Stored hashes never change once written (within an epoch), so a reader may keep any it saw.
/// A `HashReader` over what is known so far; it notes the indexes it lacked, which the caller
/// fetches before running the computation again (`HashReader` is synchronous, Redis is not).
struct Known<'a> {
    known: &'a HashMap<u64, Hash>,
    missing: RefCell<Vec<u64>>,
}

impl HashReader for Known<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, TreeError> {
        let mut out = Vec::with_capacity(indexes.len());
        for i in indexes {
            match self.known.get(i) {
                Some(h) => out.push(*h),
                None => self.missing.borrow_mut().push(*i),
            }
        }
        if self.missing.borrow().is_empty() {
            Ok(out)
        } else {
            Err(TreeError::IndexesNotInTree)
        }
    }
}

/// Fetch stored hashes into `known`. False if one is not stored.
async fn fetch(conn: &mut Conn, known: &mut HashMap<u64, Hash>, mut indexes: Vec<u64>) -> Result<bool, StoreError> {
    indexes.sort_unstable();
    indexes.dedup();
    let got: Vec<Option<Vec<u8>>> = redis::cmd("HMGET").arg(keys::log::hashes()).arg(&indexes).query_async(conn).await.map_err(backend)?;
    for (i, h) in indexes.iter().zip(got) {
        match h.and_then(|b| <[u8; 32]>::try_from(b).ok()) {
            Some(b) => {
                known.insert(*i, Hash(b));
            }
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// Run a tree computation, fetching from Redis whatever hashes it needs that `known` lacks.
async fn with_hashes<T>(
    conn: &mut Conn,
    known: &mut HashMap<u64, Hash>,
    f: impl Fn(&Known<'_>) -> Result<T, warden_log::LogError>,
) -> Result<T, StoreError> {
    loop {
        let missing = {
            let r = Known { known, missing: RefCell::new(Vec::new()) };
            let res = f(&r);
            let missing = r.missing.into_inner();
            if missing.is_empty() {
                return res.map_err(tree);
            }
            missing
        };
        if !fetch(conn, known, missing).await? {
            return Err(tree("a stored tree hash the log needs is missing"));
        }
    }
}

/// The log's size and epoch.
async fn meta(conn: &mut Conn) -> Result<(u64, String, Option<u64>), StoreError> {
    let (size, epoch, checkpoint): (Option<u64>, Option<String>, Option<u64>) =
        redis::cmd("HMGET").arg(keys::log::meta()).arg("size").arg("epoch").arg("checkpoint").query_async(conn).await.map_err(backend)?;
    Ok((size.unwrap_or(0), epoch.unwrap_or_default(), checkpoint))
}

pub async fn size(conn: &mut Conn) -> Result<u64, StoreError> {
    Ok(meta(conn).await?.0)
}

type Job = (Vec<Leaf>, oneshot::Sender<Result<(), String>>);

/// The replica's log writer: `enter` hands it leaves and waits until they are in the log.
#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::UnboundedSender<Job>,
}

impl LogWriter {
    pub fn start(conn: Conn, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, metrics, rx));
        Self { tx }
    }

    /// Enter the leaves (those not in the log yet), in order; resolves once they are stored.
    pub async fn enter(&self, leaves: Vec<Leaf>) -> Result<(), StoreError> {
        if leaves.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.tx.send((leaves, tx)).map_err(|_| tree("the log writer has stopped"))?;
        rx.await.map_err(|_| tree("the log writer has stopped"))?.map_err(StoreError::Backend)
    }
}

/// The hashes this replica has seen, for one epoch of the log (bounded), and the log's size and
/// epoch as its last write left them (where the next write starts; a stale one only loses its
/// compare-and-swap, which answers with the log's size).
struct Cache {
    epoch: String,
    hashes: HashMap<u64, Hash>,
    tip: Option<(u64, String)>,
}

const CACHE_MAX: usize = 200_000;
/// Leaves per log write (a record batch holds at most 1000).
const MAX_LEAVES_PER_WRITE: usize = 1000;

async fn run(mut conn: Conn, metrics: Arc<Metrics>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut cache = Cache { epoch: String::new(), hashes: HashMap::new(), tip: None };
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut n = jobs[0].0.len();
        // A group stays within what one script takes in (Lua unpacks at most 8000 values).
        while n < MAX_LEAVES_PER_WRITE {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.0.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let leaves: Vec<Leaf> = jobs.iter().flat_map(|(l, _)| l.iter().cloned()).collect();
        let mut res = Ok(());
        for chunk in leaves.chunks(MAX_LEAVES_PER_WRITE) {
            res = enter_all(&mut conn, &metrics, &mut cache, chunk.to_vec()).await.map_err(|e| e.to_string());
            if res.is_err() {
                break;
            }
        }
        for (_, reply) in jobs {
            let _ = reply.send(res.clone());
        }
    }
}

fn new_epoch() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{now:x}-{}", std::process::id())
}

async fn enter_all(conn: &mut Conn, metrics: &Metrics, cache: &mut Cache, leaves: Vec<Leaf>) -> Result<(), StoreError> {
    let fields: Vec<String> = leaves.iter().map(|l| keys::log::index_field(&l.session_id, l.seq)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut pending: Vec<(&Leaf, &String)> = leaves.iter().zip(&fields).filter(|(_, f)| seen.insert(f.as_str())).collect();
    // Fresh records are not in the log: look only once a write says one is (another replica
    // entered a retried batch's leaf meanwhile).
    let mut look = false;
    for attempt in 0..1000u32 {
        if look {
            let fs: Vec<&String> = pending.iter().map(|(_, f)| *f).collect();
            let present: Vec<Option<u64>> = redis::cmd("HMGET").arg(keys::log::index()).arg(&fs).query_async(conn).await.map_err(backend)?;
            pending = pending.into_iter().zip(present).filter(|(_, p)| p.is_none()).map(|(l, _)| l).collect();
        }
        if pending.is_empty() {
            return Ok(());
        }
        // The log's size and epoch as this replica last left them, or read.
        let (size, epoch) = match cache.tip.take() {
            Some(t) => t,
            None => {
                let (size, epoch, _) = meta(conn).await?;
                (size, epoch)
            }
        };
        if epoch != cache.epoch || cache.hashes.len() > CACHE_MAX {
            *cache = Cache { epoch: epoch.clone(), hashes: HashMap::new(), tip: None };
        }
        let mut stored = Vec::new();
        let outcome = write_leaves(conn, cache, &pending, size, &epoch, &mut stored).await;
        if !matches!(outcome, Ok(Written::Yes { .. })) {
            // Not known to be written: nothing computed from this size may stay in the cache.
            for (i, _) in &stored {
                cache.hashes.remove(i);
            }
        }
        match outcome? {
            Written::Yes { size, epoch } => {
                cache.tip = Some((size, epoch));
                metrics.log_leaves.fetch_add(pending.len() as u64, Ordering::Relaxed);
                metrics.log_writes.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            // Another replica extended the log first: what was computed from its size is void.
            Written::Moved { size, epoch } => cache.tip = Some((size, epoch)),
            Written::Present { size, epoch } => {
                cache.tip = Some((size, epoch));
                look = true;
            }
        }
        metrics.log_retries.fetch_add(1, Ordering::Relaxed);
        if attempt >= 2 {
            tokio::time::sleep(std::time::Duration::from_micros(100 << attempt.min(6))).await;
        }
    }
    Err(tree("the log write lost 1000 compare-and-swaps in a row"))
}

/// What a log write did, with the log's size and epoch after it.
enum Written {
    Yes { size: u64, epoch: String },
    /// The log was not at the size the write was computed from.
    Moved { size: u64, epoch: String },
    /// One of the leaves is in the log already.
    Present { size: u64, epoch: String },
}

/// Compute the pending leaves' stored hashes from a log of `size` leaves (in `stored`, and in
/// the cache: the next leaf's computation reads them) and write them if the log is unchanged.
async fn write_leaves(
    conn: &mut Conn,
    cache: &mut Cache,
    pending: &[(&Leaf, &String)],
    size: u64,
    epoch: &str,
    stored: &mut Vec<(u64, Hash)>,
) -> Result<Written, StoreError> {
    for (j, (leaf, _)) in pending.iter().enumerate() {
        let n = size + j as u64;
        let lh = warden_log::leaf_hash(&leaf.session_id, leaf.seq, &leaf.hash);
        let hs = with_hashes(conn, &mut cache.hashes, |r| warden_log::hashes_to_store(n, lh, r)).await?;
        cache.hashes.extend(hs.iter().copied());
        stored.extend(hs);
    }
    let mut inv = scripts::LOG_APPEND.prepare_invoke();
    inv.key(keys::log::meta()).key(keys::log::leaves()).key(keys::log::hashes()).key(keys::log::index());
    // Runs of consecutive leaves of one session: one sorted-set write each.
    let mut groups: Vec<(&str, Vec<u64>)> = Vec::new();
    for (leaf, _) in pending {
        match groups.last_mut() {
            Some((sid, seqs)) if *sid == leaf.session_id => seqs.push(leaf.seq),
            _ => groups.push((&leaf.session_id, vec![leaf.seq])),
        }
    }
    for (sid, _) in &groups {
        inv.key(keys::log::session(sid));
    }
    inv.arg(size).arg(epoch).arg(new_epoch()).arg(pending.len());
    for (_, field) in pending {
        inv.arg(field.as_str());
    }
    for (leaf, _) in pending {
        inv.arg(warden_log::leaf_data(&leaf.session_id, leaf.seq, &leaf.hash));
    }
    inv.arg(groups.len());
    for (_, seqs) in &groups {
        inv.arg(seqs.len());
        for seq in seqs {
            inv.arg(*seq);
        }
    }
    inv.arg(stored.len());
    for (i, h) in stored.iter() {
        inv.arg(*i).arg(h.0.as_slice());
    }
    let (result, now, epoch_now): (i64, i64, String) = inv.invoke_async(conn).await.map_err(backend)?;
    let size_now = now.max(0) as u64;
    Ok(match result {
        r if r > 0 => {
            if epoch_now != cache.epoch {
                // The log was created by this write: what was computed is its first hashes.
                cache.epoch = epoch_now.clone();
            }
            Written::Yes { size: size_now, epoch: epoch_now }
        }
        -2 => Written::Present { size: size_now, epoch: epoch_now },
        _ => Written::Moved { size: size_now, epoch: epoch_now },
    })
}

/// Which of these records' leaves are in the log.
pub async fn present(conn: &mut Conn, leaves: &[(String, u64)]) -> Result<Vec<bool>, StoreError> {
    if leaves.is_empty() {
        return Ok(Vec::new());
    }
    let fields: Vec<String> = leaves.iter().map(|(s, q)| keys::log::index_field(s, *q)).collect();
    let got: Vec<Option<u64>> = redis::cmd("HMGET").arg(keys::log::index()).arg(&fields).query_async(conn).await.map_err(backend)?;
    Ok(got.iter().map(Option::is_some).collect())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredCheckpoint {
    root: String,
    note: String,
    at_ms: u64,
}

async fn checkpoint_at(conn: &mut Conn, size: u64) -> Result<Option<StoredCheckpoint>, StoreError> {
    let text: Option<String> = conn.hget(keys::log::checkpoints(), size).await.map_err(backend)?;
    text.map(|t| serde_json::from_str(&t).map_err(backend)).transpose()
}

/// The latest checkpoint: (tree size, signed note).
pub async fn latest(conn: &mut Conn) -> Result<Option<(u64, String)>, StoreError> {
    let Some(size) = meta(conn).await?.2 else { return Ok(None) };
    Ok(checkpoint_at(conn, size).await?.map(|c| (size, c.note)))
}

/// Sign a checkpoint of the log as it is now unless the latest covers it; refuse when the log no
/// longer extends the latest (read afresh from Redis, never from a cache).
pub async fn checkpoint(conn: &mut Conn, signer: &LogSigner, now_ms: u64) -> Result<(u64, String), StoreError> {
    let (n, _, latest) = meta(conn).await?;
    let mut known = HashMap::new();
    if let Some(size) = latest {
        let Some(cp) = checkpoint_at(conn, size).await? else { return Err(tree(format!("checkpoint {size} is named but not stored"))) };
        if n < size {
            return Err(StoreError::Backend(format!(
                "the log has {n} leaves, fewer than its last checkpoint's {size}: the store was rolled back or cut; no checkpoint signed"
            )));
        }
        let root = with_hashes(conn, &mut known, |r| warden_log::root(size, r)).await?;
        if root.to_string() != cp.root {
            return Err(StoreError::Backend(format!(
                "the log's first {size} leaves are not those of its last checkpoint: the store was rewritten; no checkpoint signed"
            )));
        }
        if n == size {
            return Ok((size, cp.note));
        }
    }
    let root = with_hashes(conn, &mut known, |r| warden_log::root(n, r)).await?;
    let note = signer.checkpoint(n, root).map_err(tree)?;
    let cp = serde_json::to_string(&StoredCheckpoint { root: root.to_string(), note: note.clone(), at_ms: now_ms }).map_err(backend)?;
    let _: i64 = scripts::CHECKPOINT_STORE.key(keys::log::meta()).key(keys::log::checkpoints()).arg(n).arg(cp).invoke_async(conn).await.map_err(backend)?;
    Ok((n, note))
}

pub async fn consistency(conn: &mut Conn, from: u64, to: u64) -> Result<Option<Vec<String>>, StoreError> {
    if to > size(conn).await? || from > to {
        return Ok(None);
    }
    let proof = with_hashes(conn, &mut HashMap::new(), |r| warden_log::prove_consistency(from, to, r)).await?;
    Ok(Some(warden_log::encode(&proof)))
}

/// A leaf's data: (session, seq, chain hash).
fn parse_leaf(data: &str) -> Result<(String, u64, String), StoreError> {
    #[derive(serde::Deserialize)]
    struct L {
        session_id: String,
        seq: u64,
        hash: String,
    }
    let l: L = serde_json::from_str(data).map_err(backend)?;
    Ok((l.session_id, l.seq, l.hash))
}

pub async fn inclusion(conn: &mut Conn, session_id: &str, seq: u64, tree_size: u64) -> Result<Option<InclusionProof>, StoreError> {
    if tree_size > size(conn).await? {
        return Ok(None);
    }
    let idx: Option<u64> = conn.hget(keys::log::index(), keys::log::index_field(session_id, seq)).await.map_err(backend)?;
    let Some(idx) = idx.filter(|i| *i < tree_size) else { return Ok(None) };
    let data: Option<String> = conn.hget(keys::log::leaves(), idx).await.map_err(backend)?;
    let Some(data) = data else { return Err(tree(format!("leaf {idx} is indexed but not stored"))) };
    let (_, _, hash) = parse_leaf(&data)?;
    let proof = with_hashes(conn, &mut HashMap::new(), |r| warden_log::prove_inclusion(idx, tree_size, r)).await?;
    Ok(Some(InclusionProof { session_id: session_id.to_string(), seq, hash, leaf_index: idx, tree_size, proof: warden_log::encode(&proof) }))
}

/// Every leaf of a session among the first `tree_size`, in sequence order, with its proof. Read
/// from the log, not from the records.
pub async fn session_leaves(conn: &mut Conn, session_id: &str, tree_size: u64) -> Result<Vec<LeafProof>, StoreError> {
    let members: Vec<(u64, f64)> = conn.zrange_withscores(keys::log::session(session_id), 0, -1).await.map_err(backend)?;
    let idxs: Vec<u64> = members.into_iter().map(|(i, _)| i).filter(|i| *i < tree_size).collect();
    if idxs.is_empty() {
        return Ok(Vec::new());
    }
    let data: Vec<Option<String>> = redis::cmd("HMGET").arg(keys::log::leaves()).arg(&idxs).query_async(conn).await.map_err(backend)?;
    let mut known = HashMap::new();
    let mut out = Vec::with_capacity(idxs.len());
    for (idx, d) in idxs.into_iter().zip(data) {
        let Some(d) = d else { return Err(tree(format!("leaf {idx} is indexed but not stored"))) };
        let (_, seq, hash) = parse_leaf(&d)?;
        let proof = with_hashes(conn, &mut known, |r| warden_log::prove_inclusion(idx, tree_size, r)).await?;
        out.push(LeafProof { seq, hash, leaf_index: idx, proof: warden_log::encode(&proof) });
    }
    out.sort_by_key(|l| l.seq);
    Ok(out)
}
