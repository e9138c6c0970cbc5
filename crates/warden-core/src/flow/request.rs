//! The first half of a request's flow: strip client copies of our headers, identify, read an
//! MCP body, resolve the session and take the step on the session's state (the proxy's own
//! table, the shared snapshot, or the state service in sync mode, resumed in `resume`). What
//! every path ends in, a decision, is `decide.rs`.

use super::reply::unauthenticated;
use super::decide::Counted;
use super::snapshot::Cached;
use super::{Body, Context, Early, Pending, RequestOutcome, StateCall, StateFailure, Step, Warden};
use crate::config::{self, Mode, MAX_CONTEXT_VALUE};
use crate::correlation::{self, DECISION_HEADER, SESSION_HEADER, SUBJECT_HEADER, TRACEPARENT};
use crate::decision::{Action, Decision};
use crate::error::IdentityError;
use crate::host::{Headers, Host};
use crate::identity::{direct_peer, Identity, IdentityKind};
use crate::mcp;
use crate::metrics;
use crate::path::{self, CanonicalPath, PathError};
use crate::session::{self, BeginError, SessionRef, SessionSource};
use crate::wire::{self, limits, BeginOutcome, BeginResponse, BeginStep};

/// Client-sent headers under our prefix: none of them survives.
fn stamped_by_client(headers: &Headers) -> Vec<String> {
    headers.names().filter(|n| n.starts_with(config::STAMPED_HEADER_PREFIX)).map(str::to_string).collect()
}

/// What an identity carries into the session, the policy, the stamped headers and the trail,
/// cut to the wire's limits here, once: the proxy's table, the shared snapshot and the service
/// then all bind the session to the same subject.
fn bound_identity(identity: &mut Identity) {
    wire::bound_text(&mut identity.subject, limits::MAX_TEXT_BYTES);
    if let Some(w) = identity.workload.as_mut() {
        wire::bound_text(w, limits::MAX_TEXT_BYTES);
    }
    wire::bound_list(&mut identity.scopes, limits::MAX_SCOPES);
}

/// The client's trace context if it is valid, else a new one.
fn traceparent_of(headers: &Headers, host: &mut dyn Host) -> String {
    match headers.get_str(TRACEPARENT) {
        Some(tp) if correlation::is_valid_traceparent(tp) => tp.to_string(),
        _ => correlation::new_traceparent(host),
    }
}

/// The canonical form of `:path` (`path.rs`); `None` when there is no `:path` (CONNECT).
fn canonical_path(headers: &Headers) -> Result<Option<CanonicalPath>, PathError> {
    headers.get(":path").map(path::canonicalize).transpose()
}

/// A JSON media type: what a JSON-RPC body is sent as (`application/json`, `application/*+json`,
/// `application/json-rpc`), parameters ignored.
fn is_json(headers: &Headers) -> bool {
    let Some(ct) = headers.get_str("content-type") else { return false };
    let media = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    media == "application/json" || media == "application/json-rpc" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// How a POST says it may carry MCP JSON-RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum McpSignal {
    /// An `Mcp-Method` or `mcp-session-id` header, or a configured MCP path: the body must be
    /// JSON-RPC (else 400).
    Declared,
    /// Only a JSON content type: a JSON-RPC body is MCP; other JSON is REST traffic.
    Json,
}

/// Whether a body that is not a valid MCP message could still be read as JSON-RPC by a lenient
/// upstream: such a body is refused rather than passed as REST traffic.
fn mentions_jsonrpc(body: &[u8]) -> bool {
    body.windows(7).any(|w| w == b"jsonrpc")
}

impl Warden {
    /// What makes this request MCP, if anything. The configured paths are compared with the
    /// canonical path, so `/%6dcp` or `//mcp` is MCP as `/mcp` is.
    fn mcp_signal(&self, headers: &Headers, path: Option<&CanonicalPath>) -> Option<McpSignal> {
        if headers.get_str(":method") != Some("POST") {
            return None;
        }
        let on_mcp_path = path.is_some_and(|p| self.config.mcp.paths.iter().any(|m| p.path.starts_with(m.as_str())));
        if on_mcp_path || headers.get("mcp-method").is_some() || headers.get("mcp-session-id").is_some() {
            Some(McpSignal::Declared)
        } else if is_json(headers) {
            Some(McpSignal::Json)
        } else {
            None
        }
    }

