//! The policy input, built directly as regorus values (never through JSON text: that costs
//! more than the evaluation itself). Its schema is `policies/input.schema.json`.

use regorus::Value;

use crate::host::Headers;
use crate::identity::Identity;
use crate::session::{SessionRef, SessionState};
use crate::value::{opt_n, opt_s, s, strings, Obj};

/// Facts about the request that are not the identity or the session.
pub struct RequestFacts<'a> {
    pub headers: &'a Headers,
    /// The canonical `:path` (`path.rs`), with the query: `input.request.path`.
    pub path: Option<&'a str>,
    pub input_headers: &'a [String],
    pub source_address: Option<&'a str>,
    pub region: Option<&'a str>,
    pub device: Option<&'a str>,
    pub mcp: Option<&'a crate::mcp::McpRequest>,
}

pub struct SessionFacts<'a> {
    pub session: &'a SessionRef,
    pub before: &'a SessionState,
    pub is_new: bool,
    pub unavailable: bool,
}

/// `input.identity.binding`: what a sender-constrained token is bound to and whether it held.
fn binding(id: &Identity) -> Value {
    let b = id.binding.as_ref();
    Obj::new()
        .set("kind", opt_s(b.map(|b| b.kind.as_str())))
        .set("thumbprint", opt_s(b.and_then(|b| b.thumbprint.as_deref())))
        .set("held", Value::from(b.is_some_and(|b| b.held)))
        .build()
}

/// The parts of the input that depend on the verified token alone, built once per cached token:
/// `input.credential`, and the fields of `input.identity` that are the token's (the request's
/// own, `workload`, `profile` and `binding`, are added per request).
#[derive(Debug)]
pub struct TokenParts {
    /// What they were built from (the identity's subject and scopes, as bounded): a token
    /// presented with other ones (never, today) gets its parts built afresh.
    subject: String,
    scopes: Vec<String>,
    identity: Value,
    credential: Value,
}

fn identity_of_token(id: &Identity, tok: Option<&crate::identity::jwt::VerifiedToken>) -> Value {
    Obj::new()
        .set("kind", s(id.kind.as_str()))
        .set("subject", s(&id.subject))
        .set("issuer", opt_s(id.issuer.as_deref()))
        .set("provider", opt_s(tok.map(|t| t.provider.as_str())))
        .set("scopes", strings(&id.scopes))
        .set("claims", tok.map(|t| t.claims.clone()).unwrap_or_else(Value::new_object))
        .set("delegation", strings(tok.map(|t| t.delegation.as_slice()).unwrap_or_default()))
        .build()
}

fn credential_of(id: &Identity, tok: Option<&crate::identity::jwt::VerifiedToken>) -> Value {
    Obj::new()
        .set("kind", s(id.kind.as_str()))
        .set("fingerprint", opt_s(id.fingerprint.as_deref()))
        .set("kid", opt_s(tok.and_then(|t| t.kid.as_deref())))
        .set("jti", opt_s(tok.and_then(|t| t.jti.as_deref())))
        .set("iat", opt_n(tok.and_then(|t| t.iat)))
        .set("exp", opt_n(tok.and_then(|t| t.exp)))
        .build()
}

/// `input.identity` (without its per-request fields) and `input.credential`: from the token's
/// cache entry when it has them for this identity, else built now (and kept there).
fn token_parts(id: &Identity) -> (Value, Value) {
    let tok = id.token.as_deref();
    let fresh = || (identity_of_token(id, tok), credential_of(id, tok));
    // A token's fingerprint is its credential's: any other credential kind builds its own.
    let Some(t) = tok.filter(|t| id.fingerprint.as_deref() == Some(t.fingerprint.as_str())) else { return fresh() };
    let parts = t.input_parts.get_or_init(|| {
        let (identity, credential) = fresh();
        TokenParts { subject: id.subject.clone(), scopes: id.scopes.clone(), identity, credential }
    });
    if parts.subject == id.subject && parts.scopes == id.scopes {
        (parts.identity.clone(), parts.credential.clone())
    } else {
        fresh()
    }
}

pub fn build(now_ms: u64, mode: &str, req: &RequestFacts<'_>, id: &Identity, sess: &SessionFacts<'_>) -> Value {
    let h = req.headers;
    let mut selected = Obj::new();
    for name in req.input_headers {
        if let Some(v) = h.get(name) {
            selected = selected.set(name, Value::from(String::from_utf8_lossy(v).as_ref()));
        }
    }
    let request = Obj::new()
        .set("method", opt_s(h.get_str(":method")))
        .set("path", opt_s(req.path))
        .set("raw_path", opt_s(h.get_str(":path")))
        .set("authority", opt_s(h.get_str(":authority")))
        .set("scheme", opt_s(h.get_str(":scheme")))
        .set("headers", selected.build())
        .set(
            "source",
            Obj::new().set("address", opt_s(req.source_address)).set("principal", opt_s(id.workload.as_deref())).build(),
        )
        .set("mcp", req.mcp.map(crate::mcp::to_value).unwrap_or(Value::Null))
        .build();

    let (identity, credential) = token_parts(id);
    let mut identity = identity;
    // The cached object is shared: this copies its map (values stay shared), not its strings.
    if let Ok(o) = identity.as_object_mut() {
        o.insert(Value::from("workload"), opt_s(id.workload.as_deref()));
        o.insert(Value::from("profile"), sess.before.profile.as_ref().map(|p| p.to_value()).unwrap_or(Value::Null));
        o.insert(Value::from("binding"), binding(id));
    }

    let context = Obj::new()
        .set("region", opt_s(req.region))
        .set("device", opt_s(req.device))
        .set("user_agent", opt_s(h.get_str("user-agent")))
        .build();

    let b = sess.before;
    let ms_to_s = |ms: u64| Value::from(ms / 1000);
    let session = Obj::new()
        .set("id", s(&sess.session.id))
        .set("source", s(sess.session.source.as_str()))
        .set("new", Value::from(sess.is_new))
        .set("started_at", ms_to_s(b.started_at_ms))
        .set("last_seen_at", ms_to_s(b.last_seen_at_ms))
        .set("steps", Value::from(b.steps))
        .set("step", Value::from(b.steps + 1))
        .set("subjects", strings(&b.subjects))
        .set("credentials", strings(&b.credentials))
        .set("workloads", strings(&b.workloads))
        .set("regions", strings(&b.regions))
        .set("devices", strings(&b.devices))
        .set("authorities", strings(&b.authorities))
        .set("tools", strings(&b.tools))
        .set("scopes", strings(&b.scopes))
        .set("credential_subjects", strings(&b.credential_subjects))
        .set("risk", Value::from(b.risk))
        .set("flags", strings(&b.flags))
        .set("revoked", Value::from(b.revoked))
        .set("last_step_up", opt_n(b.last_step_up_ms.map(|ms| ms / 1000)))
        .set("bytes_out", Value::from(b.bytes_out))
        .set("refusals", Value::from(b.refusals.iter().map(|ms| Value::from(ms / 1000)).collect::<Vec<_>>()))
        .set("unavailable", Value::from(sess.unavailable))
        .build();

    Obj::new()
        .set("now", Value::from(now_ms / 1000))
        .set("now_ms", Value::from(now_ms))
        .set("mode", s(mode))
        .set("request", request)
        .set("identity", identity)
        .set("credential", credential)
        .set("context", context)
        .set("session", session)
        .build()
}
