//! The session-state service's wire types, shared by the filter, the service and the CLI.
//! JSON over HTTP, API version 1 (paths under `/v1`).

use serde::{Deserialize, Serialize};

use crate::correlation::trace_id;
use crate::decision::Decision;
use crate::identity::Identity;
use crate::input::RequestFacts;
use crate::session::{Seen, SessionState};

/// What proxies send to the service is bounded: the filter cuts every value to these limits
/// (`BeginStep::bound`, `StepRecord::bound`) and the service accepts a request only if bounding
/// it would change nothing (`crates/warden-state/src/validate.rs`). One rule on both sides, so
/// no client value can turn a valid step into a refused one.
pub mod limits {
    /// Any one text value (subject, path, a reason, a tool name, ...), in UTF-8 bytes.
    pub const MAX_TEXT_BYTES: usize = 1024;
    /// MCP tools of one step.
    pub const MAX_TOOLS: usize = 64;
    /// Scopes of one credential.
    pub const MAX_SCOPES: usize = 256;
    /// Reasons, signals and flags of one decision, each.
    pub const MAX_REASONS: usize = 64;
    /// Delegation chain entries (`act` claims).
    pub const MAX_DELEGATION: usize = 16;
    /// The recorded policy input (JSON text), in bytes.
    pub const MAX_INPUT_BYTES: usize = 64 * 1024;
    /// The service's body limit: a larger request is answered 413.
    pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
    /// The largest `state.max_batch_bytes` a proxy may configure: half the body limit, so a
    /// batch that ends with one more (bounded) record still fits.
    pub const MAX_BATCH_BYTES: usize = MAX_BODY_BYTES / 2;
    /// How a cut text value ends: this, the first 16 hex digits of the SHA-256 of the whole
    /// value, and `]`. Two values cut to the same prefix stay distinct, and a reader sees it was
    /// cut. ASCII, so a cut subject is still a valid header value where the filter stamps it.
    pub const CUT_MARK: &str = "...[sha256:";
    /// The key of the object that stands in for a recorded input over `MAX_INPUT_BYTES`.
    pub const INPUT_CUT_KEY: &str = "warden_input_cut";
}

use crate::hash::{hex, sha256};
use limits::*;

fn mark_of(full: &[u8]) -> String {
    format!("{CUT_MARK}{}]", &hex(&sha256(full))[..16])
}

