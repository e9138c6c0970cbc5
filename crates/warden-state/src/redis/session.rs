//! A session's reads and compare-and-swap writes. Each operation reads the session's keys,
//! computes the new state in Rust with warden-core's rules, and writes it with `SESSION_CAS`
//! only if the session's version is unchanged; otherwise it re-reads and recomputes. So every
//! write is one atomic step of the session, whichever replica makes it, exactly as one SQLite
//! transaction is.

use std::collections::HashMap;

use redis::AsyncCommands;
use serde::Serialize;
use warden_core::session::SessionState;
use warden_core::trail::{self, GENESIS};
use warden_core::admission::{self, Admitted};
use warden_core::profile::Profile;
use warden_core::wire::{AuditEvent, BeginOutcome, BeginResponse, BeginStep, RefusedRecord, StepRecord, TrailEntry};

use super::conn::Conn;
use super::metrics::Metrics;
use super::{backend, keys, scripts};
use crate::store::{refusal, terminate_reason, StoreError};

/// How often a write is recomputed before the store gives up (contention that high is a fault).
const MAX_ATTEMPTS: u32 = 200;

/// A session's hash as read.
#[derive(Clone)]
pub struct Loaded {
    pub ver: u64,
    /// `None`: no such session. Its `revoked` comes from `revoked_at_ms`, which is what says it.
    pub state: Option<SessionState>,
    pub records: u64,
    pub head: String,
    pub revoked_at_ms: Option<u64>,
    pub revoke_reason: Option<String>,
    /// The revocation's feed cursor, once it is in the feed.
    pub fed: Option<u64>,
}

/// The hash fields `Loaded` is read from, in `SESSION_READ`'s and `SESSION_VIEW`'s order.
fn parse(fields: Vec<Option<String>>) -> Result<Loaded, StoreError> {
    let get = |i: usize| fields.get(i).cloned().flatten();
    let num = |i: usize| get(i).map(|v| v.parse::<u64>().map_err(backend)).transpose();
    let revoked_at_ms = num(4)?;
    let state = get(1)
        .map(|s| serde_json::from_str::<SessionState>(&s).map_err(|e| StoreError::Backend(format!("redis: a session's state does not parse: {e}"))))
        .transpose()?
        .map(|mut s| {
            s.revoked = revoked_at_ms.is_some();
            s
        });
    Ok(Loaded {
        ver: num(0)?.unwrap_or(0),
        state,
        records: num(2)?.unwrap_or(0),
        head: get(3).unwrap_or_else(|| GENESIS.to_string()),
        revoked_at_ms,
        revoke_reason: get(5),
        fed: num(6)?,
    })
}

/// A record as kept in the session's list: `<seq> <hash version> <prev hash> <hash>\n<body>`
/// (the hashes are hex, the body its stored text as it is: nothing escaped, nothing re-encoded).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub seq: u64,
    pub body: String,
    pub prev_hash: String,
    pub hash: String,
    pub hash_version: u8,
}

impl StoredRecord {
    pub fn encode(&self) -> String {
        format!("{} {} {} {}\n{}", self.seq, self.hash_version, self.prev_hash, self.hash, self.body)
    }

    pub fn decode(text: &str) -> Result<Self, StoreError> {
        let bad = || StoreError::Backend("redis: a stored record is not `<seq> <version> <prev> <hash>\\n<body>`".into());
        let (head, body) = text.split_once('\n').ok_or_else(bad)?;
        let mut f = head.split(' ');
        let (Some(seq), Some(v), Some(prev), Some(hash), None) = (f.next(), f.next(), f.next(), f.next(), f.next()) else { return Err(bad()) };
        Ok(Self {
            seq: seq.parse().map_err(|_| bad())?,
            hash_version: v.parse().map_err(|_| bad())?,
            prev_hash: prev.to_string(),
            hash: hash.to_string(),
            body: body.to_string(),
        })
    }

    pub fn entry(self) -> TrailEntry {
        // A body that no longer parses is still shown (and fails verification), not hidden.
        let record = serde_json::from_str(&self.body).unwrap_or_default();
        TrailEntry { seq: self.seq, record, body: self.body, prev_hash: self.prev_hash, hash: self.hash, hash_version: self.hash_version }
    }
}

