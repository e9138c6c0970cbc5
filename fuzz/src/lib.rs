//! What each fuzz target does, as plain functions over bytes. The libFuzzer binaries in
//! `fuzz_targets/` are one-line calls to these, and `tests/replay.rs` runs them over every file of
//! `corpus/<target>/` and `regressions/<target>/` on stable Rust, so `make test` replays what the
//! fuzzer found without libFuzzer.
//!
//! Inputs are readable text wherever a target takes more than one thing, so seeds can be written
//! by hand: a request is `name: value` lines (pseudo-headers such as `:path: /x` included), then a
//! blank line and the body; lines starting with `@` set the fake host's properties
//! (`@source.address: 10.0.0.9:1`) or pick the target's set-up (`@state: sync`, see `request`).
//! Every target asserts only what must hold for any input: no panic, and a refusal with a reason.

use std::rc::Rc;
use std::sync::OnceLock;

use ct_codecs::{Base64UrlSafeNoPadding, Encoder};
use jwt_simple::prelude::*;
use serde_json::{json, Value};
use warden_core::host::{FakeHost, Headers};
use warden_core::identity::jwt::{JwtVerifier, Provider, VerifiedToken};
use warden_core::identity::{Identifier, Identity, IdentityKind};
use warden_core::wire::{BeginOutcome, BeginResponse, BeginStep, RecordBatch, StepRecord};
use warden_core::{Body, StateFailure, Step, Warden};

/// A target: any bytes in, a panic only on a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name of its `fuzz_targets/` binary and its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("jwt", jwt),
    ("jwks", jwks),
    ("identify", identify),
    ("xfcc", xfcc),
    ("session", session),
    ("mcp", mcp),
    ("config", config),
    ("request", request),
    ("state", state),
    ("path", path),
    ("ssf", ssf),
    ("mcp_headers", mcp_headers),
];

/// The issuer of the fuzzed provider.
pub const ISS: &str = "https://issuer.fuzz";
/// The fake host's clock (seconds); seed tokens are valid at it.
pub const NOW_S: u64 = 1_750_000_000;
/// The HS256 secret of key `hs1`: known, so the `jwt` target can sign arbitrary claims.
pub const HS_SECRET: [u8; 32] = [7u8; 32];
/// The ES256 private scalar of key `es1` (the seed generator signs with it).
pub const ES_SCALAR: [u8; 32] = [0x11; 32];
/// The SHA-256 preimage of the configured API key.
pub const API_KEY: &str = "key-123";
/// The XFCC hop whose header is believed.
pub const TRUSTED_HOP: &str = "10.0.0.9";

/// A fixed 2048-bit RSA public modulus (key `rs1`; its private half was thrown away).
const RSA_N: &str = "2Yx3-SN6W0k_k-t8E1vyOEXuyasvX0e1406Urdtjf3IEQx4zxlRvjLd4UMat0RFPf859lZZ3iKlRbSMoA19zFPhw0z7JRAnRypGRItFPT73-9HvZfK4DvUxtiaS592rI98RWPbQCah8Oez9DFeiVCa9ls-iRe2uMwZV17Pw1l0RYEz7VzNg4xaXI4AgewEmyvJJKMfB-mpVXjn5gByyMQ2XX-M3hIEYWVYHaLDlJe1ukb72M684nhSYECXweejtgYsKCJw0ZR0csrus_3AMtxof7mVl4Yw4uU07aqksWuVA-cQwfyRkgVMaJNz-kzFfXq9d4C_yGdANMs3L9nZQklQ";
/// RFC 8037 A.2's Ed25519 public key (key `ed1`).
const ED_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

const ALGS: [&str; 4] = ["RS256", "ES256", "EdDSA", "HS256"];

/// The request-flow unit tests' policy, so a fuzzed request meets the same rules.
const POLICY: &str = include_str!("../../crates/warden-core/src/tests/policy.rego");

