//! Deciding a step: the policy (and the candidate beside it) on the input built from the
//! request, its identity and its session; then enforcing the decision, stamping the correlation
//! headers and preparing the step's attribution record.

use super::{Pending, RequestOutcome, Warden};
use crate::config::{FailureMode, Mode};
use crate::correlation::{DECISION_HEADER, SESSION_HEADER, STEP_HEADER, SUBJECT_HEADER, TRACEPARENT};
use crate::decision::{self, Action, Decision};
use crate::host::Host;
use crate::input;
use crate::metrics;
use crate::session::SessionState;
use crate::mcp::declared::{Disagreement, MISMATCH};
use crate::policy::Policy;
use crate::wire::{self, Begun, StepRecord};

/// The filter's refusal of a request whose MCP headers and body disagree: the reason and its rule.
pub(super) fn mismatch(why: Disagreement) -> Decision {
    let mut d = Decision::internal(Action::Deny, MISMATCH);
    d.reasons.push(why.rule().to_string());
    d
}

/// Who counted the step being decided, which the record says (`StepRecord::begun`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counted {
    /// The state service, through begin-step (`new`: this step opened the session).
    Service { new: bool },
    /// This proxy's shared snapshot (cached mode).
    Cached,
    /// This proxy alone: no state service, an MCP `initialize`, or the service unavailable.
    Proxy { new: bool, unavailable: bool },
}

impl Counted {
    fn is_new(self) -> bool {
        matches!(self, Self::Service { new: true } | Self::Proxy { new: true, .. })
    }

    fn unavailable(self) -> bool {
        matches!(self, Self::Proxy { unavailable: true, .. })
    }

    fn begun(self) -> Begun {
        match self {
            Self::Service { .. } => Begun::Service,
            Self::Cached => Begun::Cached,
            Self::Proxy { .. } => Begun::Proxy,
        }
    }
}

/// What a step's decision is.
pub(super) enum Verdict {
    /// The policy's, on the request as it is.
    Policy,
    /// The policy's, already taken on the same input (on an MCP request's headers).
    Decided(Decision),
    /// The filter's own refusal of a step it took (headers and body disagree, a body that is
    /// not JSON-RPC or too large once the headers went on), with its HTTP status.
    Refused(Decision, u32),
}

impl Warden {
    /// Decide, enforce, correlate, and prepare the step's attribution record; a request that
    /// declares its MCP call in headers is first decided on them (`held.rs`).
    pub(super) fn decide(&mut self, mut ctx: Pending, before: SessionState, step: u64, counted: Counted, host: &mut dyn Host) -> RequestOutcome {
        match ctx.declared.take() {
            None => self.conclude(ctx, before, step, counted, Verdict::Policy, host),
            Some(Err(why)) => self.conclude(ctx, before, step, counted, Verdict::Refused(mismatch(why), 400), host),
            Some(Ok(declared)) => self.on_declared(ctx, declared, before, step, counted, host),
        }
    }

    /// The policy input of a step.
    pub(super) fn input_of(&self, ctx: &Pending, before: &SessionState, counted: Counted) -> regorus::Value {
        let target = ctx.path.as_ref().map(|p| p.target());
        let facts = self.facts(ctx, target.as_deref());
        let sess = input::SessionFacts { session: &ctx.session, before, is_new: counted.is_new(), unavailable: counted.unavailable() };
        input::build(ctx.now_ms, self.mode_name(), &facts, &ctx.identity, &sess)
    }