/// What one compare-and-swap writes.
#[derive(Default)]
pub struct Write {
    pub fields: Vec<(&'static str, String)>,
    pub records: Vec<String>,
    pub dedupe: Vec<(String, String)>,
    pub audit: Vec<String>,
}

impl Write {
    fn state(&mut self, s: &SessionState) -> Result<(), StoreError> {
        self.fields.push(("state", serde_json::to_string(s).map_err(backend)?));
        Ok(())
    }
}

fn json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(backend)
}

pub async fn load(conn: &mut Conn, id: &str, dedupe: &[String]) -> Result<(Loaded, Vec<Option<String>>), StoreError> {
    let mut inv = scripts::SESSION_READ.prepare_invoke();
    inv.key(keys::session(id)).key(keys::dedupe(id));
    for f in dedupe {
        inv.arg(f);
    }
    let (fields, seqs): (Vec<Option<String>>, Vec<Option<String>>) = inv.invoke_async(conn).await.map_err(backend)?;
    Ok((parse(fields)?, seqs))
}

/// What a compare-and-swap did.
pub enum Cas {
    /// Written; the session's new version.
    Written(u64),
    /// The session had changed: here it is as it is now.
    Changed(Box<Loaded>),
}

/// Write `w` if the session is still at version `ver`. False: it changed; read it again.
pub async fn cas(conn: &mut Conn, id: &str, ver: u64, w: &Write) -> Result<bool, StoreError> {
    Ok(matches!(cas_or_current(conn, id, ver, w).await?, Cas::Written(_)))
}

/// Write `w` if the session is still at version `ver`; otherwise the session as it is now.
pub async fn cas_or_current(conn: &mut Conn, id: &str, ver: u64, w: &Write) -> Result<Cas, StoreError> {
    let v: redis::Value = cas_invocation(id, ver, w).invoke_async(conn).await.map_err(backend)?;
    cas_reply(v)
}

/// A short, growing pause between attempts of a contended write.
async fn backoff(m: &Metrics, attempt: u32) -> Result<(), StoreError> {
    m.session_retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if attempt + 1 >= MAX_ATTEMPTS {
        return Err(StoreError::Backend(format!("redis: a session write lost {MAX_ATTEMPTS} compare-and-swaps in a row")));
    }
    if attempt >= 2 {
        let us = 50u64 << attempt.min(6);
        let jitter = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64 % us).unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_micros(us / 2 + jitter)).await;
    }
    Ok(())
}

/// What a session's first write leaves for the search indexes.
pub struct NewSession {
    pub id: String,
    pub subject: String,
    pub started_at_ms: u64,
}

/// A replica's last view of the sessions it served: where a begin-step starts, so a session
/// this replica served last costs one compare-and-swap and no read. Never trusted: a stale entry
/// only loses its compare-and-swap, which answers with the session as it is. Bounded: two
/// generations of at most `SEEN_MAX / 2` entries each; the older is dropped whole when the newer
/// fills, off the request's path (dropping ten thousand states takes milliseconds).
#[derive(Default)]
pub struct Seen {
    sessions: std::sync::Mutex<(HashMap<String, Loaded>, HashMap<String, Loaded>)>,
}

const SEEN_MAX: usize = 20_000;

/// Drop a large value on a blocking thread (in a runtime), not on the request's.
fn drop_aside<T: Send + 'static>(v: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => drop(h.spawn_blocking(move || drop(v))),
        Err(_) => drop(v),
    }
}

impl Seen {
    fn get(&self, id: &str) -> Option<Loaded> {
        let m = self.sessions.lock().ok()?;
        m.0.get(id).or_else(|| m.1.get(id)).cloned()
    }

    fn put(&self, id: &str, l: Loaded) {
        let old = match self.sessions.lock() {
            Ok(mut m) => {
                m.0.insert(id.to_string(), l);
                if m.0.len() >= SEEN_MAX / 2 {
                    let newer = std::mem::take(&mut m.0);
                    Some(std::mem::replace(&mut m.1, newer))
                } else {
                    None
                }
            }
            Err(_) => None,
        };
        if let Some(old) = old {
            drop_aside(old);
        }
    }

    fn forget(&self, id: &str) {
        if let Ok(mut m) = self.sessions.lock() {
            m.0.remove(id);
            m.1.remove(id);
        }
    }
}