/// The key set every JWT-verifying target uses: one key of each supported algorithm.
pub fn jwks_doc() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let es = ES256KeyPair::from_bytes(&ES_SCALAR).map(|k| k.public_key().to_jwk()).unwrap_or_default();
        let mut es: Value = serde_json::from_str(&es).unwrap_or(Value::Null);
        es["kid"] = json!("es1");
        json!({"keys": [
            es,
            {"kty": "RSA", "kid": "rs1", "alg": "RS256", "n": RSA_N, "e": "AQAB"},
            {"kty": "OKP", "kid": "ed1", "crv": "Ed25519", "x": ED_X},
            {"kty": "oct", "kid": "hs1", "k": b64(&HS_SECRET)},
        ]})
    })
}

/// The identity section: JWT (all four algorithms), an API key, SPIFFE with a trusted XFCC hop.
pub fn identity_config() -> Value {
    json!({
        "jwt": {"providers": [{
            "name": "fuzz", "issuer": ISS, "audiences": ["svc"], "algorithms": ALGS,
            "jwks": jwks_doc(),
        }]},
        "api_keys": {"keys": [{"sha256": sha256_hex(API_KEY.as_bytes()), "subject": "svc-batch", "scopes": ["read"]}]},
        "spiffe": {"trust_domains": ["example.org"], "trusted_xfcc_hops": [TRUSTED_HOP]},
    })
}

/// A whole plugin configuration around `identity_config`, with `state` if given.
pub fn plugin_config(state: Option<Value>, shadow: bool) -> Value {
    let mut cfg = json!({
        "policy": {"modules": {"session.rego": POLICY}},
        "identity": identity_config(),
    });
    if let Some(s) = state {
        cfg["state"] = s;
    }
    if shadow {
        cfg["mode"] = json!("shadow");
    }
    cfg
}

