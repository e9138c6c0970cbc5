//! The replies the filter sends in place of the upstream's: refusals of a decision (403, the
//! RFC 9470 step-up challenge, 429 with `Retry-After`, JSON-RPC errors for MCP clients) and of
//! a credential (RFC 6750 challenges), each with a stable reason code and the decision id.

use super::{LocalReply, RequestOutcome, Warden};
use crate::correlation::{DECISION_HEADER, SESSION_HEADER};
use crate::decision::{Action, Decision};
use crate::error::IdentityError;
use crate::mcp::{self, McpRequest};
use crate::metrics;
use crate::session::SessionRef;

impl Warden {
    /// Refuse with a local reply, or in shadow mode count what would have happened and go on.
    pub(super) fn refuse(
        &self,
        mut out: RequestOutcome,
        d: Decision,
        session: Option<&SessionRef>,
        status: u32,
        shadow: bool,
        mcp: Option<&McpRequest>,
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
        // MCP clients get refusals of what they asked as JSON-RPC errors (with the HTTP status,
        // which MCP clients read the error from); step-up and throttle stay plain HTTP (401 /
        // 429), where MCP clients handle authorization and back-off.
        let body = match mcp {
            Some(m) if self.config.mcp.jsonrpc_errors => mcp::refusal(m, status, &d.reasons, &d.reasons.join(", "), body.clone()).unwrap_or(body),
            _ => body,
        };
        out.reply = Some(LocalReply { status, headers, body: body.to_string().into_bytes() });
        out.session_id = session.map(|s| s.id.clone());
        out.decision = Some(d);
        out
    }
}

/// 401 (or 400 for an unreadable header) with an RFC 6750 challenge and a reason code.
pub(super) fn unauthenticated(e: IdentityError, decision_id: &str) -> LocalReply {
    // A DPoP failure is answered with the DPoP scheme and the algorithms it accepts (RFC 9449 §7.1).
    let scheme = if e.is_dpop() { "DPoP algs=\"ES256 EdDSA\", realm" } else { "Bearer realm" };
    let challenge = match e.bearer_error() {
        Some(code) => format!("{scheme}=\"session-warden\", error=\"{code}\", error_description=\"{}\"", e.code()),
        None => format!("{scheme}=\"session-warden\""),
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