/// How long a replica hands out a subject's profile it read (or wrote) to its begin-steps
/// without reading it again. Profiles are statistics learned after the records (eventually
/// consistent in every store); this adds at most this much to their lag, and saves a read and
/// a JSON parse of the profile per begin-step.
pub const PROFILE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
const PROFILES_MAX: usize = 10_000;

/// A subject's profile as this replica last read or wrote it: (when, its version, the profile).
type CachedProfile = (std::time::Instant, u64, Option<std::sync::Arc<Profile>>);

/// The profiles this replica read or wrote lately (`PROFILE_TTL`); also where a profile's
/// compare-and-swap starts (never trusted: a stale one loses its swap, which answers with the
/// profile as it is).
#[derive(Default)]
pub struct Profiles {
    m: std::sync::Mutex<HashMap<String, CachedProfile>>,
}

impl Profiles {
    /// A profile read within `PROFILE_TTL`: `Some(profile or none)`; `None` when it must be read.
    fn fresh(&self, subject: &str) -> Option<Option<std::sync::Arc<Profile>>> {
        let m = self.m.lock().ok()?;
        let (at, _, p) = m.get(subject)?;
        (at.elapsed() < PROFILE_TTL).then(|| p.clone())
    }

    fn last(&self, subject: &str) -> Option<(u64, Option<std::sync::Arc<Profile>>)> {
        let m = self.m.lock().ok()?;
        m.get(subject).map(|(_, v, p)| (*v, p.clone()))
    }

    fn put(&self, subject: &str, ver: u64, p: Option<std::sync::Arc<Profile>>) {
        if let Ok(mut m) = self.m.lock() {
            if m.len() >= PROFILES_MAX && !m.contains_key(subject) {
                let old = std::mem::take(&mut *m);
                drop_aside(old);
            }
            m.insert(subject.to_string(), (std::time::Instant::now(), ver, p));
        }
    }

    pub fn forget(&self, subject: &str) {
        if let Ok(mut m) = self.m.lock() {
            m.remove(subject);
        }
    }
}

/// No session yet: what a first begin-step assumes (its compare-and-swap on version 0 fails
/// if the session exists, and answers with it).
fn absent() -> Loaded {
    Loaded { ver: 0, state: None, records: 0, head: GENESIS.to_string(), revoked_at_ms: None, revoke_reason: None, fed: None }
}

/// The command that writes `w` if the session is still at version `ver` (`SESSION_CAS`).
fn cas_invocation<'a>(id: &str, ver: u64, w: &Write) -> redis::ScriptInvocation<'a> {
    let mut inv = scripts::SESSION_CAS.prepare_invoke();
    inv.key(keys::session(id)).key(keys::records(id)).key(keys::dedupe(id)).key(keys::audit(id));
    inv.arg(ver).arg(w.fields.len());
    for (k, v) in &w.fields {
        inv.arg(*k).arg(v);
    }
    inv.arg(w.records.len());
    for r in &w.records {
        inv.arg(r);
    }
    inv.arg(w.dedupe.len());
    for (f, v) in &w.dedupe {
        inv.arg(f).arg(v);
    }
    inv.arg(w.audit.len());
    for a in &w.audit {
        inv.arg(a);
    }
    inv
}

fn cas_reply(v: redis::Value) -> Result<Cas, StoreError> {
    let (v, fields): (u64, Vec<Option<String>>) = redis::from_redis_value(v).map_err(backend)?;
    if v > 0 {
        Ok(Cas::Written(v))
    } else {
        Ok(Cas::Changed(Box::new(parse(fields)?)))
    }
}

fn reply<T: redis::FromRedisValue>(r: Option<redis::RedisResult<redis::Value>>) -> Result<T, StoreError> {
    let v = r.ok_or_else(|| backend("a pipelined command got no reply"))?.map_err(backend)?;
    redis::from_redis_value(v).map_err(backend)
}

/// A profile as `HMGET p ver` answers (one that no longer parses is relearned, not an error).
fn profile_reply(p: Option<String>, ver: Option<u64>) -> (u64, Option<Profile>) {
    (ver.unwrap_or(0), p.and_then(|t| serde_json::from_str(&t).ok()))
}