    fn facts<'a>(&'a self, ctx: &'a Pending, target: Option<&'a str>) -> input::RequestFacts<'a> {
        input::RequestFacts {
            headers: &ctx.headers,
            path: target,
            input_headers: &self.config.policy.input_headers,
            source_address: ctx.context.source_address.as_deref(),
            region: ctx.context.region.as_deref(),
            device: ctx.context.device.as_deref(),
            mcp: ctx.mcp.as_ref(),
        }
    }

    fn mode_name(&self) -> &'static str {
        if self.config.mode == Mode::Shadow {
            "shadow"
        } else {
            "enforce"
        }
    }

    /// The policy's decision on an input; a policy that fails decides as configured.
    pub(super) fn evaluate(&mut self, input: regorus::Value, out: &mut RequestOutcome) -> Decision {
        evaluate(&mut self.policy, self.config.policy.on_error, input, out)
    }

    /// Enforce a step's decision, correlate, and prepare its attribution record.
    pub(super) fn conclude(&mut self, ctx: Pending, before: SessionState, step: u64, counted: Counted, verdict: Verdict, host: &mut dyn Host) -> RequestOutcome {
        let unavailable = counted.unavailable();
        let shadow = self.config.mode == Mode::Shadow;
        let input = self.input_of(&ctx, &before, counted);
        let Pending { mut out, headers, identity, session, traceparent, now_ms, mcp, tools, context, path, declared: _ } = ctx;
        let target = path.as_ref().map(|p| p.target());
        let facts = input::RequestFacts {
            headers: &headers,
            path: target.as_deref(),
            input_headers: &self.config.policy.input_headers,
            source_address: context.source_address.as_deref(),
            region: context.region.as_deref(),
            device: context.device.as_deref(),
            mcp: mcp.as_ref(),
        };
        let mode = self.mode_name();
        // Records only go somewhere when a state service is configured.
        let recording = self.config.state.is_some();
        // The recorded input is what the step was decided on: a step the filter refused itself
        // (its body at odds with its headers, unreadable, too large) went to no policy, so it has
        // none (its record still names what it asked: method, tool, arguments digest), and
        // `warden replay` counts it as not replayable instead of re-deciding it.
        let decided_by_policy = !matches!(verdict, Verdict::Refused(..));
        let recorded_input =
            if recording && self.config.policy.record_input && decided_by_policy { wire::RecordedInput::new(&input) } else { None };
        // The candidate sees the very same input (values are shared, not copied); a step the
        // filter refused itself went to no policy.
        let candidate_result = match &verdict {
            Verdict::Refused(..) => None,
            _ => self.candidate.as_mut().map(|c| (c.version.clone(), c.eval(input.clone()).and_then(|v| decision::parse_output(&v)))),
        };
        let (decision, forced_status) = match verdict {
            Verdict::Policy => (evaluate(&mut self.policy, self.config.policy.on_error, input, &mut out), None),
            Verdict::Decided(d) => (d, None),
            Verdict::Refused(d, status) => {
                out.log = Some(format!("refused: {} (session {}, step {step})", d.reasons.join(", "), session.id));
                (d, Some(status))
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
        let step_facts = wire::StepFacts {
            session_id: &session.id,
            step,
            decision_id: &out.decision_id,
            at_ms: now_ms,
            identity: &identity,
            request: &facts,
            tools: &tools,
            traceparent: &traceparent,
            risk_before: before.risk,
            policy_version: &self.policy.version,
            mode,
            degraded: unavailable,
            begun: counted.begun(),
        };
        let mut record = recording.then(|| StepRecord::new(&step_facts, &decision, recorded_input, candidate));

        // 5. Enforce.
        if !shadow {
            self.after_decision(&session.id, &decision, &before, now_ms, host);
        }
        if decision.action != Action::Allow {
            if decision.action == Action::Terminate && !shadow {
                self.apply_revocation(&session.id, host);
            }
            let status = forced_status.unwrap_or(match decision.action {
                Action::StepUp => 401,
                Action::Throttle => 429,
                _ => 403,
            });
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
        out.set_headers.extend(self.path_rewrite(&headers, path.as_ref()));
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
}

fn evaluate(policy: &mut Policy, on_error: FailureMode, input: regorus::Value, out: &mut RequestOutcome) -> Decision {
    match policy.eval(input).and_then(|v| decision::parse_output(&v)) {
        Ok(d) => d,
        Err(e) => {
            out.metrics.push(metrics::POLICY_ERRORS.into());
            out.log = Some(format!("policy error: {e}"));
            match on_error {
                FailureMode::Deny => Decision::internal(Action::Deny, "policy_error"),
                FailureMode::Allow => Decision::internal(Action::Allow, "policy_error_allowed"),
            }
        }
    }
}
