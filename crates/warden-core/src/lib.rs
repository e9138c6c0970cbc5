//! Session Warden's host-agnostic core. The proxy-wasm crate hands it the request headers and a
//! `Host`; it answers with a `RequestOutcome` that says which headers to strip and stamp, or
//! which local reply to send. Nothing here imports proxy_wasm, so all of it is tested natively.

pub mod config;
pub mod correlation;
pub mod decision;
pub mod error;
pub mod hash;
pub mod host;
pub mod identity;
pub mod input;
pub mod mcp;
pub mod metrics;
pub mod policy;
pub mod session;
pub mod trail;
pub mod wire;

use config::{FailureMode, JwksUriConfig, Mode, PluginConfig, StateMode};
use correlation::{DECISION_HEADER, SESSION_HEADER, STEP_HEADER, SUBJECT_HEADER, TRACEPARENT};
use decision::{Action, Decision};
use error::{ConfigError, IdentityError};
use host::{Headers, Host};
use identity::jwks::{parse_jwks, KeySet};
use identity::jwt::{JwtVerifier, Provider};
use identity::Identifier;
use policy::{Policy, PolicySource};
use session::{BeginError, LocalSessions, SessionRef, SessionState, Seen};
use wire::{BeginOutcome, BeginResponse, BeginStep, StepRecord};

/// A local reply in place of the upstream's response.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What the proxy does with one request.
#[derive(Debug, Default)]
pub struct RequestOutcome {
    /// Client-sent copies of stamped headers, to remove before anything is forwarded.
    pub remove_headers: Vec<String>,
    /// Headers to set on the request that goes upstream.
    pub set_headers: Vec<(String, String)>,
    /// Refuse the request with this reply instead of forwarding it.
    pub reply: Option<LocalReply>,
    /// Headers for the client on the upstream's response.
    pub response_headers: Vec<(String, String)>,
    /// Counters to increment (names are documented in README).
    pub metrics: Vec<String>,
    /// The decision taken (enforced or, in shadow mode, the one that would have been).
    pub decision: Option<Decision>,
    pub decision_id: String,
    pub session_id: Option<String>,
    /// One line for the proxy's log when something noteworthy happened.
    pub log: Option<String>,
    /// The step's attribution record; the proxy adds status and duration and queues it.
    pub record: Option<StepRecord>,
    /// An MCP `initialize` without a session: the session id the MCP server assigns in its
    /// response (`mcp-session-id`) becomes the governed session (see `Warden::adopt_session`).
    pub adopt_session: bool,
}

/// What the headers phase of an MCP request fixed before the body is read: proxy-wasm hosts
/// only deliver a body once the headers have gone on, so these are stamped upstream first and
/// the body phase decides under the same ids.
#[derive(Debug, Clone)]
pub struct Early {
    pub decision_id: String,
    pub traceparent: String,
    pub minted_session: Option<String>,
}

/// The request body, for requests whose body the filter reads (MCP).
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    Absent,
    Complete(&'a [u8]),
    TooLarge,
}

/// The result of the first half of the request flow. Returned once per request and matched at
/// once, so the size difference between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// Decided: apply the outcome.
    Done(RequestOutcome),
    /// Sync mode (or a cache miss): send `call` to the state service, then `Warden::resume`.
    Call { pending: Box<Pending>, call: StateCall },
}

/// A POST to the state service (the proxy adds method, authority, token and content type).
#[derive(Debug, Clone)]
pub struct StateCall {
    pub path: &'static str,
    pub body: Vec<u8>,
}

/// A request waiting for the state service.
pub struct Pending {
    out: RequestOutcome,
    headers: Headers,
    identity: identity::Identity,
    session: SessionRef,
    traceparent: String,
    now_ms: u64,
    mcp: Option<mcp::McpRequest>,
    /// MCP tools this request calls.
    tools: Vec<String>,
}

impl Pending {
    fn seen<'a>(&'a self, cfg: &'a PluginConfig) -> Seen<'a> {
        Seen {
            credential: self.identity.fingerprint.as_deref(),
            workload: self.identity.workload.as_deref(),
            region: self.headers.get_str(&cfg.context.region_header),
            device: self.headers.get_str(&cfg.context.device_header),
            tools: &self.tools,
            scopes: &self.identity.scopes,
        }
    }
}

