//! The Redis store (`--store redis://…`, `rediss://…`, `redis+cluster://h1:p1,h2:p2`): many
//! state replicas share one Redis or Redis Cluster, so every proxy and replica sees one view of
//! every session.
//!
//! The guarantees are SQLite's, kept another way (docs/ARCHITECTURE.md, "The Redis store"):
//! - A session's keys share the hash tag `{s:<id>}` (`keys`); every change to a session is one
//!   compare-and-swap on its version (`session`): read, compute with warden-core's rules in
//!   Rust, write with a Lua script only if nothing changed, else recompute. Begin-steps and
//!   record appends are therefore atomic per session under any number of replicas.
//! - The log is global (`{log}`): a record enters it after its session's write, by a second
//!   compare-and-swap on the log's size (`log`); the append is answered after both.
//! - A revocation is first set on the session (so the next begin-step is refused at once), then
//!   entered into the feed once (`FEED_APPEND`); the feed's cursor is a Redis counter, the same
//!   for every replica.
//! - Search indexes are separate keys written after the session: search is eventually
//!   consistent for a moment, the session itself never is.
//!
//! Durability is Redis's: see README, "Running many proxies".

mod conn;
pub mod import;
mod keys;
mod log;
mod metrics;
mod scripts;
mod session;

use std::collections::HashSet;
use std::sync::Arc;

use redis::AsyncCommands;
use warden_core::wire::{
    AppendResult, BeginResponse, BeginStep, RefusedRecord, Revocation, RevocationFeed, SessionHead, SessionSummary, SessionView, StepRecord,
};
use warden_core::profile::Profile;
use warden_log::{InclusionProof, LeafProof, LogSigner};

pub use conn::{cluster_nodes, is_redis_url, redacted};
use conn::Conn;
use log::{Leaf, LogWriter};
use metrics::{Metrics, Op};
pub use session::StoredRecord;
use session::NewSession;

use crate::store::{Search, Store, StoreError, StoreFuture};

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

pub struct RedisStore {
    conn: Conn,
    log: LogWriter,
    metrics: Arc<Metrics>,
    /// This replica's last view of the sessions it began steps of.
    seen: session::Seen,
    /// Profiles this replica read or wrote lately (`session::PROFILE_TTL`).
    profiles: Arc<session::Profiles>,
    learner: session::Learner,
}