    /// Whether the filter must read this request's body before deciding: a POST that is, or may
    /// be, MCP JSON-RPC. A path that canonicalization refuses is refused on headers alone.
    pub fn wants_body(&self, headers: &Headers) -> bool {
        match canonical_path(headers) {
            Ok(path) => self.mcp_signal(headers, path.as_ref()).is_some(),
            Err(_) => false,
        }
    }

    /// Whether this request is decided on its headers before its body is read: a 2026-07-28 MCP
    /// request, which declares its method (and tool, prompt or resource) in `Mcp-Method` and
    /// `Mcp-Name`. Its body is then held to what the headers declared (`mcp::declared::agree`).
    pub fn decides_at_headers(&self, headers: &Headers) -> bool {
        mcp::declared::is_declared(headers) && self.wants_body(headers)
    }

    pub fn max_body_bytes(&self) -> usize {
        self.config.mcp.max_body_bytes
    }

    /// The headers phase of a request whose body is read (MCP): refuse now what can be refused
    /// on headers alone (credential, session id); otherwise strip and stamp what is known and let
    /// the headers go on. `on_request_early` with the body and this `Early` decides.
    pub fn on_body_request_headers(&mut self, headers: &Headers, host: &mut dyn Host) -> Result<(Early, RequestOutcome), Box<RequestOutcome>> {
        let early = Early { decision_id: correlation::new_decision_id(host), traceparent: traceparent_of(headers, host), minted_session: None };
        let mut out = RequestOutcome { decision_id: early.decision_id.clone(), ..Default::default() };
        out.remove_headers = stamped_by_client(headers);
        let canonical = match canonical_path(headers) {
            Ok(c) => c,
            Err(e) => {
                out.metrics.push(metrics::REQUESTS.into());
                return Err(Box::new(self.refuse_path(out, e)));
            }
        };
        let now_s = host.now_ms() / 1000;
        let mut identity = match self.identifier.identify(headers, host, now_s) {
            Ok(id) => id,
            Err(e) => {
                // A refusal here ends the request: it is counted now, as the body phase would have.
                out.metrics.push(metrics::REQUESTS.into());
                return Err(Box::new(self.refuse_identity(out, e, early.traceparent)));
            }
        };
        bound_identity(&mut identity);
        // A DPoP proof this VM has seen is refused now; it is consumed when the body is decided.
        if identity.binding.as_ref().and_then(|b| b.proof.as_ref()).is_some_and(|p| self.identifier.proof_seen(p, host.now_ms())) {
            out.metrics.push(metrics::REQUESTS.into());
            return Err(Box::new(self.refuse_identity(out, IdentityError::DpopReplayed, early.traceparent)));
        }
        let session = match session::resolve(&self.config.session, headers, &identity, host) {
            Ok(s) => s,
            Err(why) => {
                out.metrics.push(metrics::REQUESTS.into());
                count_token_cache(&mut out, &identity);
                return Err(Box::new(self.refuse_session_id(out, why)));
            }
        };
        let early = Early { minted_session: (session.source == SessionSource::Minted).then(|| session.id.clone()), ..early };
        out.set_headers.push((SESSION_HEADER.into(), session.id.clone()));
        out.set_headers.push((DECISION_HEADER.into(), early.decision_id.clone()));
        if !identity.subject.is_empty() {
            out.set_headers.push((SUBJECT_HEADER.into(), identity.subject.clone()));
        }
        out.set_headers.push((TRACEPARENT.into(), early.traceparent.clone()));
        // The headers leave before the body is decided: they leave with the path decided on.
        out.set_headers.extend(self.path_rewrite(headers, canonical.as_ref()));
        Ok((early, out))
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
        out.remove_headers = stamped_by_client(&headers);
        // A path the filter cannot be sure the upstream reads as the policy would goes no further.
        let path = match canonical_path(&headers) {
            Ok(p) => p,
            Err(e) => return Step::Done(self.refuse_path(out, e)),
        };
        let traceparent = match early {
            Some(e) => e.traceparent.clone(),
            None => traceparent_of(&headers, host),
        };

        // 2. Identify.
        let mut identity = match self.identifier.identify(&headers, host, now_ms / 1000) {
            Ok(id) => id,
            Err(e) => return Step::Done(self.refuse_identity(out, e, traceparent)),
        };
        bound_identity(&mut identity);
        count_token_cache(&mut out, &identity);
        // A DPoP proof is good for one request: this VM refuses a use it has seen (the state
        // service, when configured, refuses one any proxy has seen: `BeginStep::proof`).
        let proof = identity.binding.as_ref().and_then(|b| b.proof.clone());
        if proof.as_ref().is_some_and(|p| !self.identifier.consume_proof(p, now_ms)) {
            return Step::Done(self.refuse_identity(out, IdentityError::DpopReplayed, traceparent));
        }

        // MCP: what the JSON-RPC message asks for.
        let signal = self.mcp_signal(&headers, path.as_ref());
        let declared = matches!((body, signal), (Body::Coming, Some(_))).then(|| mcp::declared::declared(&headers));
        let mcp = match (body, signal) {
            (Body::Coming, Some(_)) => Some(match &declared {
                Some(Ok(d)) => mcp::declared::to_request(d),
                // Refused once the step is taken (so the trail has it), answered as what it said.
                _ => mcp::declared::to_request(&mcp::declared::Declared {
                    method: mcp::bounded(&String::from_utf8_lossy(headers.get(mcp::declared::METHOD_HEADER).unwrap_or_default())),
                    name: None,
                    protocol_version: None,
                }),
            }),
            // A POST that declares an MCP method carries the message, or is no MCP request.
            (Body::Absent, Some(_)) if mcp::declared::is_declared(&headers) => {
                return Step::Done(self.refuse(out, Decision::internal(Action::Deny, "mcp_body_not_json"), None, 400, shadow, None));
            }
            // Most requests: no body was read, nothing to check.
            (Body::Absent | Body::Coming, _) | (_, None) => None,
            // Undecidable, so never passed on: it could be JSON-RPC.
            (Body::TooLarge, Some(_)) => {
                return Step::Done(self.refuse(out, Decision::internal(Action::Deny, "mcp_body_too_large"), None, 413, shadow, None));
            }
            (Body::Complete(b), Some(signal)) => match mcp::parse(b) {
                Ok(mut m) => {
                    m.version_from_header(headers.get_str(mcp::declared::VERSION_HEADER));
                    Some(m)
                }
                Err(_) if signal == McpSignal::Json && !mentions_jsonrpc(b) => None,
                Err(e) => return Step::Done(self.refuse(out, Decision::internal(Action::Deny, e.code()), None, 400, shadow, None)),
            },
        };
        let mut tools: Vec<String> = mcp.as_ref().map(|m| m.tools().map(str::to_string).collect()).unwrap_or_default();
        wire::bound_list(&mut tools, limits::MAX_TOOLS);
        let Some(context) = self.context_of(&headers, host) else {
            return Step::Done(self.refuse(out, Decision::internal(Action::Deny, "context_header_invalid"), None, 400, shadow, None));
        };

        // 3. Resolve the session (under the id the headers phase already stamped, if any).
        let resolved = match early.and_then(|e| e.minted_session.clone()) {
            Some(id) => Ok(SessionRef { id, source: SessionSource::Minted }),
            None => session::resolve(&self.config.session, &headers, &identity, host),
        };
        let session = match resolved {
            Ok(s) => s,
            Err(why) => return Step::Done(self.refuse_session_id(out, why)),
        };
        if session.source == SessionSource::Minted {
            out.metrics.push(metrics::SESSIONS_NEW.into());
        }
        // An MCP `initialize` opens a session whose id the MCP server assigns in its answer: it is
        // decided as a new session here and adopted under that id when the answer comes.
        let initialize = declared.is_none()
            && session.source == SessionSource::Minted
            && mcp.as_ref().and_then(|m| m.first()).is_some_and(|c| c.method == "initialize");
        let ctx = Pending { out, headers, identity, session, traceparent, now_ms, mcp, tools, context, path, declared };

        // A session this proxy knows to be revoked goes no further, whatever the mode.
        if self.sessions.is_revoked(&ctx.session.id) {
            return Step::Done(self.refused_session(ctx, BeginError::Revoked));
        }

        // 4. Take the step on the session's state.
        let Some(state) = self.config.state.clone() else {
            return Step::Done(self.begin_locally(ctx, host, false));
        };
        if initialize {
            let mut out = self.begin_locally(ctx, host, false);
            out.adopt_session = out.reply.is_none();
            return Step::Done(out);
        }
        // In cached mode too, a step with a DPoP proof goes to the service, which alone knows
        // whether another proxy saw the proof.
        if state.mode == config::StateMode::Cached && proof.is_none() {
            match self.begin_cached(&ctx, host) {
                Cached::Hit(before, step) => return Step::Done(self.decide(ctx, *before, step, Counted::Cached, host)),
                Cached::Refused(why) => return Step::Done(self.refused_session(ctx, why)),
                Cached::Miss => {}
            }
        }
        let seen = ctx.seen();
        let mut req = BeginStep {
            session_id: ctx.session.id.clone(),
            subject: ctx.identity.subject.clone(),
            credential: seen.credential.map(str::to_string),
            workload: seen.workload.map(str::to_string),
            region: seen.region.map(str::to_string),
            device: seen.device.map(str::to_string),
            authority: seen.authority.map(str::to_string),
            tools: ctx.tools.clone(),
            known_steps: self.sessions.steps(&ctx.session.id),
            scopes: ctx.identity.scopes.clone(),
            proof,
        };
        // Context headers reach the service cut to its limits, so no header value can make the
        // call invalid (and its 4xx refuse the request).
        req.bound();
        let body = serde_json::to_vec(&req).unwrap_or_default();
        Step::Call { pending: Box::new(ctx), call: StateCall { path: "/v1/steps/begin", body } }
    }