/// Cut `s` to at most `max` bytes at a char boundary, ending in the cut mark. True if it was cut.
pub fn bound_text(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mark = mark_of(s.as_bytes());
    let mut end = max.saturating_sub(mark.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(&mark);
    true
}

fn bound_opt(s: &mut Option<String>) -> bool {
    s.as_mut().is_some_and(|s| bound_text(s, MAX_TEXT_BYTES))
}

/// At most `max` items of at most `MAX_TEXT_BYTES` each. A longer list keeps its first
/// `max - 1` items and ends in one that says how many more there were, with the hash of the
/// whole list.
pub fn bound_list(v: &mut Vec<String>, max: usize) -> bool {
    let mut cut = false;
    if v.len() > max {
        let whole = serde_json::to_vec(v).unwrap_or_default();
        let more = v.len() + 1 - max;
        v.truncate(max.saturating_sub(1));
        v.push(format!("{CUT_MARK}{}] +{more} more", &hex(&sha256(&whole))[..16]));
        cut = true;
    }
    for s in v.iter_mut() {
        cut |= bound_text(s, MAX_TEXT_BYTES);
    }
    cut
}

/// Collects the names of the fields a `bound` cut.
struct Cuts(Vec<&'static str>);

impl Cuts {
    fn text(&mut self, name: &'static str, s: &mut String) {
        if bound_text(s, MAX_TEXT_BYTES) {
            self.0.push(name);
        }
    }
    fn opt(&mut self, name: &'static str, s: &mut Option<String>) {
        if bound_opt(s) {
            self.0.push(name);
        }
    }
    fn list(&mut self, name: &'static str, v: &mut Vec<String>, max: usize) {
        if bound_list(v, max) {
            self.0.push(name);
        }
    }
}

/// A step's policy input as JSON text: serialized once, in the proxy, straight from the policy
/// value, then carried through batches, the store and exports as it is: building a JSON tree per
/// request, to serialize it again at the flush, was a measurable part of the proxy's cost
/// (bench/README.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RecordedInput(Box<serde_json::value::RawValue>);

impl RecordedInput {
    pub fn new(input: &impl Serialize) -> Option<Self> {
        serde_json::value::to_raw_value(input).ok().map(Self)
    }

    /// The JSON text, exactly as recorded.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// Over `MAX_INPUT_BYTES`, the input is replaced by `{"warden_input_cut": {"bytes", "sha256"}}`:
    /// the step stays in the trail, and replay reports it as not replayable. True if it was cut.
    pub fn bound(&mut self) -> bool {
        let text = self.get();
        if text.len() <= MAX_INPUT_BYTES {
            return false;
        }
        let marker = serde_json::json!({INPUT_CUT_KEY: {"bytes": text.len(), "sha256": hex(&sha256(text.as_bytes()))}});
        if let Some(cut) = Self::new(&marker) {
            *self = cut;
        }
        true
    }

    /// The input was over its limit when recorded: only its size and hash are kept.
    pub fn is_cut(&self) -> bool {
        self.get().starts_with(&format!("{{\"{INPUT_CUT_KEY}\""))
    }
}

/// Equal when the recorded text is: what the hash chain commits to.
impl PartialEq for RecordedInput {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// `POST /v1/steps/begin` (proxy credential): one atomic step of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeginStep {
    pub session_id: String,
    pub subject: String,
    #[serde(default)]
    pub credential: Option<String>,
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
    /// The host called (`:authority`): a tenant, for multi-tenant APIs.
    #[serde(default)]
    pub authority: Option<String>,
    /// MCP tools this step calls.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Steps this proxy has counted for the session, degraded ones included: the service never
    /// hands out a step number the proxy already used while it could not be reached.
    #[serde(default)]
    pub known_steps: Option<u64>,
    /// The credential's scopes: a new session remembers them as the scopes it started with.
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl BeginStep {
    /// Cut every value to its limit (`limits`); the names of the fields cut.
    pub fn bound(&mut self) -> Vec<&'static str> {
        let mut c = Cuts(Vec::new());
        c.text("subject", &mut self.subject);
        c.opt("credential", &mut self.credential);
        c.opt("workload", &mut self.workload);
        c.opt("region", &mut self.region);
        c.opt("device", &mut self.device);
        c.opt("authority", &mut self.authority);
        c.list("tools", &mut self.tools, MAX_TOOLS);
        c.list("scopes", &mut self.scopes, MAX_SCOPES);
        c.0
    }

    /// What this step adds to its session.
    pub fn seen(&self) -> Seen<'_> {
        Seen::of(&self.credential, &self.workload, &self.region, &self.device, &self.authority, &self.tools, &self.scopes)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BeginOutcome {
    /// The step was counted; `session` is the state before it.
    Ok,
    /// The session belongs to another subject; nothing changed, an audit event was written.
    SubjectMismatch,
    /// The session is revoked; nothing changed, an audit event was written.
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeginResponse {
    pub outcome: BeginOutcome,
    /// This step's number (from 1); 0 when the step was refused.
    pub step: u64,
    pub new: bool,
    pub session: SessionState,
}

/// One step of a session as the proxy saw and decided it: the attribution record. Credentials
/// appear only as fingerprints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct StepRecord {
    pub session_id: String,
    pub step: u64,
    pub decision_id: String,
    pub at_ms: u64,
    pub subject: String,
    pub identity_kind: String,
    pub issuer: Option<String>,
    pub credential: Option<String>,
    pub kid: Option<String>,
    pub jti: Option<String>,
    pub delegation: Vec<String>,
    pub workload: Option<String>,
    pub region: Option<String>,
    pub device: Option<String>,
    pub source_address: Option<String>,
    pub method: Option<String>,
    pub authority: Option<String>,
    pub path: Option<String>,
    /// MCP tools called by this step (first one for a batch in `tool`).
    pub tool: Option<String>,
    pub mcp_method: Option<String>,
    pub arguments_digest: Option<String>,
    pub action: String,
    /// False when the decision was not enforced (shadow mode).
    pub enforced: bool,
    pub reasons: Vec<String>,
    /// Session risk before and after this step, and the signals that moved it.
    pub risk_before: f64,
    pub risk: f64,
    pub signals: Vec<String>,
    pub flags: Vec<String>,
    /// A stronger credential satisfied a step-up on this step.
    pub step_up: bool,
    pub policy_version: String,
    pub mode: String,
    pub status: Option<u32>,
    pub duration_ms: Option<u64>,
    /// The response's body bytes as the proxy counted them (data volume, never the data).
    pub response_bytes: Option<u64>,
    pub trace_id: Option<String>,
    /// True when the step was decided without the state service (degraded mode).
    pub degraded: bool,
    /// Who counted the step: the state service (`service`, through begin-step), or the proxy
    /// alone (`cached` on its shared snapshot, `proxy` in degraded mode or for an MCP
    /// `initialize`). A store checks a service-counted step against its own count.
    pub begun: Begun,
    /// The exact policy input of this step (credentials only as fingerprints): what replay re-runs.
    pub input: Option<RecordedInput>,
    /// What the candidate (shadow) policy decided, when one is configured.
    pub candidate: Option<CandidateOutcome>,
}

/// Who counted a step (`StepRecord::begun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Begun {
    /// Counted by the state service's begin-step: the store knows the step and its subject.
    /// Records written before this field existed read as this, the strict reading.
    #[default]
    Service,
    /// Counted on the proxy's cached snapshot of a session the service had bound.
    Cached,
    /// Counted by the proxy alone: degraded mode, or an MCP `initialize` (whose session id the
    /// upstream assigns only in its answer).
    Proxy,
}

impl Begun {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Cached => "cached",
            Self::Proxy => "proxy",
        }
    }
}