impl RedisStore {
    /// Connect to `url` (see `conn`). Must run inside a tokio runtime (the log writer is a task).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let conn = conn::connect(url).await?;
        let metrics = Arc::new(Metrics::default());
        let log = LogWriter::start(conn.clone(), metrics.clone());
        let profiles = Arc::new(session::Profiles::default());
        let learner = session::Learner::start(conn.clone(), metrics.clone(), profiles.clone());
        Ok(Self { conn, log, metrics, seen: session::Seen::default(), profiles, learner })
    }

    /// Run `f` on a connection, timed and counted as `op`.
    fn run<'a, T: Send + 'a, F>(&'a self, op: Op, f: impl FnOnce(Conn, &'a Self) -> F + Send + 'a) -> StoreFuture<'a, T>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'a,
    {
        Box::pin(async move {
            let t = self.metrics.start(op);
            let r = f(self.conn.clone(), self).await;
            t.done(r)
        })
    }

    /// A session's search entries (after its first write, or a write that moved its subject or start).
    async fn index_new(&self, mut conn: Conn, s: &NewSession) -> Result<(), StoreError> {
        session::index(&mut conn, s).await
    }

    async fn feed(&self, mut conn: Conn, sid: &str, unfed: Option<(u64, String)>) -> Result<(), StoreError> {
        if let Some((at, reason)) = unfed {
            session::feed(&mut conn, sid, at, &reason).await?;
        }
        Ok(())
    }

    async fn append_batch(&self, conn: Conn, batch: Vec<StepRecord>, now_ms: u64) -> Result<AppendResult, StoreError> {
        // The batch's records per session, sessions in order of first appearance.
        let mut order: Vec<&str> = Vec::new();
        let mut groups: std::collections::HashMap<&str, Vec<&StepRecord>> = std::collections::HashMap::new();
        for r in &batch {
            groups.entry(r.session_id.as_str()).or_insert_with(|| {
                order.push(r.session_id.as_str());
                Vec::new()
            });
            if let Some(g) = groups.get_mut(r.session_id.as_str()) {
                g.push(r);
            }
        }
        // 1. Each session's records, atomically per session (sessions concurrently).
        let results = futures_util::future::try_join_all(order.iter().map(|sid| {
            let mut c = conn.clone();
            let recs = groups.get(sid).cloned().unwrap_or_default();
            async move { session::append(&mut c, &self.metrics, &self.seen, sid, &recs, now_ms).await.map(|a| (*sid, a)) }
        }))
        .await?;
        // 2. Their leaves into the log, in batch order; a duplicate's leaf only if it is missing.
        let mut c = conn.clone();
        let mut leaves = Vec::new();
        let mut refused = Vec::new();
        let dups: Vec<(String, u64)> =
            results.iter().flat_map(|(sid, a)| a.leaves.iter().filter(|(_, h)| h.is_none()).map(|(seq, _)| (sid.to_string(), *seq))).collect();
        let in_log = log::present(&mut c, &dups).await?;
        let missing: HashSet<(String, u64)> = dups.into_iter().zip(in_log).filter(|(_, p)| !p).map(|(d, _)| d).collect();
        for (sid, a) in &results {
            for (seq, hash) in &a.leaves {
                let hash = match hash {
                    Some(h) => h.clone(),
                    None if missing.contains(&(sid.to_string(), *seq)) => {
                        let entry: Option<String> = c.lindex(keys::records(sid), (*seq as isize) - 1).await.map_err(backend)?;
                        let entry = entry.ok_or_else(|| StoreError::Backend(format!("redis: record {seq} of {sid} is indexed but not stored")))?;
                        session::StoredRecord::decode(&entry)?.hash
                    }
                    None => continue,
                };
                leaves.push(Leaf { session_id: sid.to_string(), seq: *seq, hash });
            }
        }
        let t = self.metrics.start(Op::LogAppend);
        t.done(self.log.enter(leaves).await)?;
        // 3. Revocations into the feed, and the search indexes (idempotent, after the sessions).
        // Index and credential writes: each its own key, each once per batch, plain commands in
        // one round trip (one pipeline on one server; on a Cluster, one per key, sent at once).
        let mut cmds: HashSet<(&'static str, String, String)> = HashSet::new();
        let mut writes: Vec<Vec<redis::Cmd>> = Vec::new();
        let mut subjects = HashSet::new();
        for (sid, a) in &results {
            self.feed(c.clone(), sid, a.unfed_revocation.clone()).await?;
            if let Some(new) = &a.index {
                writes.extend(session::index_commands(new).into_iter().map(|c| vec![c]));
            }
            for (cred, subject) in &a.credentials {
                if subjects.insert((cred.clone(), subject.clone())) {
                    let mut add = redis::cmd("ZADD");
                    add.arg(keys::credential_subjects(cred)).arg("NX").arg(now_ms).arg(subject);
                    writes.push(vec![add]);
                }
            }
            refused.extend(a.refused.iter().cloned());
        }
        let refused_ids: HashSet<(&str, u64, &str)> = refused.iter().map(|r: &RefusedRecord| (r.session_id.as_str(), r.step, r.decision_id.as_str())).collect();
        for r in batch.iter().filter(|r| !refused_ids.contains(&(r.session_id.as_str(), r.step, r.decision_id.as_str()))) {
            if let Some(cred) = &r.credential {
                cmds.insert(("SADD", keys::index::credential(cred), r.session_id.clone()));
            }
            if let Some(w) = &r.workload {
                cmds.insert(("SADD", keys::index::workload(w), r.session_id.clone()));
            }
        }
        for (cmd, key, member) in cmds {
            let mut add = redis::cmd(cmd);
            add.arg(key).arg(member);
            writes.push(vec![add]);
        }
        for r in c.round_trip(&c.pipelines(writes)).await? {
            r.map_err(backend)?;
        }
        // Each subject's profile learns the records appended, after their sessions' writes.
        // (one learner per replica merges every batch's lessons per subject: see `session::Learner`).
        let mut learning: Vec<(String, Vec<(StepRecord, warden_core::session::SessionState)>)> = Vec::new();
        for (sid, a) in &results {
            let recs = groups.get(sid).map(Vec::as_slice).unwrap_or_default();
            for (i, state) in &a.observed {
                if let Some(r) = recs.get(*i) {
                    match learning.iter_mut().find(|(s, _)| *s == r.subject) {
                        Some((_, v)) => v.push(((*r).clone(), state.clone())),
                        None => learning.push((r.subject.clone(), vec![((*r).clone(), state.clone())])),
                    }
                }
            }
        }
        futures_util::future::try_join_all(learning.into_iter().map(|(subject, observed)| self.learner.learn(subject, observed))).await?;
        let appended = results.iter().map(|(_, a)| a.appended).sum();
        let duplicates = results.iter().map(|(_, a)| a.duplicates).sum();
        Ok(AppendResult { appended, duplicates, refused })
    }

    async fn search_in(&self, mut conn: Conn, q: Search) -> Result<Vec<SessionSummary>, StoreError> {
        // Candidates from the most specific index given; every filter is checked on the session.
        let mut sets: Vec<HashSet<String>> = Vec::new();
        if let Some(s) = &q.subject {
            sets.push(conn.zrange::<_, Vec<String>>(keys::index::subject(s), 0, -1).await.map_err(backend)?.into_iter().collect());
        }
        if let Some(c) = &q.credential {
            sets.push(conn.smembers(keys::index::credential(c)).await.map_err(backend)?);
        }
        if let Some(w) = &q.workload {
            sets.push(conn.smembers(keys::index::workload(w)).await.map_err(backend)?);
        }
        let mut found = Vec::new();
        if let Some(first) = sets.first() {
            let ids: Vec<String> = first.iter().filter(|id| sets[1..].iter().all(|s| s.contains(*id))).cloned().collect();
            for chunk in ids.chunks(256) {
                found.extend(self.summaries(&mut conn, chunk, &q).await?);
            }
        } else {
            // Every session, newest first, a page at a time, until the limit is reached.
            let max = q.until_ms.map(|u| u.to_string()).unwrap_or_else(|| "+inf".into());
            let mut offset = 0isize;
            loop {
                let ids: Vec<String> = conn.zrevrangebyscore_limit(keys::index::started(), &max, "-inf", offset, 500).await.map_err(backend)?;
                let n = ids.len();
                found.extend(self.summaries(&mut conn, &ids, &q).await?);
                if n < 500 || found.len() >= q.limit {
                    break;
                }
                offset += 500;
            }
        }
        found.sort_by(|a, b| b.started_at_ms.cmp(&a.started_at_ms).then_with(|| a.id.cmp(&b.id)));
        found.truncate(q.limit);
        Ok(found)
    }

    /// The sessions' summaries that pass the query's filters.
    async fn summaries(&self, conn: &mut Conn, ids: &[String], q: &Search) -> Result<Vec<SessionSummary>, StoreError> {
        let reads = ids.iter().map(|id| {
            let mut c = conn.clone();
            async move { session::load(&mut c, id, &[]).await.map(|(l, _)| (id, l)) }
        });
        let loaded = futures_util::future::try_join_all(reads).await?;
        Ok(loaded
            .into_iter()
            .filter_map(|(id, l)| {
                let s = l.state?;
                let keep = q.subject.as_ref().is_none_or(|v| *v == s.subject)
                    && q.since_ms.is_none_or(|v| s.last_seen_at_ms >= v)
                    && q.until_ms.is_none_or(|v| s.started_at_ms <= v);
                keep.then(|| SessionSummary {
                    id: id.clone(),
                    subject: s.subject,
                    started_at_ms: s.started_at_ms,
                    last_seen_at_ms: s.last_seen_at_ms,
                    steps: s.steps,
                    revoked: l.revoked_at_ms.is_some(),
                })
            })
            .collect())
    }
}

