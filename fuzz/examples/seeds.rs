//! Writes the hand-made seeds of `corpus/<target>/` (tokens must be signed with the fuzz keys, so
//! they are made here rather than by hand): `cargo run --example seeds --no-default-features`
//! from fuzz/. Files it writes are named `seed-*`; what libFuzzer adds keeps its hash names.

use std::path::Path;

use jwt_simple::prelude::*;
use serde_json::{json, Value};
use warden_fuzz::{b64, jwks_doc, plugin_config, sign_hs256, API_KEY, ES_SCALAR, ISS, NOW_S, TRUSTED_HOP};

const EXP: u64 = 4_000_000_000;

/// ES256 over these claims with key `es1` (jwt-simple signs its own claim type: map onto it).
fn es256(claims: &Value) -> String {
    let Ok(key) = ES256KeyPair::from_bytes(&ES_SCALAR) else { unreachable!("a fixed valid scalar") };
    let mut c = Claims::with_custom_claims(json!({"scope": claims["scope"]}), Duration::from_secs(1));
    c.issued_at = claims.get("iat").and_then(Value::as_u64).map(Duration::from_secs);
    c.expires_at = claims.get("exp").and_then(Value::as_u64).map(Duration::from_secs);
    c.invalid_before = None;
    c.issuer = claims.get("iss").and_then(Value::as_str).map(str::to_string);
    c.subject = claims.get("sub").and_then(Value::as_str).map(str::to_string);
    c.audiences = claims.get("aud").and_then(Value::as_str).map(|a| Audiences::AsString(a.to_string()));
    key.with_key_id("es1").sign(c).unwrap_or_default()
}

/// A DPoP proof (RFC 9449) for `GET https://api.test/x` at NOW_S and `token`, signed with the
/// key of scalar ES_SCALAR: its public JWK, the JWK's RFC 7638 thumbprint, the proof.
fn dpop_proof(token: &str) -> (Value, String, String) {
    use p256::ecdsa::signature::Signer as _;
    let Ok(key) = ES256KeyPair::from_bytes(&ES_SCALAR) else { unreachable!("a fixed valid scalar") };
    let jkt = key.public_key().jwk_thumbprint();
    let mut jwk: Value = serde_json::from_str(&key.public_key().to_jwk()).unwrap_or_default();
    if let Some(o) = jwk.as_object_mut() {
        o.retain(|k, _| ["kty", "crv", "x", "y"].contains(&k.as_str()));
    }
    let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
    let ath = b64(&hmac_sha256::Hash::hash(token.as_bytes()));
    let claims = json!({"htm": "GET", "htu": "https://api.test/x", "iat": NOW_S, "jti": "seed-1", "ath": ath});
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let Ok(sk) = p256::ecdsa::SigningKey::from_slice(&ES_SCALAR) else { unreachable!("a fixed valid scalar") };
    let sig: p256::ecdsa::Signature = sk.sign(input.as_bytes());
    (jwk, jkt, format!("{input}.{}", b64(&sig.to_bytes())))
}

fn claims(sub: &str) -> Value {
    json!({"iss": ISS, "aud": "svc", "sub": sub, "exp": EXP, "iat": NOW_S - 10, "scope": "tickets:read tools:call"})
}

fn hs(c: &Value) -> String {
    sign_hs256(br#"{"alg":"HS256","typ":"JWT","kid":"hs1"}"#, c.to_string().as_bytes())
}

fn write(target: &str, name: &str, data: impl AsRef<[u8]>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join(format!("seed-{name}")), data)) {
        eprintln!("{target}/{name}: {e}");
        std::process::exit(1);
    }
}

fn lines(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}