pub fn b64(bytes: &[u8]) -> String {
    Base64UrlSafeNoPadding::encode_to_string(bytes).unwrap_or_default()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hmac_sha256::Hash::hash(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `header.payload.signature`, HS256 with the configured secret, over exactly these bytes.
pub fn sign_hs256(header: &[u8], payload: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let mac = hmac_sha256::HMAC::mac(input.as_bytes(), HS_SECRET);
    format!("{input}.{}", b64(&mac))
}

fn verifier() -> JwtVerifier {
    let cfg: warden_core::config::PluginConfig = match warden_core::config::parse(plugin_config(None, false).to_string().as_bytes()) {
        Ok(c) => c,
        Err(e) => unreachable!("the fuzz configuration is valid: {e}"),
    };
    let providers = cfg.identity.jwt.iter().flat_map(|j| j.providers.iter()).map(|p| {
        let keys = match warden_core::identity::jwks::parse_jwks(jwks_doc(), &p.algorithms) {
            Ok((k, _)) => k,
            Err(e) => unreachable!("the fuzz key set is valid: {e}"),
        };
        Provider { config: p.clone(), keys }
    });
    JwtVerifier::new(providers.collect(), 16)
}

fn identifier() -> Identifier {
    let cfg = match warden_core::config::parse(plugin_config(None, false).to_string().as_bytes()) {
        Ok(c) => c,
        Err(e) => unreachable!("the fuzz configuration is valid: {e}"),
    };
    Identifier::new(&cfg.identity, Some(verifier()))
}

/// A refusal always carries a stable, non-empty reason code.
fn check_identity_error(e: warden_core::error::IdentityError) {
    let code = e.code();
    assert!(!code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "bad reason code {code:?}");
}

/// JWT verification. An input that starts with `{` is claims (or `header-json` NEWLINE
/// `claims-json`) that the target signs with the HS256 key, so the fuzzer reaches everything
/// after the signature check; anything else is the token as presented.
pub fn jwt(data: &[u8]) {
    let token = if data.first() == Some(&b'{') {
        match data.iter().position(|b| *b == b'\n') {
            Some(i) => sign_hs256(&data[..i], &data[i + 1..]),
            None => sign_hs256(br#"{"alg":"HS256","typ":"JWT","kid":"hs1"}"#, data),
        }
    } else {
        String::from_utf8_lossy(data).into_owned()
    };
    let mut v = verifier();
    match v.verify(&token, NOW_S) {
        Ok((tok, hit)) => {
            assert!(!hit, "a fresh verifier has nothing cached");
            assert_eq!(tok.issuer, ISS);
            assert!(tok.delegation.len() <= 16);
            // The cache must give the same answer.
            match v.verify(&token, NOW_S) {
                Ok((again, hit)) => assert!(hit && again.subject == tok.subject),
                Err(e) => unreachable!("verified once, refused from the cache: {e:?}"),
            }
        }
        Err(e) => {
            check_identity_error(e);
            // A refused token is never cached: asking again refuses again, identically.
            assert_eq!(v.verify(&token, NOW_S).err(), Some(e));
        }
    }
}

/// JWKS documents, as fetched from a `jwks_uri`: whatever the body, a key set or an error.
pub fn jwks(data: &[u8]) {
    let Ok(doc) = serde_json::from_slice::<Value>(data) else { return };
    for algs in [&ALGS[..], &["ES256"][..]] {
        let algs: Vec<String> = algs.iter().map(|a| a.to_string()).collect();
        if let Ok((set, _skipped)) = warden_core::identity::jwks::parse_jwks(&doc, &algs) {
            assert!(!set.is_empty());
            assert!(set.keys.iter().all(|k| algs.iter().any(|a| a == k.key.alg())));
        }
    }
}

/// A request as the targets read it: headers, fake-host properties, set-up lines, body.
pub struct Request<'a> {
    pub headers: Vec<(String, Vec<u8>)>,
    pub host: FakeHost,
    /// `@name: value` lines whose name has no `.` (target set-up, not host properties).
    pub setup: Vec<(String, String)>,
    /// After the first blank line, if there is one.
    pub body: Option<&'a [u8]>,
}

impl Request<'_> {
    fn setup(&self, name: &str) -> Option<&str> {
        self.setup.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Split `name: value` lines (see the crate's docs) and the body.
pub fn parse_request(data: &[u8]) -> Request<'_> {
    let (head, body) = match find(data, b"\n\n") {
        Some(i) => (&data[..i], Some(&data[i + 2..])),
        None => (data, None),
    };
    let mut req = Request { headers: Vec::new(), host: FakeHost { now_ms: NOW_S * 1000, counter: 1, ..Default::default() }, setup: Vec::new(), body };
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // The name ends at the first `:` after its first byte (`:path: /x` is a name too).
        let Some(colon) = line.iter().skip(1).position(|b| *b == b':').map(|i| i + 1) else { continue };
        let name = String::from_utf8_lossy(&line[..colon]).into_owned();
        let value = &line[colon + 1..];
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match name.strip_prefix('@') {
            Some(prop) if prop.contains('.') => {
                req.host.properties.insert(prop.to_string(), value.to_vec());
            }
            Some(setup) => req.setup.push((setup.to_string(), String::from_utf8_lossy(value).into_owned())),
            None => req.headers.push((name, value.to_vec())),
        }
    }
    req
}

/// Identification from arbitrary headers and connection properties: JWT, API key, SPIFFE (mTLS
/// or XFCC from a trusted hop). An identity, or a refusal with a reason.
pub fn identify(data: &[u8]) {
    let req = parse_request(data);
    let headers = Headers::from_pairs(req.headers.clone());
    let mut id = identifier();
    match id.identify(&headers, &req.host, NOW_S) {
        Ok(who) => {
            // A SPIFFE identity is a trusted workload, never a forged one.
            if let Some(w) = &who.workload {
                assert!(w.starts_with("spiffe://example.org/") || w == "spiffe://example.org", "untrusted workload {w:?}");
            }
            if who.kind == IdentityKind::Anonymous {
                unreachable!("anonymous is not configured");
            }
        }
        Err(e) => check_identity_error(e),
    }
}

/// `x-forwarded-client-cert` values (Envoy's format, quoting included).
pub fn xfcc(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(uri) = warden_core::identity::xfcc::last_uri(s) {
        assert!(uri.len() <= s.len(), "the URI comes from the header");
    }
}

/// Which session a request belongs to: session headers, else the token's claim, else a new id.
/// Input: request lines, blank line, then the verified token's claims as JSON (optional).
pub fn session(data: &[u8]) {
    let mut req = parse_request(data);
    let headers = Headers::from_pairs(req.headers.clone());
    let token = req.body.and_then(|b| serde_json::from_slice::<Value>(b).ok()).map(|claims| {
        Rc::new(VerifiedToken {
            provider: "fuzz".into(),
            issuer: ISS.into(),
            subject: claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_string(),
            scopes: Vec::new(),
            claims: regorus::Value::Null,
            raw_claims: claims,
            delegation: Vec::new(),
            kid: None,
            jti: None,
            iat: None,
            exp: None,
            nbf: None,
            leeway: 60,
            fingerprint: "sha256:00".into(),
            cnf_x5t: None,
            cnf_jkt: None,
            input_parts: Default::default(),
        })
    });
    let identity = Identity {
        kind: if token.is_some() { IdentityKind::Jwt } else { IdentityKind::ApiKey },
        subject: "agent".into(),
        issuer: None,
        scopes: Vec::new(),
        token,
        workload: None,
        fingerprint: None,
        token_cache_hit: false,
        binding: None,
    };
    let mut cfg = warden_core::config::SessionConfig::default();
    if let Some(claim) = req.setup("claim") {
        cfg.claim = claim.to_string();
    }
    if let Ok(s) = warden_core::session::resolve(&cfg, &headers, &identity, &mut req.host) {
        assert!(warden_core::session::is_valid_session_id(&s.id), "resolved an invalid session id {:?}", s.id);
    }
}

/// MCP JSON-RPC bodies, single messages and batches.
pub fn mcp(data: &[u8]) {
    match warden_core::mcp::parse(data) {
        Ok(req) => {
            assert!(!req.calls.is_empty());
            let _ = warden_core::mcp::to_value(&req);
            let answer = warden_core::mcp::jsonrpc_error(&req, -32001, "refused", json!({"reason": "fuzz"}));
            // A batch is answered per call that has an id (notifications get no answer, so a
            // batch of notifications only gets an empty array); a single message always is.
            match answer.as_array() {
                Some(a) => assert!(req.batch && a.len() == req.calls.iter().filter(|c| c.id.is_some()).count()),
                None => assert!(!req.batch && answer.get("error").is_some()),
            }
        }
        Err(e) => assert!(!e.code().is_empty()),
    }
}

/// The plugin configuration as Envoy hands it to `on_configure`: parsed, validated, keys loaded
/// and the policy compiled, or refused with the field at fault. A configuration that compiles
/// also takes one request, which must not panic either.
pub fn config(data: &[u8]) {
    match Warden::from_json(data) {
        Ok(mut w) => {
            let _ = w.jwks_targets();
            let mut host = FakeHost { now_ms: NOW_S * 1000, counter: 1, ..Default::default() };
            let headers = Headers::from_pairs([(":method".to_string(), b"GET".to_vec()), (":path".to_string(), b"/".to_vec())]);
            if let Step::Call { pending, .. } = w.on_request(headers, Body::Absent, &mut host) {
                let _ = w.resume(pending, Err("unavailable".into()), &mut host);
            }
        }
        Err(e) => assert!(!e.field.is_empty(), "a configuration error names its field: {e}"),
    }
}

/// The configured filters the `request` target picks from by `@state:`.
fn warden_for(state: Option<&str>) -> Result<Warden, warden_core::error::ConfigError> {
    let svc = |mode: &str| json!({"cluster": "state", "token": "proxy-token-0123456789", "mode": mode});
    let cfg = match state {
        Some("sync") => plugin_config(Some(svc("sync")), false),
        Some("cached") => plugin_config(Some(svc("cached")), false),
        Some("shadow") => plugin_config(None, true),
        _ => plugin_config(None, false),
    };
    Warden::from_json(cfg.to_string().as_bytes())
}

/// The whole request flow on arbitrary headers, connection properties and body. Set-up lines:
/// `@state: local|sync|cached|shadow` (which filter), `@answer: ok|down|refused|mismatch|revoked` (what
/// the state service says to a begin-step), `@body: too-large`.
pub fn request(data: &[u8]) {
    let mut req = parse_request(data);
    let mut w = match warden_for(req.setup("state")) {
        Ok(w) => w,
        Err(e) => unreachable!("the fuzz configurations compile: {e}"),
    };
    let body = match (req.setup("body"), req.body) {
        (Some("too-large"), _) => Body::TooLarge,
        (_, Some(b)) => Body::Complete(b),
        (_, None) => Body::Absent,
    };
    let answer = match req.setup("answer") {
        Some("down") => Err(StateFailure::Unavailable("unavailable".to_string())),
        Some("refused") => Err(StateFailure::Refused("HTTP 400".to_string())),
        Some(a) => Ok(BeginResponse {
            outcome: match a {
                "mismatch" => BeginOutcome::SubjectMismatch,
                "revoked" => BeginOutcome::Revoked,
                _ => BeginOutcome::Ok,
            },
            step: if a == "ok" { 1 } else { 0 },
            new: true,
            session: Default::default(),
        }),
        None => Ok(BeginResponse { outcome: BeginOutcome::Ok, step: 1, new: true, session: Default::default() }),
    };
    let headers = Headers::from_pairs(req.headers.clone());
    let out = match w.on_request(headers, body, &mut req.host) {
        Step::Done(out) => out,
        Step::Call { pending, call } => {
            // What goes to the service is what the service accepts, or the service refuses it.
            if let Ok(begin) = serde_json::from_slice::<BeginStep>(&call.body) {
                let _ = warden_state::validate::begin(&begin);
            }
            w.resume(pending, answer, &mut req.host)
        }
    };
    if let Some(reply) = &out.reply {
        assert!((200..600).contains(&reply.status), "status {}", reply.status);
    }
    // Headers the filter sets must be valid header values.
    for (name, value) in out.set_headers.iter().chain(out.response_headers.iter()) {
        assert!(!name.is_empty(), "empty header name");
        assert!(!value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0), "header {name} carries CR/LF/NUL: {value:?}");
    }
}

/// The state service's request bodies: `POST /v1/steps/begin` and `POST /v1/records`, decoded
/// as the API decodes them and then checked by `warden_state::validate`.
pub fn state(data: &[u8]) {
    if let Ok(begin) = serde_json::from_slice::<BeginStep>(data) {
        if warden_state::validate::begin(&begin).is_ok() {
            let _ = begin.seen();
        }
    }
    if let Ok(batch) = serde_json::from_slice::<RecordBatch>(data) {
        if warden_state::validate::batch(&batch.records).is_ok() {
            for r in &batch.records {
                let _ = r.seen();
                // What the store hashes into the trail.
                if let Ok(body) = serde_json::to_string(r) {
                    let _ = warden_core::trail::chain_hash("", &body);
                }
            }
        }
    }
    if let Ok(record) = serde_json::from_slice::<StepRecord>(data) {
        let _ = warden_state::validate::record(&record);
    }
}

/// Request paths (`:path`): the canonical form is a fixed point, free of what makes a path
/// ambiguous (empty and dot segments, encoded slashes), or the path is refused with a reason.
pub fn path(data: &[u8]) {
    match warden_core::path::canonicalize(data) {
        Ok(c) => {
            assert_eq!(warden_core::path::canonicalize(c.target().as_bytes()).as_ref(), Ok(&c), "canonical twice is canonical once");
            if c.path != "*" {
                let p = c.path.as_str();
                assert!(p.starts_with('/') && !p.contains("//"), "{p:?}");
                assert!(!p.split('/').any(|seg| seg == "." || seg == ".."), "{p:?}");
                let upper = p.to_ascii_uppercase();
                assert!(!upper.contains("%2F") && !upper.contains("%5C") && !upper.contains("%00"), "{p:?}");
            }
        }
        Err(e) => assert!(!e.code().is_empty()),
    }
}

/// The fuzzed SSF transmitter's key: fixed, so seeds stay valid.
fn ssf_key() -> &'static ES256KeyPair {
    static KEY: OnceLock<ES256KeyPair> = OnceLock::new();
    KEY.get_or_init(|| match ES256KeyPair::from_bytes(&[7u8; 32]) {
        Ok(k) => k.with_key_id("tx1"),
        Err(e) => unreachable!("a fixed P-256 scalar is a key: {e}"),
    })
}

