//! Session resolution (which session a request belongs to) and the proxy-local session table
//! used when no session-state service is configured.

use std::collections::HashMap;

use crate::config::SessionConfig;
use crate::correlation::new_session_id;
use crate::host::{Headers, Host};
use crate::identity::Identity;
use crate::wire::StepRecord;

/// Where the session id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionSource {
    Header,
    Claim,
    Minted,
}

impl SessionSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Claim => "claim",
            Self::Minted => "minted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionRef {
    pub id: String,
    pub source: SessionSource,
}

pub const MAX_SESSION_ID_LEN: usize = 256;

/// Session ids are visible ASCII (as MCP requires of `Mcp-Session-Id`) and bounded.
pub fn is_valid_session_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_SESSION_ID_LEN && id.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// A session id was presented but is not acceptable (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadSessionId {
    /// Not visible ASCII, empty or too long (`session_id_malformed`).
    Malformed,
    /// Two session headers, or one sent twice, with different values (`session_id_ambiguous`):
    /// the policy would decide on one while the upstream may act on the other.
    Ambiguous,
}

impl BadSessionId {
    pub fn code(self) -> &'static str {
        match self {
            Self::Malformed => "session_id_malformed",
            Self::Ambiguous => "session_id_ambiguous",
        }
    }
}

/// From the first configured header present, else the JWT claim, else a new id.
pub fn resolve(cfg: &SessionConfig, headers: &Headers, identity: &Identity, host: &mut dyn Host) -> Result<SessionRef, BadSessionId> {
    let mut found: Option<&[u8]> = None;
    for name in &cfg.headers {
        let Some(raw) = headers.get(name) else { continue };
        if headers.is_conflicting(name) || found.is_some_and(|f| f != raw) {
            return Err(BadSessionId::Ambiguous);
        }
        found.get_or_insert(raw);
    }
    if let Some(raw) = found {
        let id = std::str::from_utf8(raw).map_err(|_| BadSessionId::Malformed)?;
        if !is_valid_session_id(id) {
            return Err(BadSessionId::Malformed);
        }
        return Ok(SessionRef { id: id.to_string(), source: SessionSource::Header });
    }
    if let Some(id) = identity.token.as_ref().and_then(|t| t.claim_str(&cfg.claim)) {
        if !is_valid_session_id(id) {
            return Err(BadSessionId::Malformed);
        }
        return Ok(SessionRef { id: id.to_string(), source: SessionSource::Claim });
    }
    Ok(SessionRef { id: new_session_id(host), source: SessionSource::Minted })
}

/// What the policy sees of a session, as it was before this step. Also the snapshot the
/// session-state service returns, so proxy, service and CLI share one shape.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SessionState {
    pub subject: String,
    pub started_at_ms: u64,
    pub last_seen_at_ms: u64,
    /// Steps taken before this one.
    pub steps: u64,
    pub subjects: Vec<String>,
    pub credentials: Vec<String>,
    pub workloads: Vec<String>,
    pub regions: Vec<String>,
    pub devices: Vec<String>,
    /// The hosts called (`:authority`): tenants, for multi-tenant APIs.
    pub authorities: Vec<String>,
    pub tools: Vec<String>,
    /// Scopes the session started with (escalation is judged against them).
    pub scopes: Vec<String>,
    /// Subjects that have presented this step's credential, in any session (from the service).
    pub credential_subjects: Vec<String>,
    pub risk: f64,
    pub flags: Vec<String>,
    pub revoked: bool,
    pub last_step_up_ms: Option<u64>,
    /// Response bytes of the session's steps (data volume).
    pub bytes_out: u64,
    /// When the session's latest steps were refused (denied or sent to step-up), oldest first.
    pub refusals: Vec<u64>,
    /// The subject's behavioural profile across its sessions, from the state service with the
    /// step's snapshot (never stored with the session).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Box<crate::profile::Profile>>,
}

impl SessionState {
    /// A session opened by `subject` now, with the scopes it starts with: the one way a
    /// session comes into being, in the proxy and in every store.
    pub fn open(subject: &str, scopes: &[String], now_ms: u64) -> Self {
        Self {
            subject: subject.to_string(),
            started_at_ms: now_ms,
            last_seen_at_ms: now_ms,
            subjects: vec![subject.to_string()],
            scopes: scopes.iter().take(MAX_SCOPES).cloned().collect(),
            ..Default::default()
        }
    }

    /// The session-binding rule, the one place it lives (the proxy's table, its shared-data
    /// snapshot and every store call it): a revoked session takes no step, a session is only
    /// ever continued by the subject that opened it (credential rotation by that subject is
    /// fine and remembered); otherwise the step is counted and what it saw is merged. Returns
    /// the state as it was before this step, which is what the policy decides on.
    pub fn begin_step(&mut self, subject: &str, seen: &Seen<'_>, now_ms: u64) -> Result<SessionState, BeginError> {
        self.begin_step_after(subject, seen, now_ms, 0)
    }

