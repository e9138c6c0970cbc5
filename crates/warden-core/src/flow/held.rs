//! A 2026-07-28 MCP request is decided on what its headers declare (`Mcp-Method`, `Mcp-Name`)
//! before any of its body moves: a denied tool or a revoked session is refused while the request
//! is still whole in the proxy. An allowed one lets its headers go on, stamped, and its body is
//! then held to the headers and decided again on everything the body adds (`_meta`, arguments)
//! under the same step: the step is taken once, recorded once, with the final decision.

use super::decide::{mismatch, Counted, Verdict};
use super::{Body, Held, Pending, RequestOutcome, Warden};
use crate::config::Mode;
use crate::correlation::{DECISION_HEADER, SESSION_HEADER, STEP_HEADER, SUBJECT_HEADER, TRACEPARENT};
use crate::decision::{Action, Decision};
use crate::host::Host;
use crate::mcp::{self, declared::Declared};
use crate::session::SessionState;
use crate::wire::{self, limits};

impl Warden {
    /// The header phase's decision. Only a refusal acts here; an allow holds the step for the
    /// body, since the body may still add what makes the policy refuse.
    pub(super) fn on_declared(&mut self, mut ctx: Pending, declared: Declared, before: SessionState, step: u64, counted: Counted, host: &mut dyn Host) -> RequestOutcome {
        if self.config.mode != Mode::Shadow {
            let input = self.input_of(&ctx, &before, counted);
            let d = self.evaluate(input, &mut ctx.out);
            if d.action != Action::Allow {
                return self.conclude(ctx, before, step, counted, Verdict::Decided(d), host);
            }
        }
        self.hold(ctx, declared, before, step, counted)
    }

    /// Let the headers go on with the step's stamps (the body may still be refused: the upstream
    /// stream is then reset, and Envoy's buffer filter keeps even the headers from it until then).
    fn hold(&mut self, mut ctx: Pending, declared: Declared, before: SessionState, step: u64, counted: Counted) -> RequestOutcome {
        let mut out = RequestOutcome {
            decision_id: ctx.out.decision_id.clone(),
            // Counted and stripped now, once: the body phase's outcome only adds its own.
            metrics: std::mem::take(&mut ctx.out.metrics),
            remove_headers: std::mem::take(&mut ctx.out.remove_headers),
            log: ctx.out.log.take(),
            session_id: Some(ctx.session.id.clone()),
            ..Default::default()
        };
        out.set_headers.push((SESSION_HEADER.into(), ctx.session.id.clone()));
        out.set_headers.push((STEP_HEADER.into(), step.to_string()));
        out.set_headers.push((DECISION_HEADER.into(), out.decision_id.clone()));
        if !ctx.identity.subject.is_empty() {
            out.set_headers.push((SUBJECT_HEADER.into(), ctx.identity.subject.clone()));
        }
        out.set_headers.push((TRACEPARENT.into(), ctx.traceparent.clone()));
        out.set_headers.extend(self.path_rewrite(&ctx.headers, ctx.path.as_ref()));
        out.hold = Some(Box::new(Held { pending: ctx, declared, before, step, counted }));
        out
    }

    /// The body of a held request, whole (or too large, or never complete): held to the headers,
    /// then decided on everything. Every way out records the step.
    pub fn on_held_body(&mut self, held: Box<Held>, body: Body<'_>, host: &mut dyn Host) -> RequestOutcome {
        let Held { mut pending, declared, before, step, counted } = *held;
        let refused = match body {
            Body::Complete(b) => match mcp::parse(b) {
                Ok(m) => {
                    let agreed = mcp::declared::agree(&declared, &m);
                    // What the body asked is what the trail shows, agreed or not.
                    let mut tools: Vec<String> = m.tools().map(str::to_string).collect();
                    wire::bound_list(&mut tools, limits::MAX_TOOLS);
                    pending.tools = tools;
                    pending.mcp = Some(m);
                    agreed.err().map(|why| (mismatch(why), 400))
                }
                Err(e) => Some((Decision::internal(Action::Deny, e.code()), 400)),
            },
            Body::TooLarge => Some((Decision::internal(Action::Deny, "mcp_body_too_large"), 413)),
            // The client went away, or the host ended the stream without a body.
            Body::Absent | Body::Coming => Some((Decision::internal(Action::Deny, "mcp_body_incomplete"), 400)),
        };
        let verdict = match refused {
            Some((d, status)) => Verdict::Refused(d, status),
            None => Verdict::Policy,
        };
        self.conclude(pending, before, step, counted, verdict, host)
    }
}