pub async fn begin(conn: &mut Conn, m: &Metrics, seen: &Seen, profiles: &Profiles, req: &BeginStep, now_ms: u64) -> Result<BeginResponse, StoreError> {
    let sid = &req.session_id;
    let mut cur = seen.get(sid).unwrap_or_else(absent);
    // The DPoP replay rule (as SQLite's `proof_unused`): a proof's use is taken once, atomically
    // (SET NX), and expires when no proxy would accept the proof any more. A replay changes
    // nothing but the audit events of a session that exists. A use already expired is pruned at
    // once, as SQLite prunes it with the next step: it holds nothing (no proxy accepts the proof).
    if let Some(proof) = req.proof.as_ref().filter(|p| p.expires_at_ms > now_ms) {
        let taken: Option<String> =
            redis::cmd("SET").arg(keys::proof(&proof.id)).arg(1).arg("NX").arg("PXAT").arg(proof.expires_at_ms).query_async(conn).await.map_err(backend)?;
        if taken.is_none() {
            let (loaded, _) = load(conn, sid, &[]).await?;
            if loaded.state.is_some() {
                let ev = AuditEvent {
                    at_ms: now_ms,
                    kind: "dpop_replayed".into(),
                    subject: req.subject.clone(),
                    credential: req.credential.clone(),
                    detail: "a DPoP proof was presented again".into(),
                    record: None,
                };
                let _: () = redis::cmd("RPUSH").arg(keys::audit(sid)).arg(json(&ev)?).query_async(conn).await.map_err(backend)?;
            }
            let session = loaded.state.unwrap_or_else(|| SessionState::open(&req.subject, &req.scopes, now_ms));
            return Ok(BeginResponse { outcome: BeginOutcome::ProofReplayed, step: 0, new: false, session });
        }
    }
    for attempt in 0.. {
        let is_new = cur.state.is_none();
        let mut state = cur.state.clone().unwrap_or_else(|| SessionState::open(&req.subject, &req.scopes, now_ms));
        let mut w = Write::default();
        let (outcome, response) = match state.begin_step_after(&req.subject, &req.seen(), now_ms, req.known_steps.unwrap_or(0)) {
            Err(why) => {
                let (outcome, kind, detail) = refusal(why, &state.subject, &req.subject);
                let ev = AuditEvent { at_ms: now_ms, kind: kind.into(), subject: req.subject.clone(), credential: req.credential.clone(), detail, record: None };
                w.audit.push(json(&ev)?);
                (cas_or_current(conn, sid, cur.ver, &w).await?, BeginResponse { outcome, step: 0, new: false, session: state.clone() })
            }
            Ok(mut before) => {
                w.state(&state)?;
                if is_new {
                    w.fields.push(("records", "0".into()));
                    w.fields.push(("head", GENESIS.into()));
                }
                // One round trip: the session's compare-and-swap, and beside it (their own keys,
                // idempotent, plain commands) the credential's subjects, a new session's search
                // entries and the subject's profile unless this replica read it lately.
                let inv = cas_invocation(sid, cur.ver, &w);
                let mut groups = vec![vec![redis::Cmd::invoke_script(&inv)]];
                if let Some(cred) = req.credential.as_deref() {
                    let key = keys::credential_subjects(cred);
                    let mut add = redis::cmd("ZADD");
                    add.arg(&key).arg("NX").arg(now_ms).arg(&req.subject);
                    let mut list = redis::cmd("ZRANGE");
                    list.arg(&key).arg(0).arg(CREDENTIAL_SUBJECTS_MAX - 1);
                    groups.push(vec![add, list]);
                }
                if is_new {
                    let new = NewSession { id: sid.clone(), subject: state.subject.clone(), started_at_ms: state.started_at_ms };
                    groups.extend(index_commands(&new).into_iter().map(|c| vec![c]));
                }
                let cached = profiles.fresh(&req.subject);
                if cached.is_none() {
                    let mut get = redis::cmd("HMGET");
                    get.arg(keys::profile(&req.subject)).arg("p").arg("ver");
                    groups.push(vec![get]);
                }
                let pipes = conn.pipelines(groups);
                let mut replies = conn.round_trip(&pipes).await?;
                if matches!(replies.first(), Some(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)) {
                    // Redis restarted or its scripts were flushed: load it, send all again (the
                    // rest is idempotent).
                    inv.load_async(conn).await.map_err(backend)?;
                    replies = conn.round_trip(&pipes).await?;
                }
                let mut replies = replies.into_iter();
                let written = cas_reply(replies.next().ok_or_else(|| backend("no reply"))?.map_err(backend)?)?;
                let mut subjects = Vec::new();
                if req.credential.is_some() {
                    let _: redis::Value = reply(replies.next())?;
                    subjects = reply(replies.next())?;
                }
                if is_new {
                    let _: redis::Value = reply(replies.next())?;
                    let _: redis::Value = reply(replies.next())?;
                }
                let profile = match cached {
                    Some(p) => p,
                    None => {
                        let (p, ver): (Option<String>, Option<u64>) = reply(replies.next())?;
                        let (ver, p) = profile_reply(p, ver);
                        let p = p.map(std::sync::Arc::new);
                        profiles.put(&req.subject, ver, p.clone());
                        p
                    }
                };
                if matches!(written, Cas::Written(_)) {
                    before.credential_subjects = subjects;
                    before.profile = profile.map(|p| Box::new((*p).clone()));
                }
                (written, BeginResponse { outcome: BeginOutcome::Ok, step: state.steps, new: is_new, session: before })
            }
        };
        match outcome {
            Cas::Written(ver) => {
                // As stored now: the new state, or on a refusal the state as it was.
                let stored = if response.outcome == BeginOutcome::Ok { Some(state) } else { cur.state.clone() };
                seen.put(sid, Loaded { ver, state: stored, ..cur });
                return Ok(response);
            }
            Cas::Changed(now) => {
                if now.state.is_none() {
                    seen.forget(sid);
                }
                cur = *now;
            }
        }
        backoff(m, attempt).await?;
    }
    Err(StoreError::Backend("unreachable".into()))
}