    /// `begin_step` for a store that hears from proxies which steps they counted themselves
    /// (`known_steps`: degraded steps, taken while the store was unreachable): the step is
    /// numbered after them, so no step number is handed out twice. A refused step counts nothing.
    pub fn begin_step_after(&mut self, subject: &str, seen: &Seen<'_>, now_ms: u64, known_steps: u64) -> Result<SessionState, BeginError> {
        if self.revoked {
            return Err(BeginError::Revoked);
        }
        if self.subject != subject {
            return Err(BeginError::SubjectMismatch);
        }
        self.steps = self.steps.max(known_steps);
        let before = self.clone();
        self.steps += 1;
        self.last_seen_at_ms = now_ms;
        self.remember(seen);
        Ok(before)
    }

    /// Merge what a step saw (bounded per kind).
    pub fn remember(&mut self, seen: &Seen<'_>) {
        remember_value(&mut self.credentials, seen.credential);
        remember_value(&mut self.workloads, seen.workload);
        remember_value(&mut self.regions, seen.region);
        remember_value(&mut self.devices, seen.device);
        remember_value(&mut self.authorities, seen.authority);
        for t in seen.tools {
            remember_value(&mut self.tools, Some(t));
        }
    }

    /// What an admitted attribution record adds to its session (`admission::admit` decides
    /// which are): what its decision left behind (flags, a satisfied step-up, the risk of the
    /// latest step: records may arrive out of order), and, for a step the proxy counted alone
    /// (`counted_by_proxy`), what the step saw and the count it proves, as begin-step would
    /// have. A step the service counted was merged by its begin: its record adds nothing seen.
    pub fn apply_record(&mut self, r: &StepRecord, counted_by_proxy: bool) {
        if counted_by_proxy {
            self.steps = self.steps.max(r.step);
            self.started_at_ms = self.started_at_ms.min(r.at_ms);
            self.remember(&r.seen());
        }
        self.last_seen_at_ms = self.last_seen_at_ms.max(r.at_ms);
        for f in &r.flags {
            remember_value(&mut self.flags, Some(f));
        }
        if r.step_up {
            self.last_step_up_ms = self.last_step_up_ms.max(Some(r.at_ms));
        }
        if r.step >= self.steps {
            self.risk = r.risk;
        }
        self.bytes_out = self.bytes_out.saturating_add(r.response_bytes.unwrap_or(0));
        if r.enforced && (r.action == "deny" || r.action == "step_up") {
            self.refused_at(r.at_ms);
        }
    }

    /// Remember a refused step (bounded: the latest `MAX_SEEN`, oldest first).
    pub fn refused_at(&mut self, at_ms: u64) {
        if self.refusals.contains(&at_ms) {
            return;
        }
        let i = self.refusals.partition_point(|t| *t < at_ms);
        self.refusals.insert(i, at_ms);
        if self.refusals.len() > MAX_SEEN {
            self.refusals.remove(0);
        }
    }

    /// What a decision leaves behind: the new risk, flags, and a satisfied step-up.
    pub fn after_decision(&mut self, risk: f64, flags: &[String], stepped_up_at_ms: Option<u64>, refused_at_ms: Option<u64>) {
        self.risk = risk;
        if let Some(t) = refused_at_ms {
            self.refused_at(t);
        }
        for f in flags {
            remember_value(&mut self.flags, Some(f));
        }
        if stepped_up_at_ms.is_some() {
            self.last_step_up_ms = stepped_up_at_ms;
        }
    }

    /// A snapshot from the state service, overlaid with this proxy's own newer view of what
    /// decisions left behind (risk, flags, a step-up): the service only hears of those through
    /// the trail, which the proxy sends later.
    pub fn overlay_decisions(&mut self, mine: &SessionState) {
        self.risk = mine.risk;
        self.last_step_up_ms = self.last_step_up_ms.max(mine.last_step_up_ms);
        for f in &mine.flags {
            remember_value(&mut self.flags, Some(f));
        }
        // Responses and refusals the service has not heard of yet (their records are on the way).
        self.bytes_out = self.bytes_out.max(mine.bytes_out);
        for t in &mine.refusals {
            self.refused_at(*t);
        }
    }
}

/// What this step adds to what the session has seen.
pub struct Seen<'a> {
    pub credential: Option<&'a str>,
    pub workload: Option<&'a str>,
    pub region: Option<&'a str>,
    pub device: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub tools: &'a [String],
    pub scopes: &'a [String],
}

