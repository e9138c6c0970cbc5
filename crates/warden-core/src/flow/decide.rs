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
use crate::wire::{self, Begun, StepRecord};

/// Who counted the step being decided, which the record says (`StepRecord::begun`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Counted {
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

impl Warden {
    /// Decide, enforce, correlate, and prepare the step's attribution record.
    pub(super) fn decide(&mut self, ctx: Pending, before: SessionState, step: u64, counted: Counted, host: &mut dyn Host) -> RequestOutcome {
        let (is_new, unavailable) = (counted.is_new(), counted.unavailable());
        let shadow = self.config.mode == Mode::Shadow;
        let Pending { mut out, headers, identity, session, traceparent, now_ms, mcp, tools, context, path } = ctx;
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