/// A credential's subjects handed to the policy: the first this many that presented it.
const CREDENTIAL_SUBJECTS_MAX: usize = 16;

/// A subject's profile (one that no longer parses is relearned rather than failing its steps).
pub async fn profile(conn: &mut Conn, subject: &str) -> Result<Option<(u64, Profile)>, StoreError> {
    let (p, ver): (Option<String>, Option<u64>) = redis::cmd("HMGET").arg(keys::profile(subject)).arg("p").arg("ver").query_async(conn).await.map_err(backend)?;
    let (ver, p) = profile_reply(p, ver);
    Ok(p.map(|p| (ver, p)))
}

/// Forget a subject's profile: its version moves on (so a replica's cached copy loses its next
/// compare-and-swap) and its statistics go. True if there were any.
pub async fn reset_profile(conn: &mut Conn, profiles: &Profiles, subject: &str) -> Result<bool, StoreError> {
    let key = keys::profile(subject);
    let (gone, _): (u64, u64) = redis::pipe().atomic().hdel(&key, "p").hincr(&key, "ver", 1).query_async(conn).await.map_err(backend)?;
    profiles.forget(subject);
    Ok(gone > 0)
}

/// Teach a subject's profile a batch's records of it, by compare-and-swap on the profile. It
/// starts from this replica's last copy (none: an empty profile at version 0); a lost swap
/// answers with the profile as it is, and the records are observed again from that.
pub async fn learn(conn: &mut Conn, m: &Metrics, profiles: &Profiles, subject: &str, observed: &[(&StepRecord, &SessionState)]) -> Result<(), StoreError> {
    let (mut ver, mut from) = profiles.last(subject).unwrap_or((0, None));
    for attempt in 0.. {
        let mut p = from.as_deref().cloned().unwrap_or_default();
        for (r, s) in observed {
            p.observe(r, s);
        }
        let text = json(&p)?;
        let (done, current): (u64, Vec<Option<String>>) =
            scripts::PROFILE_CAS.key(keys::profile(subject)).arg(ver).arg(text).invoke_async(conn).await.map_err(backend)?;
        if done > 0 {
            profiles.put(subject, done, Some(std::sync::Arc::new(p)));
            return Ok(());
        }
        let (v, p) = profile_reply(current.first().cloned().flatten(), current.get(1).cloned().flatten().and_then(|v| v.parse().ok()));
        (ver, from) = (v, p.map(std::sync::Arc::new));
        backoff(m, attempt).await?;
    }
    Err(StoreError::Backend("unreachable".into()))
}

type Lesson = (String, Vec<(StepRecord, SessionState)>, tokio::sync::oneshot::Sender<Result<(), String>>);