impl<'a> Seen<'a> {
    /// From the optional fields of a begin-step or a record.
    pub fn of(
        credential: &'a Option<String>,
        workload: &'a Option<String>,
        region: &'a Option<String>,
        device: &'a Option<String>,
        authority: &'a Option<String>,
        tools: &'a [String],
        scopes: &'a [String],
    ) -> Self {
        Self {
            credential: credential.as_deref(),
            workload: workload.as_deref(),
            region: region.as_deref(),
            device: device.as_deref(),
            authority: authority.as_deref(),
            tools,
            scopes,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeginError {
    /// The session is bound to another subject.
    SubjectMismatch,
    Revoked,
}

/// How many distinct values of each kind a session remembers.
pub const MAX_SEEN: usize = 32;
/// How many of its starting scopes a session remembers.
pub const MAX_SCOPES: usize = 64;

pub fn remember_value(list: &mut Vec<String>, v: Option<&str>) {
    if let Some(v) = v {
        if !v.is_empty() && !list.iter().any(|x| x == v) && list.len() < MAX_SEEN {
            list.push(v.to_string());
        }
    }
}

/// The sessions one proxy VM has seen, bounded; the least recently seen are forgotten first.
pub struct LocalSessions {
    max: usize,
    map: HashMap<String, SessionState>,
}

impl LocalSessions {
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), map: HashMap::new() }
    }

    /// Begin a step: create the session if new and bind it to `subject`, refuse another subject
    /// or a revoked session, count the step, merge what was seen. Returns the state as it was
    /// before this step and whether the session is new.
    pub fn begin_step(&mut self, id: &str, subject: &str, seen: &Seen<'_>, now_ms: u64) -> Result<(SessionState, bool), BeginError> {
        if !self.map.contains_key(id) && self.map.len() >= self.max {
            self.evict();
        }
        let is_new = !self.map.contains_key(id);
        let s = self.map.entry(id.to_string()).or_insert_with(|| SessionState::open(subject, seen.scopes, now_ms));
        Ok((s.begin_step(subject, seen, now_ms)?, is_new))
    }

    /// Mirror the service's view of a session (state after the step just counted).
    pub fn put(&mut self, id: &str, state: SessionState) {
        if !self.map.contains_key(id) && self.map.len() >= self.max {
            self.evict();
        }
        self.map.insert(id.to_string(), state);
    }

    pub fn steps(&self, id: &str) -> Option<u64> {
        self.map.get(id).map(|s| s.steps)
    }