enum Cached {
    Hit(Box<SessionState>, u64),
    Refused(BeginError),
    Miss,
}

const CACHE_PREFIX: &str = "session-warden.session.";

fn cache_get(host: &dyn Host, id: &str) -> Option<(SessionState, u32)> {
    let (bytes, cas) = host.shared_get(&format!("{CACHE_PREFIX}{id}"))?;
    serde_json::from_slice(&bytes).ok().map(|s| (s, cas))
}

fn cache_put(host: &mut dyn Host, id: &str, state: &SessionState, cas: Option<u32>) -> bool {
    match serde_json::to_vec(state) {
        Ok(bytes) => host.shared_set(&format!("{CACHE_PREFIX}{id}"), &bytes, cas),
        Err(_) => false,
    }
}

/// A JWKS the proxy must fetch and keep fresh.
#[derive(Debug, Clone)]
pub struct JwksTarget {
    pub provider: usize,
    pub name: String,
    pub uri: JwksUriConfig,
}

pub struct Warden {
    pub config: PluginConfig,
    identifier: Identifier,
    policy: Policy,
    candidate: Option<Policy>,
    sessions: LocalSessions,
}

impl Warden {
    /// Parse, validate and compile a configuration: the one thing `on_configure` calls.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::new(config::parse(bytes)?)
    }

    pub fn new(config: PluginConfig) -> Result<Self, ConfigError> {
        let jwt = match &config.identity.jwt {
            Some(j) => {
                let mut providers = Vec::new();
                for (i, p) in j.providers.iter().enumerate() {
                    let keys = match &p.jwks {
                        Some(doc) => parse_jwks(doc, &p.algorithms)
                            .map_err(|e| ConfigError::new(&format!("identity.jwt.providers[{i}].jwks"), &e))?
                            .0,
                        None => KeySet::default(),
                    };
                    providers.push(Provider { config: p.clone(), keys });
                }
                Some(JwtVerifier::new(providers, config.token_cache.max_entries))
            }
            None => None,
        };
        let identifier = Identifier::new(&config.identity, jwt);
        let policy = Policy::compile(&PolicySource {
            modules: config.policy.modules.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            data: config.policy.data.as_ref(),
            entrypoint: &config.policy.entrypoint,
            max_instructions: config.policy.max_instructions,
        })
        .map_err(|e| ConfigError::new("policy", &e.0))?;
        let candidate = match &config.policy.candidate {
            Some(c) => Some(
                Policy::compile(&PolicySource {
                    modules: c.modules.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
                    data: c.data.as_ref(),
                    entrypoint: &c.entrypoint,
                    max_instructions: config.policy.max_instructions,
                })
                .map_err(|e| ConfigError::new("policy.candidate", &e.0))?,
            ),
            None => None,
        };
        let sessions = LocalSessions::new(config.session.local_max_sessions);
        Ok(Self { config, identifier, policy, candidate, sessions })
    }

    pub fn policy_version(&self) -> &str {
        &self.policy.version
    }

    pub fn candidate_version(&self) -> Option<&str> {
        self.candidate.as_ref().map(|c| c.version.as_str())
    }

    /// Why the policy runs on the interpreter rather than the RVM, if it does.
    pub fn policy_fallback(&self) -> Option<&str> {
        self.policy.fallback_reason.as_deref()
    }

    pub fn jwks_targets(&self) -> Vec<JwksTarget> {
        let Some(jwt) = &self.config.identity.jwt else { return Vec::new() };
        jwt.providers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.jwks_uri.clone().map(|uri| JwksTarget { provider: i, name: p.name.clone(), uri }))
            .collect()
    }

    /// Install a fetched JWKS for a provider. On error the keys in use are kept.
    pub fn install_jwks(&mut self, provider: usize, body: &[u8]) -> Result<usize, String> {
        let algs = self
            .config
            .identity
            .jwt
            .as_ref()
            .and_then(|j| j.providers.get(provider))
            .map(|p| p.algorithms.clone())
            .ok_or("no such provider")?;
        let doc: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let (keys, _) = parse_jwks(&doc, &algs)?;
        let n = keys.keys.len();
        if let Some(v) = self.identifier.jwt_mut() {
            v.set_keys(provider, keys);
        }
        Ok(n)
    }

    /// Begin the per-request flow of DESIGN.md: strip, identify, resolve the session, and then
    /// either decide now (local or cached state) or ask the state service first (sync mode).
    /// Whether the filter must read this request's body before deciding (MCP JSON-RPC POSTs).
    pub fn wants_body(&self, headers: &Headers) -> bool {
        if headers.get_str(":method") != Some("POST") {
            return false;
        }
        let path = headers.get_str(":path").unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default();
        headers.get("mcp-session-id").is_some() || self.config.mcp.paths.iter().any(|p| path.starts_with(p.as_str()))
    }

    pub fn max_body_bytes(&self) -> usize {
        self.config.mcp.max_body_bytes
    }

    /// The headers phase of a request whose body is read (MCP): refuse now what can be refused
    /// on headers alone (credential, session id); otherwise strip and stamp what is known and let
    /// the headers go on. `on_request` with the body and this `Early` decides.
    pub fn on_body_request_headers(&mut self, headers: &Headers, host: &mut dyn Host) -> Result<(Early, RequestOutcome), Box<RequestOutcome>> {
        let early = Early {
            decision_id: correlation::new_decision_id(host),
            traceparent: match headers.get_str(TRACEPARENT) {
                Some(tp) if correlation::is_valid_traceparent(tp) => tp.to_string(),
                _ => correlation::new_traceparent(host),
            },
            minted_session: None,
        };
        let mut out = RequestOutcome { decision_id: early.decision_id.clone(), ..Default::default() };
        out.remove_headers =
            headers.names().filter(|n| n.starts_with(config::STAMPED_HEADER_PREFIX)).map(str::to_string).collect();
        let now_s = host.now_ms() / 1000;
        let identity = match self.identifier.identify(headers, host, now_s) {
            Ok(id) => id,
            // Counted and answered by the body phase's full run, which sees the same failure.
            Err(_) => return Err(Box::new(self.full_run_refusal(headers, host, &early))),
        };
        let session = match session::resolve(&self.config.session, headers, &identity, host) {
            Ok(s) => s,
            Err(_) => return Err(Box::new(self.full_run_refusal(headers, host, &early))),
        };
        let early = Early { minted_session: (session.source == session::SessionSource::Minted).then(|| session.id.clone()), ..early };
        out.set_headers.push((SESSION_HEADER.into(), session.id.clone()));
        out.set_headers.push((DECISION_HEADER.into(), early.decision_id.clone()));
        if !identity.subject.is_empty() {
            out.set_headers.push((SUBJECT_HEADER.into(), identity.subject.clone()));
        }
        out.set_headers.push((TRACEPARENT.into(), early.traceparent.clone()));
        Ok((early, out))
    }

    fn full_run_refusal(&mut self, headers: &Headers, host: &mut dyn Host, early: &Early) -> RequestOutcome {
        match self.on_request_early(headers.clone(), Body::Absent, Some(early), host) {
            Step::Done(out) => out,
            // Identity and session failures never reach the state service.
            Step::Call { pending, .. } => pending.out,
        }
    }

    pub fn on_request(&mut self, headers: Headers, body: Body<'_>, host: &mut dyn Host) -> Step {
        self.on_request_early(headers, body, None, host)
    }

    /// The whole flow; `early` carries the ids an MCP request's headers phase already stamped.
    pub fn on_request_early(&mut self, headers: Headers, body: Body<'_>, early: Option<&Early>, host: &mut dyn Host) -> Step {
        let now_ms = host.now_ms();
        let shadow = self.config.mode == Mode::Shadow;
        let decision_id = match early {
            Some(e) => e.decision_id.clone(),
            None => correlation::new_decision_id(host),
        };
        let mut out = RequestOutcome { decision_id, ..Default::default() };
        out.metrics.push(metrics::REQUESTS.into());

        // 1. Nothing a client sends under our names survives.
        out.remove_headers =
            headers.names().filter(|n| n.starts_with(config::STAMPED_HEADER_PREFIX)).map(str::to_string).collect();
        let traceparent = match (early, headers.get_str(TRACEPARENT)) {
            (Some(e), _) => e.traceparent.clone(),
            (None, Some(tp)) if correlation::is_valid_traceparent(tp) => tp.to_string(),
            _ => correlation::new_traceparent(host),
        };

        // 2. Identify.
        let identity = match self.identifier.identify(&headers, host, now_ms / 1000) {
            Ok(id) => id,
            Err(e) => {
                out.metrics.push(metrics::identity_failure(e.code()));
                if shadow {
                    out.metrics.push(metrics::shadow("unauthenticated"));
                    out.log = Some(format!("shadow: would refuse the credential ({})", e.code()));
                    out.set_headers.push((DECISION_HEADER.into(), out.decision_id.clone()));
                    out.set_headers.push((TRACEPARENT.into(), traceparent));
                    return Step::Done(out);
                }
                out.reply = Some(unauthenticated(e, &out.decision_id));
                return Step::Done(out);
            }
        };
        if identity.kind == identity::IdentityKind::Jwt {
            out.metrics.push(if identity.token_cache_hit { metrics::JWT_CACHE_HIT } else { metrics::JWT_CACHE_MISS }.into());
        }

        // MCP: what the JSON-RPC message asks for.
        let mcp = match body {
            // Most requests: no body was read, nothing to check.
            Body::Absent => None,
            _ if !self.wants_body(&headers) => None,
            Body::TooLarge => {
                return Step::Done(self.refuse(out, Decision::internal(Action::Deny, "mcp_body_too_large"), None, 413, shadow, None));
            }
            Body::Complete(b) => match mcp::parse(b) {
                Ok(m) => Some(m),
                Err(e) => return Step::Done(self.refuse(out, Decision::internal(Action::Deny, e.code()), None, 400, shadow, None)),
            },
        };
        let tools: Vec<String> = mcp.as_ref().map(|m| m.tools().map(str::to_string).collect()).unwrap_or_default();

        // 3. Resolve the session (under the id the headers phase already stamped, if any).
        let resolved = match early.and_then(|e| e.minted_session.clone()) {
            Some(id) => Ok(SessionRef { id, source: session::SessionSource::Minted }),
            None => session::resolve(&self.config.session, &headers, &identity, host),
        };
        let session = match resolved {
            Ok(s) => s,
            Err(session::MalformedSessionId) => {
                return Step::Done(self.refuse(out, Decision::internal(Action::Deny, "session_id_malformed"), None, 400, shadow, None));
            }
        };
        if session.source == session::SessionSource::Minted {
            out.metrics.push(metrics::SESSIONS_NEW.into());
        }
        // An MCP `initialize` opens a session whose id the MCP server assigns in its answer: it is
        // decided as a new session here and adopted under that id when the answer comes.
        let initialize = session.source == session::SessionSource::Minted
            && mcp.as_ref().and_then(|m| m.first()).is_some_and(|c| c.method == "initialize");
        let ctx = Pending { out, headers, identity, session, traceparent, now_ms, mcp, tools };

        // A session this proxy knows to be revoked goes no further, whatever the mode.
        if self.sessions.is_revoked(&ctx.session.id) {
            return Step::Done(self.refused_session(ctx, BeginError::Revoked));
        }

        // 4. Load the session state.
        let Some(state) = self.config.state.clone() else {
            return Step::Done(self.begin_locally(ctx, host, false));
        };
        if initialize {
            let mut out = self.begin_locally(ctx, host, false);
            out.adopt_session = out.reply.is_none();
            return Step::Done(out);
        }
        if state.mode == StateMode::Cached {
            match self.begin_cached(&ctx, host) {
                Cached::Hit(before, step) => return Step::Done(self.decide(ctx, *before, step, false, false, host)),
                Cached::Refused(why) => return Step::Done(self.refused_session(ctx, why)),
                Cached::Miss => {}
            }
        }
        let seen = ctx.seen(&self.config);
        let req = BeginStep {
            session_id: ctx.session.id.clone(),
            subject: ctx.identity.subject.clone(),
            credential: seen.credential.map(str::to_string),
            workload: seen.workload.map(str::to_string),
            region: seen.region.map(str::to_string),
            device: seen.device.map(str::to_string),
            tools: ctx.tools.clone(),
            known_steps: self.sessions.steps(&ctx.session.id),
            scopes: ctx.identity.scopes.clone(),
        };
        let body = serde_json::to_vec(&req).unwrap_or_default();
        Step::Call { pending: Box::new(ctx), call: StateCall { path: "/v1/steps/begin", body } }
    }

    /// Finish a request that waited for the state service. `Err` is the service being
    /// unavailable (no answer, timeout, an error status): the policy decides, degraded.
    pub fn resume(&mut self, pending: Box<Pending>, answer: Result<BeginResponse, String>, host: &mut dyn Host) -> RequestOutcome {
        let mut ctx = *pending;
        match answer {
            Ok(resp) => match resp.outcome {
                BeginOutcome::Ok => {
                    let mut before = resp.session;
                    // This VM's own latest view of what decisions left behind (risk, flags, a
                    // step-up) is newer than what the service has heard through the trail.
                    if let Some(mine) = self.sessions.get(&ctx.session.id) {
                        before.overlay_decisions(mine);
                    }
                    let mut after = before.clone();
                    after.steps = resp.step;
                    after.last_seen_at_ms = ctx.now_ms;
                    after.remember(&ctx.seen(&self.config));
                    if self.config.state.as_ref().is_some_and(|s| s.mode == StateMode::Cached) {
                        cache_put(host, &ctx.session.id, &after, None);
                    }
                    self.sessions.put(&ctx.session.id, after);
                    self.decide(ctx, before, resp.step, resp.new, false, host)
                }
                BeginOutcome::SubjectMismatch => self.refused_session(ctx, BeginError::SubjectMismatch),
                BeginOutcome::Revoked => {
                    self.sessions.revoke(&ctx.session.id);
                    self.refused_session(ctx, BeginError::Revoked)
                }
            },
            Err(why) => {
                ctx.out.metrics.push(metrics::STATE_UNAVAILABLE.into());
                ctx.out.log = Some(format!("session state unavailable ({why}); the policy decides with session.unavailable = true"));
                self.begin_locally(ctx, host, true)
            }
        }
    }

    /// A revocation from the service's feed (cached mode) or a terminate decision.
    pub fn apply_revocation(&mut self, session_id: &str, host: &mut dyn Host) {
        self.sessions.revoke(session_id);
        if self.config.state.as_ref().is_some_and(|s| s.mode == StateMode::Cached) {
            for _ in 0..4 {
                let (mut state, cas) = match cache_get(host, session_id) {
                    Some((s, cas)) => (s, Some(cas)),
                    None => (SessionState::default(), None),
                };
                state.revoked = true;
                if cache_put(host, session_id, &state, cas) {
                    break;
                }
            }
        }
    }

    /// Keep what a decision leaves behind (risk, flags, a satisfied step-up) for the session's
    /// next step: in this VM's table and, in cached mode, in the shared snapshot.
    fn after_decision(&mut self, id: &str, d: &Decision, now_ms: u64, host: &mut dyn Host) {
        let stepped = d.step_up_satisfied.then_some(now_ms);
        if let Some(mine) = self.sessions.get_mut(id) {
            mine.after_decision(d.risk, &d.flags, stepped);
        }
        if self.config.state.as_ref().is_some_and(|s| s.mode == StateMode::Cached) {
            for _ in 0..4 {
                let Some((mut state, cas)) = cache_get(host, id) else { break };
                state.after_decision(d.risk, &d.flags, stepped);
                if cache_put(host, id, &state, Some(cas)) {
                    break;
                }
            }
        }
    }

    /// The MCP server named the session of an `initialize` (its `mcp-session-id`): the step
    /// moves under that id, and the session continues under it.
    pub fn adopt_session(&mut self, minted: &str, assigned: &str, record: Option<&mut StepRecord>, host: &mut dyn Host) -> bool {
        if !session::is_valid_session_id(assigned) || minted == assigned {
            return false;
        }
        if let Some(state) = self.sessions.get(minted).cloned() {
            if self.config.state.as_ref().is_some_and(|s| s.mode == StateMode::Cached) {
                cache_put(host, assigned, &state, None);
            }
            self.sessions.put(assigned, state);
        }
        if let Some(r) = record {
            r.session_id = assigned.to_string();
        }
        true
    }

    /// The proxy VM's own session table: no service configured, or the service unavailable.
    fn begin_locally(&mut self, ctx: Pending, host: &mut dyn Host, unavailable: bool) -> RequestOutcome {
        let seen = ctx.seen(&self.config);
        match self.sessions.begin_step(&ctx.session.id, &ctx.identity.subject, &seen, ctx.now_ms) {
            Ok((before, is_new)) => {
                let step = before.steps + 1;
                self.decide(ctx, before, step, is_new, unavailable, host)
            }
            Err(e) => self.refused_session(ctx, e),
        }
    }

    /// Cached mode: take the step on the shared snapshot with compare-and-swap, so every worker
    /// of this proxy counts the same session the same way.
    fn begin_cached(&self, ctx: &Pending, host: &mut dyn Host) -> Cached {
        let seen = ctx.seen(&self.config);
        for _ in 0..4 {
            let Some((mut state, cas)) = cache_get(host, &ctx.session.id) else { return Cached::Miss };
            // A snapshot with no subject only marks a revocation heard of before the session
            // was: its first step goes through the service, which binds it.
            if state.subject.is_empty() && !state.revoked {
                return Cached::Miss;
            }
            let before = match state.begin_step(&ctx.identity.subject, &seen, ctx.now_ms) {
                Ok(before) => before,
                Err(e) => return Cached::Refused(e),
            };
            if cache_put(host, &ctx.session.id, &state, Some(cas)) {
                return Cached::Hit(Box::new(before), state.steps);
            }
        }
        Cached::Miss
    }

    fn refused_session(&mut self, ctx: Pending, why: BeginError) -> RequestOutcome {
        let shadow = self.config.mode == Mode::Shadow;
        let mut out = ctx.out;
        match why {
            BeginError::SubjectMismatch => {
                out.metrics.push(metrics::SESSION_BINDING_VIOLATIONS.into());
                out.log = Some(format!("session {} presented by another subject ({})", ctx.session.id, ctx.identity.subject));
                self.refuse(out, Decision::internal(Action::Deny, "session_bound_to_other_subject"), Some(&ctx.session), 403, shadow, ctx.mcp.as_ref())
            }
            BeginError::Revoked => {
                self.refuse(out, Decision::internal(Action::Deny, "session_revoked"), Some(&ctx.session), 403, shadow, ctx.mcp.as_ref())
            }
        }
    }

    /// Decide, enforce, correlate, and prepare the step's attribution record.
    fn decide(&mut self, ctx: Pending, before: SessionState, step: u64, is_new: bool, unavailable: bool, host: &mut dyn Host) -> RequestOutcome {
        let shadow = self.config.mode == Mode::Shadow;
        let region = ctx.headers.get_str(&self.config.context.region_header).map(str::to_string);
        let device = ctx.headers.get_str(&self.config.context.device_header).map(str::to_string);
        let Pending { mut out, headers, identity, session, traceparent, now_ms, mcp, tools } = ctx;
        let source_address = host.property(&["source", "address"]).and_then(|v| String::from_utf8(v).ok());
        let facts = input::RequestFacts {
            headers: &headers,
            input_headers: &self.config.policy.input_headers,
            source_address: source_address.as_deref(),
            region: region.as_deref(),
            device: device.as_deref(),
            mcp: mcp.as_ref(),
        };
        let sess = input::SessionFacts { session: &session, before: &before, is_new, unavailable };
        let mode = if shadow { "shadow" } else { "enforce" };
        let input = input::build(now_ms, mode, &facts, &identity, &sess);
        // Records only go somewhere when a state service is configured.
        let recording = self.config.state.is_some();
        let recorded_input = if recording && self.config.policy.record_input { wire::RecordedInput::new(&input) } else { None };
        // The candidate sees the very same input (values are shared, not copied).
        let candidate_result = self.candidate.as_mut().map(|c| (c.version.clone(), c.eval(input.clone()).and_then(|v| decision::parse_output(&v))));
        let decision = match self.policy.eval(input).and_then(|v| decision::parse_output(&v)) {
            Ok(d) => d,
            Err(e) => {
                out.metrics.push(metrics::POLICY_ERRORS.into());
                out.log = Some(format!("policy error: {e}"));
                match self.config.policy.on_error {
                    FailureMode::Deny => Decision::internal(Action::Deny, "policy_error"),
                    FailureMode::Allow => Decision::internal(Action::Allow, "policy_error_allowed"),
                }
            }
        };
        let candidate = candidate_result.map(|(version, result)| {
            out.metrics.push(metrics::CANDIDATE_EVALUATIONS.into());
            let c = match result {
                Ok(d) => wire::CandidateOutcome {
                    policy_version: version,
                    action: d.action.as_str().into(),
                    disagrees: d.action != decision.action,
                    reasons: d.reasons,
                    error: None,
                },
                Err(e) => wire::CandidateOutcome { policy_version: version, disagrees: true, error: Some(e.0), ..Default::default() },
            };
            if c.disagrees {
                out.metrics.push(metrics::CANDIDATE_DISAGREEMENTS.into());
            }
            c
        });
        let mut record = recording.then(|| StepRecord {
            session_id: session.id.clone(),
            step,
            decision_id: out.decision_id.clone(),
            at_ms: now_ms,
            subject: identity.subject.clone(),
            identity_kind: identity.kind.as_str().into(),
            issuer: identity.issuer.clone(),
            credential: identity.fingerprint.clone(),
            kid: identity.token.as_ref().and_then(|t| t.kid.clone()),
            jti: identity.token.as_ref().and_then(|t| t.jti.clone()),
            delegation: identity.token.as_ref().map(|t| t.delegation.clone()).unwrap_or_default(),
            workload: identity.workload.clone(),
            region,
            device,
            source_address,
            method: headers.get_str(":method").map(str::to_string),
            authority: headers.get_str(":authority").map(str::to_string),
            path: headers.get_str(":path").map(|p| p.chars().take(1024).collect()),
            tool: tools.first().cloned(),
            mcp_method: mcp.as_ref().and_then(|m| m.first()).map(|c| c.method.clone()),
            arguments_digest: mcp.as_ref().and_then(|m| m.first()).and_then(|c| c.arguments_digest.clone()),
            action: decision.action.as_str().into(),
            enforced: !shadow,
            reasons: decision.reasons.clone(),
            risk_before: before.risk,
            risk: decision.risk,
            signals: decision.signals.clone(),
            flags: decision.flags.clone(),
            step_up: decision.step_up_satisfied,
            policy_version: self.policy.version.clone(),
            mode: mode.into(),
            status: None,
            duration_ms: None,
            trace_id: correlation::trace_id(&traceparent).map(str::to_string),
            degraded: unavailable,
            input: recorded_input,
            candidate,
        });

        // 5. Enforce.
        if !shadow {
            self.after_decision(&session.id, &decision, now_ms, host);
        }
        if decision.action != Action::Allow {
            if decision.action == Action::Terminate && !shadow {
                self.apply_revocation(&session.id, host);
            }
            let status = match decision.action {
                Action::StepUp => 401,
                Action::Throttle => 429,
                _ => 403,
            };
            if !shadow {
                let mut out = self.refuse(out, decision, Some(&session), status, false, mcp.as_ref());
                out.set_headers.push((STEP_HEADER.into(), step.to_string()));
                if let Some(r) = record.as_mut() {
                    r.status = Some(status);
                }
                out.record = record;
                return out;
            }
            out.metrics.push(metrics::shadow(decision.action.as_str()));
            out.log = Some(format!("shadow: would {} ({})", decision.action.as_str(), decision.reasons.join(",")));
        } else {
            out.metrics.push(metrics::decision(Action::Allow.as_str()));
        }

        // 6. Correlate.
        out.set_headers.push((SESSION_HEADER.into(), session.id.clone()));
        out.set_headers.push((STEP_HEADER.into(), step.to_string()));
        out.set_headers.push((DECISION_HEADER.into(), out.decision_id.clone()));
        if !identity.subject.is_empty() {
            out.set_headers.push((SUBJECT_HEADER.into(), identity.subject.clone()));
        }
        out.set_headers.push((TRACEPARENT.into(), traceparent));
        if decision.action == Action::Allow {
            out.set_headers.extend(decision.headers.iter().cloned());
        }
        out.response_headers.push((SESSION_HEADER.into(), session.id.clone()));
        out.response_headers.push((DECISION_HEADER.into(), out.decision_id.clone()));
        out.session_id = Some(session.id);
        out.decision = Some(decision);
        out.record = record;
        out
    }

    /// Refuse with a local reply, or in shadow mode count what would have happened and go on.
    fn refuse(
        &self,
        mut out: RequestOutcome,
        d: Decision,
        session: Option<&SessionRef>,
        status: u32,
        shadow: bool,
        mcp: Option<&mcp::McpRequest>,
    ) -> RequestOutcome {
        if shadow {
            out.metrics.push(metrics::shadow(d.action.as_str()));
            out.set_headers.push((DECISION_HEADER.into(), out.decision_id.clone()));
            if let Some(s) = session {
                out.set_headers.push((SESSION_HEADER.into(), s.id.clone()));
                out.response_headers.push((SESSION_HEADER.into(), s.id.clone()));
            }
            out.response_headers.push((DECISION_HEADER.into(), out.decision_id.clone()));
            out.session_id = session.map(|s| s.id.clone());
            out.decision = Some(d);
            return out;
        }
        out.metrics.push(metrics::decision(d.action.as_str()));
        let mut headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            (DECISION_HEADER.to_string(), out.decision_id.clone()),
        ];
        if let Some(s) = session {
            headers.push((SESSION_HEADER.to_string(), s.id.clone()));
        }
        let mut error = match d.action {
            Action::StepUp => {
                let mut challenge = String::from(
                    "Bearer error=\"insufficient_user_authentication\", error_description=\"A stronger authentication is required for this session\"",
                );
                if let Some(acr) = &d.acr_values {
                    challenge.push_str(&format!(", acr_values=\"{acr}\""));
                }
                if let Some(age) = d.max_age {
                    challenge.push_str(&format!(", max_age={age}"));
                }
                headers.push(("www-authenticate".into(), challenge));
                "step_up_required"
            }
            Action::Throttle => {
                let secs = d.retry_after.unwrap_or(self.config.policy.default_retry_after);
                headers.push(("retry-after".into(), secs.to_string()));
                "throttled"
            }
            Action::Terminate => "session_terminated",
            _ if status == 400 => "bad_request",
            _ => "forbidden",
        };
        if status == 413 {
            error = "payload_too_large";
        }
        let body = serde_json::json!({
            "error": error,
            "action": d.action.as_str(),
            "reasons": d.reasons,
            "decision_id": out.decision_id,
            "session_id": session.map(|s| s.id.as_str()),
        });
        // MCP clients get refusals of what they asked as JSON-RPC errors (still with the 403, which
        // MCP clients read the error from); step-up and throttle stay plain HTTP (401 / 429),
        // where MCP clients handle authorization and back-off.
        let body = match mcp {
            Some(m) if self.config.mcp.jsonrpc_errors && status == 403 => {
                mcp::jsonrpc_error(m, -32001, &format!("refused by session policy: {}", d.reasons.join(", ")), body)
            }
            _ => body,
        };
        out.reply = Some(LocalReply { status, headers, body: body.to_string().into_bytes() });
        out.session_id = session.map(|s| s.id.clone());
        out.decision = Some(d);
        out
    }
}

/// 401 (or 400 for an unreadable header) with an RFC 6750 challenge and a reason code.
fn unauthenticated(e: IdentityError, decision_id: &str) -> LocalReply {
    let challenge = match e.bearer_error() {
        Some(code) => format!("Bearer realm=\"session-warden\", error=\"{code}\", error_description=\"{}\"", e.code()),
        None => "Bearer realm=\"session-warden\"".to_string(),
    };
    let body = serde_json::json!({
        "error": if e.status() == 400 { "bad_request" } else { "unauthenticated" },
        "reason": e.code(),
        "decision_id": decision_id,
    });
    LocalReply {
        status: e.status(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("www-authenticate".into(), challenge),
            (DECISION_HEADER.into(), decision_id.to_string()),
        ],
        body: body.to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests;