/// The replica's profile learner: one task that takes every batch's lessons waiting, merges
/// them per subject (in the order they came) and teaches each subject's profile by one
/// compare-and-swap, so the appends of one replica never race each other on a profile (one
/// subject's records arrive from every proxy at once). `learn` resolves once its records are
/// learned, as before.
#[derive(Clone)]
pub struct Learner {
    tx: tokio::sync::mpsc::UnboundedSender<Lesson>,
}

impl Learner {
    pub fn start(conn: Conn, metrics: std::sync::Arc<Metrics>, profiles: std::sync::Arc<Profiles>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Lesson>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut lessons = vec![first];
                while let Ok(l) = rx.try_recv() {
                    lessons.push(l);
                }
                let mut order: Vec<String> = Vec::new();
                let mut by_subject: HashMap<String, Vec<(&StepRecord, &SessionState)>> = HashMap::new();
                for (subject, observed, _) in &lessons {
                    let e = by_subject.entry(subject.clone()).or_insert_with(|| {
                        order.push(subject.clone());
                        Vec::new()
                    });
                    e.extend(observed.iter().map(|(r, s)| (r, s)));
                }
                let results: HashMap<&str, Result<(), String>> = futures_util::future::join_all(order.iter().map(|subject| {
                    let (mut c, m, profiles) = (conn.clone(), metrics.clone(), profiles.clone());
                    let observed = by_subject.get(subject).map(Vec::as_slice).unwrap_or_default();
                    async move { (subject.as_str(), learn(&mut c, &m, &profiles, subject, observed).await.map_err(|e| e.to_string())) }
                }))
                .await
                .into_iter()
                .collect();
                for (subject, _, reply) in lessons {
                    let r = results.get(subject.as_str()).cloned().unwrap_or(Ok(()));
                    let _ = reply.send(r);
                }
            }
        });
        Self { tx }
    }

    /// Teach `subject`'s profile these records (each with its session's state after it).
    pub async fn learn(&self, subject: String, observed: Vec<(StepRecord, SessionState)>) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped = || StoreError::Backend("redis: the profile learner has stopped".into());
        self.tx.send((subject, observed, tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?.map_err(StoreError::Backend)
    }
}

/// A session's search entries (idempotent).
pub async fn index(conn: &mut Conn, s: &NewSession) -> Result<(), StoreError> {
    for r in conn.round_trip(&conn.pipelines(index_commands(s).into_iter().map(|c| vec![c]).collect())).await? {
        r.map_err(backend)?;
    }
    Ok(())
}

/// The commands that write a session's search entries (each its own key).
pub fn index_commands(s: &NewSession) -> [redis::Cmd; 2] {
    [keys::index::started(), keys::index::subject(&s.subject)].map(|key| {
        let mut add = redis::cmd("ZADD");
        add.arg(key).arg(s.started_at_ms).arg(&s.id);
        add
    })
}

/// A batch's records of one session, after its write.
pub struct Appended {
    pub appended: u64,
    pub duplicates: u64,
    pub refused: Vec<RefusedRecord>,
    /// Every appended or duplicate record as (seq, chain hash): the hash is `None` for a
    /// duplicate (read it from the store if its leaf is missing from the log).
    pub leaves: Vec<(u64, Option<String>)>,
    /// A revocation this write made (enforced `terminate`), or one made before that is not in the
    /// feed yet: (at_ms, reason).
    pub unfed_revocation: Option<(u64, String)>,
    /// The session's search entry, when this write opened it or moved its subject or start.
    pub index: Option<NewSession>,
    /// (credential, subject) pairs to remember (steps a proxy counted alone).
    pub credentials: Vec<(String, String)>,
    /// Each appended record (its index in the session's part of the batch) with its session's
    /// state after it: what the subject's profile learns from (`Profile::observe`).
    pub observed: Vec<(usize, SessionState)>,
}

/// The fields `append` reads per record: its own (`<step>\n<decision>` → seq) and its step's
/// (`<step>` → the first decision id stored for it).
fn record_fields(r: &StepRecord) -> [String; 2] {
    [keys::dedupe_field(r.step, &r.decision_id), r.step.to_string()]
}