/// Security Event Tokens (the state service's SSF receiver): arbitrary tokens, and arbitrary
/// claims (a JSON object line) signed with the transmitter's key as a SET. Whatever the events
/// say, every target the receiver acts on names something (a session, subject or credential).
pub fn ssf(data: &[u8]) {
    use warden_core::ssf::{Receiver, Target, SET_TYP};
    let token = if data.first() == Some(&b'{') {
        let Ok(custom) = serde_json::from_slice::<Value>(data) else { return };
        let claims = JWTClaims {
            issued_at: Some(Duration::from_secs(NOW_S)),
            expires_at: None,
            invalid_before: None,
            issuer: Some("https://tx.fuzz".into()),
            subject: None,
            audiences: Some(Audiences::AsString("https://rx.fuzz".into())),
            jwt_id: Some("j1".into()),
            nonce: None,
            custom,
        };
        let opts = HeaderOptions { signature_type: Some(SET_TYP.into()), ..Default::default() };
        match ssf_key().sign_with_options(claims, &opts) {
            Ok(t) => t,
            Err(_) => return,
        }
    } else {
        String::from_utf8_lossy(data).into_owned()
    };
    let pk = ssf_key().public_key().public_key().to_bytes_uncompressed();
    let enc = |b: &[u8]| Base64UrlSafeNoPadding::encode_to_string(b).unwrap_or_default();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": enc(&pk[1..33]), "y": enc(&pk[33..65]), "kid": "tx1", "alg": "ES256"}]});
    let keys = match warden_core::identity::jwks::parse_jwks(&jwks, &["ES256".to_string()]) {
        Ok((k, _)) => k,
        Err(e) => unreachable!("the fuzz transmitter's JWKS is valid: {e}"),
    };
    let r = Receiver { issuer: "https://tx.fuzz".into(), audience: "https://rx.fuzz".into(), keys, max_age_seconds: 3600 };
    match r.verify(&token, NOW_S) {
        Ok((jti, events)) => {
            assert!(!jti.is_empty());
            for e in events {
                let named = match &e.target {
                    Target::Session(v) | Target::Subject(v) | Target::Credential(v) => v,
                };
                assert!(!named.is_empty(), "an event that names nothing: {e:?}");
            }
        }
        Err(refusal) => assert!(
            ["invalid_request", "invalid_key", "invalid_issuer", "invalid_audience"].contains(&refusal.err) && !refusal.description.is_empty()
        ),
    }
}