    /// Finish a request that waited for the state service. The service unavailable (no answer,
    /// timeout, 5xx): the policy decides, degraded. The service refusing the call (4xx): the
    /// request is refused, whatever the policy says of degraded mode.
    pub fn resume(&mut self, pending: Box<Pending>, answer: Result<BeginResponse, StateFailure>, host: &mut dyn Host) -> RequestOutcome {
        let mut ctx = *pending;
        match answer {
            Ok(resp) => match resp.outcome {
                BeginOutcome::Ok => {
                    let mut before = resp.session;
                    if let Some(mine) = self.sessions.get(&ctx.session.id) {
                        before.overlay_decisions(mine);
                    }
                    // Mirror the step the service counted, under its number.
                    let mut after = before.clone();
                    after.steps = resp.step;
                    after.last_seen_at_ms = ctx.now_ms;
                    after.remember(&ctx.seen());
                    self.remember_step(&ctx.session.id, after, host);
                    self.decide(ctx, before, resp.step, Counted::Service { new: resp.new }, host)
                }
                BeginOutcome::SubjectMismatch => self.refused_session(ctx, BeginError::SubjectMismatch),
                BeginOutcome::Revoked => {
                    self.sessions.revoke(&ctx.session.id);
                    self.refused_session(ctx, BeginError::Revoked)
                }
                BeginOutcome::ProofReplayed => {
                    ctx.out.log = Some(format!("DPoP proof replayed (session {}, subject {}): refused by the state service", ctx.session.id, ctx.identity.subject));
                    self.refuse_identity(ctx.out, IdentityError::DpopReplayed, ctx.traceparent)
                }
            },
            Err(StateFailure::Refused(why)) => {
                let shadow = self.config.mode == Mode::Shadow;
                ctx.out.metrics.push(metrics::STATE_REFUSED.into());
                ctx.out.log = Some(format!(
                    "session state refused the step of session {} by {} ({why}); refused: session_state_refused",
                    ctx.session.id, ctx.identity.subject
                ));
                self.refuse(ctx.out, Decision::internal(Action::Deny, "session_state_refused"), Some(&ctx.session), 403, shadow, ctx.mcp.as_ref())
            }
            Err(StateFailure::Unavailable(why)) => {
                ctx.out.metrics.push(metrics::STATE_UNAVAILABLE.into());
                ctx.out.log = Some(format!("session state unavailable ({why}); the policy decides with session.unavailable = true"));
                self.begin_locally(ctx, host, true)
            }
        }
    }