/// Append a batch's records of one session (`recs`, in batch order) atomically: each record is
/// admitted, counted a duplicate or refused by `warden_core::admission::admit`, the one rule
/// every store calls; refusals are written to the session's audit events in the same write.
pub async fn append(conn: &mut Conn, m: &Metrics, seen: &Seen, sid: &str, recs: &[&StepRecord], now_ms: u64) -> Result<Appended, StoreError> {
    let fields: Vec<String> = recs.iter().flat_map(|r| record_fields(r)).collect();
    for attempt in 0.. {
        let (cur, stored) = load(conn, sid, &fields).await?;
        let mut stored = stored.into_iter().chain(std::iter::repeat(None));
        let before = cur.state.as_ref().map(|s| (s.subject.clone(), s.started_at_ms));
        let mut state = cur.state;
        let (mut records, mut head) = (cur.records, cur.head);
        let mut w = Write::default();
        // What this batch adds, as the store will hold it: own field → seq, step → decision.
        let mut own: HashMap<String, u64> = HashMap::new();
        let mut steps: HashMap<u64, String> = HashMap::new();
        let mut out = Appended {
            appended: 0,
            duplicates: 0,
            refused: Vec::new(),
            leaves: Vec::new(),
            unfed_revocation: None,
            index: None,
            credentials: Vec::new(),
            observed: Vec::new(),
        };
        let mut revoked_at = cur.revoked_at_ms.map(|at| (at, cur.revoke_reason.clone().unwrap_or_default()));
        for (i, r) in recs.iter().enumerate() {
            let [own_field, _] = record_fields(r);
            let (own_seq, step_decision) = (stored.next().flatten(), stored.next().flatten());
            let own_seq: Option<u64> = own_seq.and_then(|v| v.parse().ok()).or_else(|| own.get(&own_field).copied());
            let recorded = match own_seq {
                Some(_) => Some(r.decision_id.clone()),
                None => step_decision.or_else(|| steps.get(&r.step).cloned()),
            };
            match admission::admit(&mut state, recorded.as_deref(), r, now_ms) {
                Ok(Admitted::Duplicate) => {
                    out.duplicates += 1;
                    if let Some(seq) = own_seq {
                        out.leaves.push((seq, None));
                    }
                    continue;
                }
                Err(why) => {
                    let body = trail::canonical_body(r).map_err(backend)?;
                    let ev = AuditEvent {
                        at_ms: now_ms,
                        kind: why.code().into(),
                        subject: r.subject.clone(),
                        credential: r.credential.clone(),
                        detail: why.detail(r),
                        record: Some(body),
                    };
                    w.audit.push(json(&ev)?);
                    out.refused.push(RefusedRecord { session_id: r.session_id.clone(), step: r.step, decision_id: r.decision_id.clone(), code: why.code().into() });
                    continue;
                }
                Ok(Admitted::Append { seen_credential, .. }) => {
                    if let (true, Some(c)) = (seen_credential, &r.credential) {
                        out.credentials.push((c.clone(), r.subject.clone()));
                    }
                }
            }
            let body = trail::canonical_body(r).map_err(backend)?;
            let seq = records + 1;
            let hash = crate::sqlite::chain_hash(&head, &body);
            w.records.push(StoredRecord { seq, body, prev_hash: head.clone(), hash: hash.clone(), hash_version: trail::HASH_V2 }.encode());
            w.dedupe.push((own_field.clone(), seq.to_string()));
            own.insert(own_field, seq);
            if let std::collections::hash_map::Entry::Vacant(e) = steps.entry(r.step) {
                e.insert(r.decision_id.clone());
                w.dedupe.push((r.step.to_string(), r.decision_id.clone()));
            }
            out.leaves.push((seq, Some(hash.clone())));
            if let Some(s) = &state {
                out.observed.push((i, s.clone()));
            }
            (records, head) = (seq, hash);
            if r.action == "terminate" && r.enforced && revoked_at.is_none() {
                revoked_at = Some((now_ms, terminate_reason(r)));
                w.fields.push(("revoked_at_ms", now_ms.to_string()));
                w.fields.push(("revoke_reason", terminate_reason(r)));
            }
            out.appended += 1;
        }
        if cur.fed.is_none() {
            out.unfed_revocation = revoked_at.clone();
        }
        if out.appended == 0 && w.audit.is_empty() {
            return Ok(out);
        }
        let head_after = head.clone();
        if out.appended > 0 {
            let Some(s) = &state else { return Err(StoreError::Backend("an admitted record left no session".into())) };
            w.state(s)?;
            w.fields.push(("records", records.to_string()));
            w.fields.push(("head", head));
        }
        if let Cas::Written(ver) = cas_or_current(conn, sid, cur.ver, &w).await? {
            if let Some(s) = state.as_ref().filter(|s| out.appended > 0 && before.as_ref() != Some(&(s.subject.clone(), s.started_at_ms))) {
                out.index = Some(NewSession { id: sid.to_string(), subject: s.subject.clone(), started_at_ms: s.started_at_ms });
            }
            let (revoked_at_ms, revoke_reason) = match revoked_at {
                Some((at, reason)) => (Some(at), Some(reason)),
                None => (None, None),
            };
            seen.put(sid, Loaded { ver, state, records, head: head_after, revoked_at_ms, revoke_reason, fed: cur.fed });
            return Ok(out);
        }
        backoff(m, attempt).await?;
    }
    Err(StoreError::Backend("unreachable".into()))
}