    pub fn get(&self, id: &str) -> Option<&SessionState> {
        self.map.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut SessionState> {
        self.map.get_mut(id)
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.map.get(id).is_some_and(|s| s.revoked)
    }

    /// Mark a session revoked; a session not seen yet is remembered as revoked.
    pub fn revoke(&mut self, id: &str) {
        if !self.map.contains_key(id) {
            self.put(id, SessionState { revoked: true, ..Default::default() });
            return;
        }
        if let Some(s) = self.map.get_mut(id) {
            s.revoked = true;
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forget the least recently seen eighth (at least one), in one pass.
    fn evict(&mut self) {
        let n = (self.map.len() / 8).max(1);
        let mut ages: Vec<(u64, String)> = self.map.iter().map(|(k, v)| (v.last_seen_at_ms, k.clone())).collect();
        ages.sort_unstable();
        for (_, k) in ages.into_iter().take(n) {
            self.map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen<'a>(cred: &'a str) -> Seen<'a> {
        Seen { credential: Some(cred), workload: None, region: Some("eu"), device: None, authority: None, tools: &[], scopes: &[] }
    }

    #[test]
    fn steps_count_and_bind_to_the_first_subject() {
        let mut t = LocalSessions::new(10);
        let (s, new) = t.begin_step("s1", "alice", &seen("fp1"), 1000).unwrap();
        assert!(new);
        assert_eq!(s.steps, 0);
        let (s, new) = t.begin_step("s1", "alice", &seen("fp2"), 2000).unwrap();
        assert!(!new);
        assert_eq!(s.steps, 1);
        assert_eq!(s.credentials, vec!["fp1"]);
        let (s, _) = t.begin_step("s1", "alice", &seen("fp2"), 3000).unwrap();
        assert_eq!(s.credentials, vec!["fp1", "fp2"], "rotation by the same subject is recorded");
        assert_eq!(s.started_at_ms, 1000);
        assert_eq!(t.begin_step("s1", "mallory", &seen("fp3"), 4000).unwrap_err(), BeginError::SubjectMismatch);
        t.revoke("s1");
        assert_eq!(t.begin_step("s1", "alice", &seen("fp2"), 5000).unwrap_err(), BeginError::Revoked);
    }

    #[test]
    fn the_binding_rule_refuses_revoked_sessions_and_other_subjects_without_a_change() {
        let mut s = SessionState::open("alice", &["read".into()], 1000);
        assert_eq!((s.steps, s.subjects.clone(), s.scopes.clone()), (0, vec!["alice".to_string()], vec!["read".to_string()]));
        let before = s.begin_step("alice", &seen("fp1"), 2000).unwrap();
        assert_eq!((before.steps, s.steps, s.last_seen_at_ms), (0, 1, 2000));
        assert_eq!(s.credentials, vec!["fp1"]);
        let unchanged = s.clone();
        assert_eq!(s.begin_step("mallory", &seen("fp9"), 3000).unwrap_err(), BeginError::SubjectMismatch);
        assert_eq!(s, unchanged, "a refused step changes nothing");
        s.revoked = true;
        assert_eq!(s.begin_step("alice", &seen("fp1"), 3000).unwrap_err(), BeginError::Revoked);
        // A revocation heard of before the session (no subject) refuses everyone.
        let mut pre = SessionState { revoked: true, ..Default::default() };
        assert_eq!(pre.begin_step("", &seen("fp1"), 1).unwrap_err(), BeginError::Revoked);
        assert_eq!(SessionState::open("a", &vec!["s".to_string(); 100], 0).scopes.len(), MAX_SCOPES);
        // Steps a proxy counted on its own are numbered around; a refused step takes none.
        let mut s = SessionState::open("alice", &[], 0);
        s.begin_step("alice", &seen("fp1"), 1).unwrap();
        assert_eq!(s.begin_step_after("mallory", &seen("fp9"), 2, 50).unwrap_err(), BeginError::SubjectMismatch);
        assert_eq!(s.steps, 1);
        let before = s.begin_step_after("alice", &seen("fp1"), 3, 50).unwrap();
        assert_eq!((before.steps, s.steps), (50, 51));
    }

    #[test]
    fn a_record_adds_what_its_step_saw_and_decided() {
        let mut s = SessionState::open("alice", &[], 1000);
        let service_counted = StepRecord { step: 1, at_ms: 1500, subject: "alice".into(), credential: Some("fp9".into()), flags: vec!["f".into()], ..Default::default() };
        s.apply_record(&service_counted, false);
        assert!(s.credentials.is_empty(), "a service-counted step's begin merged what it saw; its record adds none");
        assert_eq!((s.flags.clone(), s.last_seen_at_ms), (vec!["f".to_string()], 1500));
        let mut s = SessionState::open("alice", &[], 1000);
        let r = StepRecord {
            session_id: "s1".into(),
            step: 3,
            at_ms: 5000,
            subject: "alice".into(),
            credential: Some("fp1".into()),
            region: Some("eu".into()),
            tool: Some("ticket.create".into()),
            flags: vec!["review".into()],
            step_up: true,
            risk: 42.0,
            ..Default::default()
        };
        s.apply_record(&r, true);
        assert_eq!((s.steps, s.last_seen_at_ms, s.risk, s.last_step_up_ms), (3, 5000, 42.0, Some(5000)));
        assert_eq!((s.credentials.clone(), s.regions.clone(), s.tools.clone(), s.flags.clone()), (vec!["fp1".to_string()], vec!["eu".to_string()], vec!["ticket.create".to_string()], vec!["review".to_string()]));
        // An older step's record arriving late keeps the latest risk and time.
        s.apply_record(&StepRecord { step: 2, at_ms: 4000, risk: 7.0, subject: "alice".into(), ..Default::default() }, true);
        assert_eq!((s.steps, s.last_seen_at_ms, s.risk), (3, 5000, 42.0));
        // A step a proxy counted before the session reached the service moves its start back.
        s.apply_record(&StepRecord { step: 1, at_ms: 400, subject: "alice".into(), ..Default::default() }, true);
        assert_eq!(s.started_at_ms, 400);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = LocalSessions::new(16);
        for i in 0..100u64 {
            t.begin_step(&format!("s{i}"), "a", &seen("fp"), i).unwrap();
        }
        assert!(t.len() <= 16);
        // The most recent session survived eviction.
        let (s, new) = t.begin_step("s99", "a", &seen("fp"), 200).unwrap();
        assert!(!new);
        assert_eq!(s.steps, 1);
    }

    #[test]
    fn session_ids_are_visible_ascii_and_bounded() {
        assert!(is_valid_session_id("ses_abc-123"));
        assert!(!is_valid_session_id(""));
        assert!(!is_valid_session_id("has space"));
        assert!(!is_valid_session_id(&"x".repeat(MAX_SESSION_ID_LEN + 1)));
    }
}