/// What the proxy knows of a step when its decision is taken: the record's facts apart from
/// the decision itself.
pub struct StepFacts<'a> {
    pub session_id: &'a str,
    pub step: u64,
    pub decision_id: &'a str,
    pub at_ms: u64,
    pub identity: &'a Identity,
    pub request: &'a RequestFacts<'a>,
    /// MCP tools this step calls.
    pub tools: &'a [String],
    pub traceparent: &'a str,
    pub risk_before: f64,
    pub policy_version: &'a str,
    /// `enforce` or `shadow`.
    pub mode: &'a str,
    /// Decided without the state service (it was unreachable).
    pub degraded: bool,
    pub begun: Begun,
}

impl StepRecord {
    /// The record of a decided step. The proxy adds the response's status and the duration when
    /// the step completes (a refusal's status is set by the flow).
    pub fn new(f: &StepFacts<'_>, d: &Decision, input: Option<RecordedInput>, candidate: Option<CandidateOutcome>) -> Self {
        let id = f.identity;
        let token = id.token.as_ref();
        let first_call = f.request.mcp.and_then(|m| m.first());
        let headers = f.request.headers;
        Self {
            session_id: f.session_id.to_string(),
            step: f.step,
            decision_id: f.decision_id.to_string(),
            at_ms: f.at_ms,
            subject: id.subject.clone(),
            identity_kind: id.kind.as_str().into(),
            issuer: id.issuer.clone(),
            credential: id.fingerprint.clone(),
            kid: token.and_then(|t| t.kid.clone()),
            jti: token.and_then(|t| t.jti.clone()),
            delegation: token.map(|t| t.delegation.clone()).unwrap_or_default(),
            workload: id.workload.clone(),
            region: f.request.region.map(str::to_string),
            device: f.request.device.map(str::to_string),
            source_address: f.request.source_address.map(str::to_string),
            method: headers.get_str(":method").map(str::to_string),
            authority: headers.get_str(":authority").map(str::to_string),
            // The path the policy decided on and the upstream was sent (canonical); bounded below.
            path: f.request.path.map(str::to_string),
            tool: f.tools.first().cloned(),
            mcp_method: first_call.map(|c| c.method.clone()),
            arguments_digest: first_call.and_then(|c| c.arguments_digest.clone()),
            action: d.action.as_str().into(),
            enforced: f.mode != "shadow",
            reasons: d.reasons.clone(),
            risk_before: f.risk_before,
            risk: d.risk,
            signals: d.signals.clone(),
            flags: d.flags.clone(),
            step_up: d.step_up_satisfied,
            policy_version: f.policy_version.to_string(),
            mode: f.mode.to_string(),
            status: None,
            duration_ms: None,
            trace_id: trace_id(f.traceparent).map(str::to_string),
            response_bytes: None,
            degraded: f.degraded,
            begun: f.begun,
            input,
            candidate,
        }
        .bounded()
    }

    fn bounded(mut self) -> Self {
        self.bound();
        self
    }