/// MCP 2026-07-28: routing headers (`Mcp-Method`, `Mcp-Name`, `MCP-Protocol-Version`) and a body,
/// through the whole flow: decided on the headers, and when held, on the body held to them
/// (`mcp::declared::agree`, the one rule). `@state: local|cached|sync` picks the filter (a
/// begin-step is answered `ok`). Nothing panics, and a held body the rule refuses is never let
/// through.
pub fn mcp_headers(data: &[u8]) {
    let mut req = parse_request(data);
    let headers = Headers::from_pairs(req.headers.clone());
    let declared = warden_core::mcp::declared::declared(&headers);
    let disagrees = match (&declared, req.body.map(warden_core::mcp::parse)) {
        (Ok(d), Some(Ok(m))) => warden_core::mcp::declared::agree(d, &m).is_err(),
        _ => false,
    };
    let mut w = match warden_for(req.setup("state")) {
        Ok(w) => w,
        Err(e) => unreachable!("the fuzz configurations compile: {e}"),
    };
    let ok = BeginResponse { outcome: BeginOutcome::Ok, step: 1, new: true, session: Default::default() };
    let mut out = match w.on_request(headers, Body::Coming, &mut req.host) {
        Step::Done(out) => out,
        Step::Call { pending, .. } => w.resume(pending, Ok(ok), &mut req.host),
    };
    if let Some(held) = out.hold.take() {
        let body = req.body.map(Body::Complete).unwrap_or(Body::Absent);
        out = w.on_held_body(held, body, &mut req.host);
        if disagrees {
            assert!(out.reply.as_ref().is_some_and(|r| r.status == 400), "a body at odds with its headers went on");
        }
        assert!(out.hold.is_none(), "held twice");
    }
    if let Some(reply) = &out.reply {
        assert!((200..600).contains(&reply.status), "status {}", reply.status);
    }
}