    /// The proxy VM's own session table: no service configured, or the service unavailable.
    fn begin_locally(&mut self, ctx: Pending, host: &mut dyn Host, unavailable: bool) -> RequestOutcome {
        let seen = ctx.seen();
        match self.sessions.begin_step(&ctx.session.id, &ctx.identity.subject, &seen, ctx.now_ms) {
            Ok((before, is_new)) => {
                let step = before.steps + 1;
                self.decide(ctx, before, step, Counted::Proxy { new: is_new, unavailable }, host)
            }
            Err(e) => self.refused_session(ctx, e),
        }
    }

    fn refused_session(&mut self, ctx: Pending, why: BeginError) -> RequestOutcome {
        let shadow = self.config.mode == Mode::Shadow;
        let mut out = ctx.out;
        let reason = match why {
            BeginError::SubjectMismatch => {
                out.metrics.push(metrics::SESSION_BINDING_VIOLATIONS.into());
                out.log = Some(format!("session {} presented by another subject ({})", ctx.session.id, ctx.identity.subject));
                "session_bound_to_other_subject"
            }
            BeginError::Revoked => "session_revoked",
        };
        self.refuse(out, Decision::internal(Action::Deny, reason), Some(&ctx.session), 403, shadow, ctx.mcp.as_ref())
    }