fn main() {
    let es = es256(&claims("agent-7"));
    let hs_ok = hs(&claims("agent-hs"));
    let b64j = |v: Value| b64(v.to_string().as_bytes());

    // jwt: tokens as presented, and claims (optionally after a header line) to be HS256-signed.
    write("jwt", "es256-valid", &es);
    write("jwt", "hs256-valid", &hs_ok);
    write("jwt", "hs256-expired", hs(&json!({"iss": ISS, "aud": "svc", "sub": "a", "exp": NOW_S - 3600})));
    write("jwt", "hs256-wrong-aud", hs(&json!({"iss": ISS, "aud": "other", "sub": "a", "exp": EXP})));
    write("jwt", "hs256-unknown-iss", hs(&json!({"iss": "https://evil", "aud": "svc", "sub": "a", "exp": EXP})));
    write("jwt", "alg-none", format!("{}.{}.", b64j(json!({"alg": "none"})), b64j(claims("x"))));
    write("jwt", "malformed", "not.a.jwt");
    write("jwt", "four-parts", format!("{hs_ok}.x"));
    write("jwt", "bad-signature", format!("{}AAAA", &es[..es.len() - 4]));
    write("jwt", "claims-delegation", json!({"iss": ISS, "aud": ["svc", "x"], "sub": "a", "exp": EXP, "nbf": NOW_S - 5,
        "act": {"sub": "b", "act": {"sub": "c", "act": {"sub": "d"}}}, "scp": ["a", "b"], "sid": "ses_1", "jti": "j1"}).to_string());
    write("jwt", "claims-no-exp", json!({"iss": ISS, "aud": "svc", "sub": "a"}).to_string());
    write("jwt", "claims-not-yet-valid", json!({"iss": ISS, "aud": "svc", "sub": "a", "exp": EXP, "nbf": EXP - 1}).to_string());
    write("jwt", "claims-future-iat", json!({"iss": ISS, "aud": "svc", "sub": "a", "exp": EXP, "iat": EXP - 1}).to_string());
    write("jwt", "header-unknown-kid", format!("{}\n{}", json!({"alg": "HS256", "kid": "nope"}), claims("a")));
    write("jwt", "header-alg-confusion", format!("{}\n{}", json!({"alg": "RS256", "kid": "rs1"}), claims("a")));
    write("jwt", "header-no-kid", format!("{}\n{}", json!({"alg": "HS256", "typ": "JWT"}), claims("a")));

    // jwks: documents as a jwks_uri would serve them.
    write("jwks", "all-algorithms", jwks_doc().to_string());
    write("jwks", "empty", r#"{"keys": []}"#);
    write("jwks", "not-an-object", r#"[{"kty": "oct"}]"#);
    write("jwks", "unsupported", r#"{"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}, {"kty": "RSA", "alg": "PS256", "n": "AQAB", "e": "AQAB"}, {"kid": "x"}]}"#);
    write("jwks", "short-oct", r#"{"keys": [{"kty": "oct", "k": "c2hvcnQ"}, {"kty": "oct", "k": "!!"}]}"#);
    write("jwks", "bad-rsa", r#"{"keys": [{"kty": "RSA", "n": "", "e": "AQAB"}, {"kty": "RSA", "n": "AQAB", "e": ""}]}"#);
    write("jwks", "bad-okp", r#"{"keys": [{"kty": "OKP", "crv": "X25519", "x": "AAAA"}, {"kty": "OKP", "alg": "Ed25519", "crv": "Ed25519", "x": 5}]}"#);

    // identify: request lines and fake-host properties.
    let bearer = format!("Bearer {es}");
    write("identify", "jwt", lines(&[(":path", "/"), ("authorization", &bearer)]));
    write("identify", "jwt-lowercase-scheme", lines(&[("authorization", &format!("bearer  {hs_ok} "))]));
    write("identify", "basic", lines(&[("authorization", "Basic YTpi")]));
    write("identify", "api-key", lines(&[("x-api-key", API_KEY)]));
    write("identify", "api-key-unknown", lines(&[("x-api-key", "nope")]));
    write("identify", "api-key-and-jwt", lines(&[("x-api-key", API_KEY), ("authorization", &bearer)]));
    let xfcc = "By=spiffe://example.org/gw;Hash=aa;URI=spiffe://example.org/ns/x/sa/y";
    write("identify", "xfcc-trusted-hop", lines(&[("@source.address", &format!("{TRUSTED_HOP}:4444")), ("x-forwarded-client-cert", xfcc)]));
    write("identify", "xfcc-untrusted-hop", lines(&[("@source.address", "10.0.0.8:4444"), ("x-forwarded-client-cert", xfcc)]));
    write("identify", "xfcc-foreign-domain", lines(&[("@source.address", TRUSTED_HOP), ("x-forwarded-client-cert", "URI=spiffe://evil.org/x")]));
    write("identify", "mtls-peer", lines(&[("@connection.uri_san_peer_certificate", "spiffe://example.org/ns/a/sa/b"), ("@connection.sha256_peer_certificate_digest", "abcdef")]));
    write("identify", "mtls-peer-and-token", lines(&[("@connection.uri_san_peer_certificate", "spiffe://example.org/w"), ("authorization", &bearer)]));
    write("identify", "v6-hop", lines(&[("@source.address", "[::1]:443"), ("x-forwarded-client-cert", xfcc)]));
    // Sender-constrained tokens: a DPoP-bound token with a valid proof (for `GET https://api.test/x`
    // at NOW_S), without one, with two; an mTLS-bound token from its certificate.
    let (_, jkt, _) = dpop_proof("");
    let bound = hs(&json!({"iss": ISS, "aud": "svc", "sub": "agent-dpop", "exp": EXP, "cnf": {"jkt": jkt}}));
    let (_, _, proof) = dpop_proof(&bound);
    let req = [(":method", "GET"), (":scheme", "https"), (":authority", "api.test"), (":path", "/x?y")];
    let dpop_auth = format!("DPoP {bound}");
    let with = |extra: &[(&str, &str)]| {
        let mut v: Vec<(&str, &str)> = req.to_vec();
        v.extend_from_slice(extra);
        lines(&v)
    };
    write("identify", "dpop-proof", with(&[("authorization", &dpop_auth), ("dpop", &proof)]));
    write("identify", "dpop-scheme-without-proof", with(&[("authorization", &dpop_auth)]));
    write("identify", "dpop-bound-bearer", with(&[("authorization", &format!("Bearer {bound}"))]));
    write("identify", "dpop-two-proofs", with(&[("authorization", &dpop_auth), ("dpop", &proof), ("dpop", &proof)]));
    let cert_hash = hmac_sha256::Hash::hash(b"a client certificate");
    let x5t = hs(&json!({"iss": ISS, "aud": "svc", "sub": "agent-mtls", "exp": EXP, "cnf": {"x5t#S256": b64(&cert_hash)}}));
    let digest: String = cert_hash.iter().map(|b| format!("{b:02x}")).collect();
    write("identify", "mtls-bound", with(&[("authorization", &format!("Bearer {x5t}")), ("@connection.sha256_peer_certificate_digest", &digest)]));
    let mut bad = b"authorization: Bearer \xff\xfe\n".to_vec();
    bad.extend_from_slice(b"x-api-key: \x01\n");
    write("identify", "not-utf8", bad);
    write("identify", "nothing", "");

    // xfcc: header values.
    write("xfcc", "two-hops", r#"By=spiffe://a/x;Hash=aa;URI=spiffe://a/first,By=spiffe://a/y;Hash=bb;Subject="CN=x,O=y";URI=spiffe://a/second"#);
    write("xfcc", "quoted-uri", r#"Hash=aa;URI="spiffe://example.org/a,b;c=\"d\"""#);
    write("xfcc", "unterminated", r#"URI="unterminated"#);
    write("xfcc", "no-uri", "Hash=aa;DNS=x.example.org");
    write("xfcc", "escapes", "URI=\"\\\\\";Subject=\"\\\"\",uri = spiffe://x/é");
    write("xfcc", "empty-elements", ",,;;=,URI=");

    // session: request lines, blank line, the token's claims.
    write("session", "mcp-header", lines(&[("mcp-session-id", "ses_abc")]));
    write("session", "x-session-header", lines(&[("x-session-id", "ses_x")]));
    write("session", "both-headers", lines(&[("x-session-id", "ses_x"), ("mcp-session-id", "ses_y")]));
    write("session", "invalid-header", lines(&[("x-session-id", "has space")]));
    write("session", "claim", "\n\n{\"sid\": \"ses_claim\", \"sub\": \"a\"}");
    write("session", "claim-invalid", "\n\n{\"sid\": \"\"}");
    write("session", "claim-not-string", "@claim: sid2\n\n{\"sid2\": 5}");
    write("session", "minted", "");
    write("session", "too-long", lines(&[("mcp-session-id", &"s".repeat(257))]));

    // mcp: JSON-RPC bodies.
    let call = |id: u64, tool: &str| json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {"b": [1, 2], "a": {"x": null}}}});
    write("mcp", "initialize", json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}}}).to_string());
    write("mcp", "tools-call", call(1, "tickets.search").to_string());
    write("mcp", "batch", json!([call(1, "tickets.search"), call(2, "shell.exec"), {"jsonrpc": "2.0", "method": "notifications/initialized"}]).to_string());
    write("mcp", "resources-read", json!({"jsonrpc": "2.0", "id": "r", "method": "resources/read", "params": {"uri": "file:///etc/passwd"}}).to_string());
    write("mcp", "prompts-get", json!({"jsonrpc": "2.0", "id": null, "method": "prompts/get", "params": {"name": "p"}}).to_string());
    write("mcp", "response", json!({"jsonrpc": "2.0", "id": 3, "result": {}}).to_string());
    write("mcp", "empty-batch", "[]");
    write("mcp", "not-jsonrpc", r#"{"jsonrpc": "1.0", "method": "x"}"#);
    write("mcp", "not-json", "tools/call");
    write("mcp", "method-not-string", r#"[{"jsonrpc": "2.0", "method": 5}]"#);

    // config: plugin configurations (small policies: every input compiles one).
    let min = json!({"policy": {"modules": {"a.rego": "package warden.session\ndefault decision := {\"action\": \"allow\", \"reasons\": []}"}}});
    write("config", "minimal", min.to_string());
    write("config", "full", plugin_config(Some(json!({"cluster": "state", "token": "proxy-token-0123456789", "mode": "cached", "timeout_ms": 100})), false).to_string());
    write("config", "shadow-candidate", json!({"mode": "shadow", "policy": {
        "modules": {"a.rego": "package warden.session\ndefault decision := {\"action\": \"deny\", \"reasons\": [\"x\"]}"},
        "data": {"limits": {"max_steps": 3}},
        "candidate": {"modules": {"b.rego": "package warden.session\ndefault decision := {\"action\": \"allow\"}"}},
        "max_instructions": 1000, "on_error": "allow", "input_headers": ["user-agent"]},
        "session": {"headers": ["x-s"], "claim": "sid", "local_max_sessions": 1},
        "context": {"region_header": "x-r", "device_header": "x-d"},
        "token_cache": {"max_entries": 0},
        "mcp": {"paths": ["/mcp", "/"], "max_body_bytes": 10, "jsonrpc_errors": false}}).to_string());
    write("config", "jwks-uri", json!({"policy": min["policy"], "identity": {"allow_anonymous": true, "jwt": {"header": "x-token", "providers": [
        {"name": "r", "issuer": ISS, "algorithms": ["RS256"], "jwks_uri": {"cluster": "jwks", "path": "/k", "refresh_seconds": 0, "timeout_ms": 0}}]}}}).to_string());
    write("config", "empty", "");
    write("config", "unknown-field", r#"{"policy": {"modules": {}}, "nope": 1}"#);
    write("config", "bad-rego", r#"{"policy": {"modules": {"a.rego": "package x\ndecision := "}}}"#);
    write("config", "bad-entrypoint", r#"{"policy": {"modules": {"a.rego": "package x"}, "entrypoint": "x"}}"#);
    write("config", "bad-jwks", json!({"policy": min["policy"], "identity": {"jwt": {"providers": [{"name": "p", "issuer": "i", "jwks": {"keys": [{"kty": "oct", "k": "c2hvcnQ"}]}}]}}}).to_string());

    // request: the whole flow.
    let mcp_head = |extra: &[(&str, &str)]| {
        let mut v = vec![(":method", "POST"), (":path", "/mcp"), (":authority", "api.test"), ("content-type", "application/json"), ("authorization", bearer.as_str())];
        v.extend_from_slice(extra);
        lines(&v)
    };
    write("request", "get", lines(&[(":method", "GET"), (":path", "/echo-subject"), (":authority", "api.test"), ("authorization", &bearer), ("x-warden-subject", "root")]));
    write("request", "admin", lines(&[(":method", "GET"), (":path", "/admin/x"), ("x-api-key", API_KEY), ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]));
    write("request", "step-up", lines(&[(":method", "GET"), (":path", "/secrets"), ("authorization", &bearer), ("x-session-id", "ses_1")]));
    write("request", "throttle", lines(&[(":method", "GET"), (":path", "/busy"), ("x-api-key", API_KEY)]));
    write("request", "terminate", lines(&[(":method", "GET"), (":path", "/kill"), ("x-api-key", API_KEY), ("mcp-session-id", "ses_2")]));
    write("request", "no-credential", lines(&[(":method", "GET"), (":path", "/")]));
    write("request", "mcp-initialize", format!("{}\n{}", mcp_head(&[]), json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}})));
    write("request", "mcp-denied-tool", format!("{}\n{}", mcp_head(&[("mcp-session-id", "ses_m")]), call(1, "shell.exec")));
    write("request", "mcp-batch", format!("{}\n{}", mcp_head(&[("mcp-session-id", "ses_m")]), json!([call(1, "a"), call(2, "shell.exec")])));
    write("request", "mcp-not-json", format!("{}\n{{", mcp_head(&[])));
    write("request", "mcp-too-large", format!("@body: too-large\n{}\n{{}}", mcp_head(&[])));
    write("request", "sync-ok", lines(&[("@state", "sync"), ("@answer", "ok"), (":method", "GET"), (":path", "/echo-subject"), ("authorization", &bearer), ("x-client-region", "eu"), ("x-device-id", "d1")]));
    write("request", "sync-down", lines(&[("@state", "sync"), ("@answer", "down"), (":method", "GET"), (":path", "/"), ("x-api-key", API_KEY)]));
    write("request", "sync-refused", lines(&[("@state", "sync"), ("@answer", "refused"), (":method", "GET"), (":path", "/"), ("x-api-key", API_KEY)]));
    write("request", "sync-mismatch", lines(&[("@state", "sync"), ("@answer", "mismatch"), (":method", "GET"), (":path", "/"), ("x-api-key", API_KEY), ("x-session-id", "ses_3")]));
    write("request", "sync-revoked", lines(&[("@state", "sync"), ("@answer", "revoked"), (":method", "GET"), (":path", "/"), ("x-api-key", API_KEY)]));
    write("request", "cached-mcp", format!("@state: cached\n{}\n{}", mcp_head(&[("mcp-session-id", "ses_c")]), call(1, "tickets.search")));
    write("request", "shadow-admin", lines(&[("@state", "shadow"), (":method", "GET"), (":path", "/admin"), ("x-api-key", API_KEY)]));
    write("request", "xfcc-trusted", lines(&[("@source.address", &format!("{TRUSTED_HOP}:1")), (":method", "GET"), (":path", "/echo-subject"),
        ("x-forwarded-client-cert", "URI=spiffe://example.org/ns/x/sa/y")]));
    write("request", "bad-session-id", lines(&[(":method", "GET"), (":path", "/"), ("x-api-key", API_KEY), ("x-session-id", "a b")]));

    // state: begin-step and record bodies as a proxy sends them.
    let begin = json!({"session_id": "ses_1", "subject": "agent-7", "credential": "sha256:aa", "workload": "spiffe://example.org/w",
        "region": "eu", "device": "d1", "tools": ["a", "b"], "known_steps": 3, "scopes": ["read"]});
    write("state", "begin", begin.to_string());
    write("state", "begin-minimal", r#"{"session_id": "s", "subject": ""}"#);
    write("state", "begin-bad-session", r#"{"session_id": "", "subject": "a", "tools": [1]}"#);
    let record = json!({"session_id": "ses_1", "step": 1, "decision_id": "dec_1", "at_ms": NOW_S * 1000, "subject": "agent-7", "identity_kind": "jwt",
        "issuer": ISS, "credential": "sha256:aa", "kid": "es1", "jti": "j", "delegation": ["b"], "workload": null, "region": "eu", "device": "d",
        "source_address": "10.0.0.1:5", "method": "POST", "authority": "api.test", "path": "/mcp", "tool": "tickets.search", "tools": ["tickets.search"],
        "policy_version": "sha256:00", "action": "allow", "reasons": [], "risk": 0.0, "risk_before": 0.0, "flags": [], "signals": [], "disagrees": false});
    write("state", "record", record.to_string());
    write("state", "batch", json!({"records": [record, {"session_id": "ses_2", "step": 4, "decision_id": "d", "action": "deny", "reasons": ["x"]}]}).to_string());
    write("state", "batch-bad-action", json!({"records": [{"session_id": "s", "step": 1, "decision_id": "d", "action": "explode"}]}).to_string());
    write("state", "batch-step-zero", json!({"records": [{"session_id": "s", "step": 0, "decision_id": "d", "action": "allow"}]}).to_string());
    write("state", "batch-empty", r#"{"records": []}"#);
    eprintln!("seeds written under {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