/// Revoke; a session not seen yet is created revoked. Returns (changed, the revocation when it
/// is not in the feed yet, the new session).
pub async fn revoke(conn: &mut Conn, m: &Metrics, sid: &str, reason: &str, now_ms: u64) -> Result<(bool, Option<(u64, String)>, Option<NewSession>), StoreError> {
    for attempt in 0.. {
        let (cur, _) = load(conn, sid, &[]).await?;
        if let Some(at) = cur.revoked_at_ms {
            let unfed = cur.fed.is_none().then(|| (at, cur.revoke_reason.clone().unwrap_or_default()));
            return Ok((false, unfed, None));
        }
        let is_new = cur.state.is_none();
        // Revoking a session no proxy has reported yet: it must never start.
        let mut state = cur.state.unwrap_or_else(|| SessionState::open("", &[], now_ms));
        state.revoked = true;
        let mut w = Write::default();
        w.state(&state)?;
        if is_new {
            w.fields.push(("records", "0".into()));
            w.fields.push(("head", GENESIS.into()));
        }
        w.fields.push(("revoked_at_ms", now_ms.to_string()));
        w.fields.push(("revoke_reason", reason.to_string()));
        if cas(conn, sid, cur.ver, &w).await? {
            let new = is_new.then(|| NewSession { id: sid.to_string(), subject: String::new(), started_at_ms: now_ms });
            return Ok((true, Some((now_ms, reason.to_string())), new));
        }
        backoff(m, attempt).await?;
    }
    Err(StoreError::Backend("unreachable".into()))
}

/// Enter a revocation into the feed (once, however often it is retried) and remember its
/// cursor on the session.
pub async fn feed(conn: &mut Conn, sid: &str, at_ms: u64, reason: &str) -> Result<u64, StoreError> {
    let entry = serde_json::json!({"session_id": sid, "at_ms": at_ms, "reason": reason}).to_string();
    let cursor: u64 = scripts::FEED_APPEND
        .key(keys::feed::counter())
        .key(keys::feed::cursors())
        .key(keys::feed::entries())
        .key(keys::feed::by_session())
        .arg(sid)
        .arg(entry)
        .invoke_async(conn)
        .await
        .map_err(backend)?;
    let _: () = conn.hset(keys::session(sid), "fed", cursor).await.map_err(backend)?;
    Ok(cursor)
}

/// The session, its records and audit events, read at one instant.
pub async fn view(conn: &mut Conn, sid: &str) -> Result<Option<(Loaded, Vec<TrailEntry>, Vec<AuditEvent>)>, StoreError> {
    let (fields, records, audit): (Vec<Option<String>>, Vec<String>, Vec<String>) = scripts::SESSION_VIEW
        .key(keys::session(sid))
        .key(keys::records(sid))
        .key(keys::audit(sid))
        .invoke_async(conn)
        .await
        .map_err(backend)?;
    let loaded = parse(fields)?;
    if loaded.state.is_none() {
        return Ok(None);
    }
    let timeline = records
        .iter()
        .map(|r| StoredRecord::decode(r).map(StoredRecord::entry))
        .collect::<Result<Vec<_>, _>>()?;
    let audit = audit.iter().map(|a| serde_json::from_str(a).map_err(backend)).collect::<Result<Vec<_>, _>>()?;
    Ok(Some((loaded, timeline, audit)))
}