    /// The direct peer, and the region and device headers when it is a trusted source; `None`
    /// when a trusted source sent a value that is too long or not printable.
    fn context_of(&self, headers: &Headers, host: &dyn Host) -> Option<Context> {
        let source_address = host.property(&["source", "address"]).and_then(|v| String::from_utf8(v).ok());
        let cfg = &self.config.context;
        let trusted = cfg.trusted_sources.iter().any(|t| t == "*")
            || source_address.as_deref().and_then(direct_peer).is_some_and(|ip| cfg.trusted_sources.iter().any(|t| t == ip));
        let (mut region, mut device) = (None, None);
        if trusted {
            for (name, slot) in [(&cfg.region_header, &mut region), (&cfg.device_header, &mut device)] {
                let Some(raw) = headers.get(name) else { continue };
                if raw.is_empty() || raw.len() > MAX_CONTEXT_VALUE || !raw.iter().all(|b| (0x20..=0x7e).contains(b)) || headers.is_conflicting(name) {
                    return None;
                }
                *slot = std::str::from_utf8(raw).ok().map(str::to_string);
            }
        }
        // The host called, cut as its record will be, so the session and the trail agree.
        let authority = headers.get_str(":authority").map(|a| {
            let mut a = a.to_string();
            crate::wire::bound_text(&mut a, crate::wire::limits::MAX_TEXT_BYTES);
            a
        });
        Some(Context { source_address, region, device, authority })
    }

    /// A credential refused: 401 (400 for an unreadable header) with its reason, or in shadow
    /// mode counted and let through.
    fn refuse_identity(&self, mut out: RequestOutcome, e: IdentityError, traceparent: String) -> RequestOutcome {
        out.metrics.push(metrics::identity_failure(e.code()));
        if self.config.mode == Mode::Shadow {
            out.metrics.push(metrics::shadow("unauthenticated"));
            out.log = Some(format!("shadow: would refuse the credential ({})", e.code()));
            out.set_headers.push((DECISION_HEADER.into(), out.decision_id.clone()));
            out.set_headers.push((TRACEPARENT.into(), traceparent));
            return out;
        }
        out.reply = Some(unauthenticated(e, &out.decision_id));
        out
    }

    /// 400 `path_ambiguous` with the rule the path broke, before anything else is looked at.
    fn refuse_path(&self, mut out: RequestOutcome, e: PathError) -> RequestOutcome {
        let shadow = self.config.mode == Mode::Shadow;
        out.metrics.push(metrics::PATHS_REFUSED.into());
        out.log = Some(format!("path refused ({})", e.code()));
        let mut d = Decision::internal(Action::Deny, "path_ambiguous");
        d.reasons.push(e.code().to_string());
        self.refuse(out, d, None, 400, shadow, None)
    }

    /// In enforce mode, the upstream is sent the canonical `:path` the policy decided on
    /// whenever the client's differs, so the two cannot read it apart. Shadow mode changes
    /// nothing on the wire.
    pub(super) fn path_rewrite(&self, headers: &Headers, canonical: Option<&CanonicalPath>) -> Option<(String, String)> {
        if self.config.mode == Mode::Shadow {
            return None;
        }
        let target = canonical?.target();
        (headers.get(":path") != Some(target.as_bytes())).then(|| (":path".to_string(), target))
    }

    fn refuse_session_id(&self, out: RequestOutcome, why: session::BadSessionId) -> RequestOutcome {
        let shadow = self.config.mode == Mode::Shadow;
        self.refuse(out, Decision::internal(Action::Deny, why.code()), None, 400, shadow, None)
    }
}

fn count_token_cache(out: &mut RequestOutcome, identity: &Identity) {
    if identity.kind == IdentityKind::Jwt {
        out.metrics.push(if identity.token_cache_hit { metrics::JWT_CACHE_HIT } else { metrics::JWT_CACHE_MISS }.into());
    }
}