impl Store for RedisStore {
    fn begin_step(&self, req: BeginStep, now_ms: u64) -> StoreFuture<'_, BeginResponse> {
        self.run(Op::BeginStep, move |mut c, st| async move { session::begin(&mut c, &st.metrics, &st.seen, &st.profiles, &req, now_ms).await })
    }

    fn append(&self, records: Vec<StepRecord>, now_ms: u64) -> StoreFuture<'_, AppendResult> {
        self.run(Op::Append, move |c, st| st.append_batch(c, records, now_ms))
    }

    fn session(&self, id: String) -> StoreFuture<'_, Option<SessionView>> {
        self.run(Op::Session, move |mut c, _| async move {
            let Some((l, timeline, audit)) = session::view(&mut c, &id).await? else { return Ok(None) };
            let state = l.state.unwrap_or_default();
            let head = SessionHead { records: l.records, hash: l.head };
            Ok(Some(SessionView { id, state, revoked_at_ms: l.revoked_at_ms, revoke_reason: l.revoke_reason, head: Some(head), timeline, audit }))
        })
    }

    fn search(&self, q: Search) -> StoreFuture<'_, Vec<SessionSummary>> {
        self.run(Op::Search, move |c, st| st.search_in(c, q))
    }

    fn revoke(&self, id: String, reason: String, now_ms: u64) -> StoreFuture<'_, bool> {
        self.run(Op::Revoke, move |mut c, st| async move {
            let (changed, unfed, new) = session::revoke(&mut c, &st.metrics, &id, &reason, now_ms).await?;
            st.feed(c.clone(), &id, unfed).await?;
            if let Some(new) = new {
                st.index_new(c, &new).await?;
            }
            Ok(changed)
        })
    }

    fn revocations(&self, after: u64, limit: usize) -> StoreFuture<'_, RevocationFeed> {
        self.run(Op::Revocations, move |mut c, _| async move {
            let cursors: Vec<u64> =
                c.zrangebyscore_limit(keys::feed::cursors(), format!("({after}"), "+inf", 0, limit as isize).await.map_err(backend)?;
            if cursors.is_empty() {
                return Ok(RevocationFeed { revocations: Vec::new(), cursor: after });
            }
            let entries: Vec<Option<String>> = redis::cmd("HMGET").arg(keys::feed::entries()).arg(&cursors).query_async(&mut c).await.map_err(backend)?;
            #[derive(serde::Deserialize)]
            struct E {
                session_id: String,
                at_ms: u64,
                reason: String,
            }
            let mut revocations = Vec::with_capacity(cursors.len());
            for (cursor, e) in cursors.iter().zip(entries) {
                let e: E = serde_json::from_str(&e.ok_or_else(|| backend(format!("feed entry {cursor} is missing")))?).map_err(backend)?;
                revocations.push(Revocation { cursor: *cursor, session_id: e.session_id, at_ms: e.at_ms, reason: e.reason });
            }
            let cursor = revocations.last().map(|r| r.cursor).unwrap_or(after);
            Ok(RevocationFeed { revocations, cursor })
        })
    }

    fn profile(&self, subject: String) -> StoreFuture<'_, Option<Profile>> {
        self.run(Op::Session, move |mut c, _| async move { Ok(session::profile(&mut c, &subject).await?.map(|(_, p)| p)) })
    }

    fn reset_profile(&self, subject: String) -> StoreFuture<'_, bool> {
        self.run(Op::Session, move |mut c, st| async move { session::reset_profile(&mut c, &st.profiles, &subject).await })
    }

    fn log_checkpoint(&self, signer: Arc<LogSigner>, now_ms: u64) -> StoreFuture<'_, (u64, String)> {
        self.run(Op::LogCheckpoint, move |mut c, _| async move { log::checkpoint(&mut c, &signer, now_ms).await })
    }

    fn log_latest(&self) -> StoreFuture<'_, Option<(u64, String)>> {
        self.run(Op::LogRead, move |mut c, _| async move { log::latest(&mut c).await })
    }

    fn log_consistency(&self, from: u64, to: u64) -> StoreFuture<'_, Option<Vec<String>>> {
        self.run(Op::LogRead, move |mut c, _| async move { log::consistency(&mut c, from, to).await })
    }

    fn log_inclusion(&self, session_id: String, seq: u64, tree_size: u64) -> StoreFuture<'_, Option<InclusionProof>> {
        self.run(Op::LogRead, move |mut c, _| async move { log::inclusion(&mut c, &session_id, seq, tree_size).await })
    }

    fn log_session(&self, session_id: String, tree_size: u64) -> StoreFuture<'_, Vec<LeafProof>> {
        self.run(Op::LogRead, move |mut c, _| async move { log::session_leaves(&mut c, &session_id, tree_size).await })
    }

    fn ready(&self) -> StoreFuture<'_, ()> {
        self.run(Op::Ready, move |mut c, _| async move {
            let pong: String = redis::cmd("PING").query_async(&mut c).await.map_err(backend)?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(backend(format!("PING answered {pong:?}")))
            }
        })
    }

    fn metrics_text(&self) -> String {
        self.metrics.render()
    }
}