    /// Cut every value to its limit (`limits`); the names of the fields cut. The session id and
    /// decision id are not cut: they are the record's identity, and the flow makes them valid.
    pub fn bound(&mut self) -> Vec<&'static str> {
        let mut c = Cuts(Vec::new());
        c.text("subject", &mut self.subject);
        c.text("identity_kind", &mut self.identity_kind);
        c.opt("issuer", &mut self.issuer);
        c.opt("credential", &mut self.credential);
        c.opt("kid", &mut self.kid);
        c.opt("jti", &mut self.jti);
        c.list("delegation", &mut self.delegation, MAX_DELEGATION);
        c.opt("workload", &mut self.workload);
        c.opt("region", &mut self.region);
        c.opt("device", &mut self.device);
        c.opt("source_address", &mut self.source_address);
        c.opt("method", &mut self.method);
        c.opt("authority", &mut self.authority);
        c.opt("path", &mut self.path);
        c.opt("tool", &mut self.tool);
        c.opt("mcp_method", &mut self.mcp_method);
        c.opt("arguments_digest", &mut self.arguments_digest);
        c.text("action", &mut self.action);
        c.list("reasons", &mut self.reasons, MAX_REASONS);
        c.list("signals", &mut self.signals, MAX_REASONS);
        c.list("flags", &mut self.flags, MAX_REASONS);
        c.text("policy_version", &mut self.policy_version);
        c.text("mode", &mut self.mode);
        c.opt("trace_id", &mut self.trace_id);
        if self.input.as_mut().is_some_and(RecordedInput::bound) {
            c.0.push("input");
        }
        if let Some(k) = self.candidate.as_mut() {
            c.text("candidate.policy_version", &mut k.policy_version);
            c.text("candidate.action", &mut k.action);
            c.list("candidate.reasons", &mut k.reasons, MAX_REASONS);
            c.opt("candidate.error", &mut k.error);
        }
        c.0
    }

    /// What this step added to its session (a record carries one tool, and no scopes).
    pub fn seen(&self) -> Seen<'_> {
        Seen::of(&self.credential, &self.workload, &self.region, &self.device, &self.authority, self.tool.as_slice(), &[])
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CandidateOutcome {
    pub policy_version: String,
    pub action: String,
    pub reasons: Vec<String>,
    /// True when it decided another action than the enforced policy.
    pub disagrees: bool,
    /// The candidate failed to evaluate (counted as a disagreement).
    pub error: Option<String>,
}

/// `POST /v1/records` (proxy credential).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordBatch {
    pub records: Vec<StepRecord>,
}

/// The answer to `POST /v1/records`: 200 when every record was appended or already stored,
/// 409 when some were refused (those are listed, and kept in their sessions' audit events);
/// the others are appended either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AppendResult {
    pub appended: u64,
    /// Records already stored (same session, step and decision id): retries are harmless.
    pub duplicates: u64,
    /// Records the trail's invariants refuse (`warden_core::admission`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedRecord>,
}

/// A record refused by the trail's invariants: which one, and why (`admission::Refusal::code`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusedRecord {
    pub session_id: String,
    pub step: u64,
    pub decision_id: String,
    pub code: String,
}

/// One stored record with its place in the session's hash chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrailEntry {
    pub seq: u64,
    pub record: StepRecord,
    /// The record as stored: its canonical JSON text (hash version 2) or, for records written
    /// before hash version 2, the exact text that was hashed.
    pub body: String,
    pub prev_hash: String,
    pub hash: String,
    /// Which chain rule `hash` follows (`trail::HASH_V1`, `trail::HASH_V2`); absent in exports
    /// written before there were two.
    #[serde(default = "crate::trail::legacy_hash_version")]
    pub hash_version: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub at_ms: u64,
    pub kind: String,
    pub subject: String,
    pub credential: Option<String>,
    pub detail: String,
    /// A refused record, whole (its canonical JSON): refused is not lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
}

/// A session's head as its store keeps it: how many records its trail has and the last one's
/// hash. A trail shorter than its head lost its tail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionHead {
    pub records: u64,
    pub hash: String,
}

/// `GET /v1/sessions/{id}` (admin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: String,
    pub state: SessionState,
    pub revoked_at_ms: Option<u64>,
    pub revoke_reason: Option<String>,
    /// Absent in exports written before heads were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<SessionHead>,
    pub timeline: Vec<TrailEntry>,
    pub audit: Vec<AuditEvent>,
}

/// One row of `GET /v1/sessions?subject=&credential=&workload=&since=&until=` (admin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub id: String,
    pub subject: String,
    pub started_at_ms: u64,
    pub last_seen_at_ms: u64,
    pub steps: u64,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<SessionSummary>,
}

/// `POST /v1/sessions/{id}/revoke` (admin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RevokeRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    pub cursor: u64,
    pub session_id: String,
    pub at_ms: u64,
    pub reason: String,
}

/// `GET /v1/revocations?after=<cursor>` (proxy credential).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevocationFeed {
    pub revocations: Vec<Revocation>,
    /// Pass as `after` next time.
    pub cursor: u64,
}

/// Every error answer of the service: a stable code and a sentence, never internals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}
