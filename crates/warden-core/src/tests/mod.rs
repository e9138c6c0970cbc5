//! The whole per-request flow, natively, with real signed tokens and the `FakeHost` double.

use jwt_simple::prelude::*;
use serde_json::json;

use crate::*;
use crate::decision::Action;
use crate::host::Headers;
use crate::policy::{Policy, PolicySource};
use crate::wire::StepRecord;
use crate::session::SessionState;
use crate::wire::{BeginOutcome, BeginResponse, BeginStep};
use crate::host::FakeHost;

const ISS: &str = "https://issuer.test";

const POLICY: &str = include_str!("policy.rego");

struct Keys {
    es: ES256KeyPair,
    hs: HS256Key,
}

fn keys() -> Keys {
    Keys { es: ES256KeyPair::generate().with_key_id("es1"), hs: HS256Key::from_bytes(&[7u8; 32]).with_key_id("hs1") }
}

fn config(k: &Keys, extra: serde_json::Value) -> Vec<u8> {
    let mut es_jwk: serde_json::Value = serde_json::from_str(&k.es.public_key().to_jwk()).unwrap();
    es_jwk["kid"] = json!("es1");
    let hs = ct_codecs::Base64UrlSafeNoPadding::encode_to_string([7u8; 32]).unwrap();
    let mut cfg = json!({
        "policy": {"modules": {"session.rego": POLICY}},
        "identity": {
            "jwt": {"providers": [{
                "name": "test", "issuer": ISS, "audiences": ["svc"],
                "algorithms": ["ES256", "HS256"],
                "jwks": {"keys": [es_jwk, {"kty": "oct", "kid": "hs1", "k": hs}]}
            }]},
            "api_keys": {"keys": [{"sha256": hash::hex(&hash::sha256(b"key-123")), "subject": "svc-batch", "scopes": ["read"]}]},
            "spiffe": {"trust_domains": ["example.org"], "trusted_xfcc_hops": ["10.0.0.9"]}
        },
        // The tests' client (127.0.0.1) plays the front proxy that sets region and device.
        "context": {"trusted_sources": ["127.0.0.1"]}
    });
    if let (Some(base), Some(add)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in add {
            base.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&cfg).unwrap()
}

fn claims(sub: &str) -> JWTClaims<serde_json::Value> {
    Claims::with_custom_claims(json!({}), Duration::from_mins(10)).with_issuer(ISS).with_audience("svc").with_subject(sub)
}

fn with(mut c: JWTClaims<serde_json::Value>, f: impl FnOnce(&mut JWTClaims<serde_json::Value>)) -> JWTClaims<serde_json::Value> {
    f(&mut c);
    c
}

fn sign_es(k: &Keys, c: JWTClaims<serde_json::Value>) -> String {
    k.es.sign(c).unwrap()
}

fn req(path: &str, extra: &[(&str, &[u8])]) -> Headers {
    let mut v: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), b"GET".to_vec()),
        (":path".into(), path.as_bytes().to_vec()),
        (":authority".into(), b"api.test".to_vec()),
    ];
    for (k, val) in extra {
        v.push((k.to_string(), val.to_vec()));
    }
    Headers::from_pairs(v)
}

/// Run a request that must be decided without a state-service call.
fn done(w: &mut Warden, headers: Headers, host: &mut FakeHost) -> RequestOutcome {
    match w.on_request(headers, Body::Absent, host) {
        Step::Done(out) => out,
        Step::Call { .. } => panic!("expected a decision, got a state-service call"),
    }
}

fn bearer(t: &str) -> Vec<u8> {
    format!("Bearer {t}").into_bytes()
}

fn header<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn reply_reason(out: &RequestOutcome) -> (u32, serde_json::Value) {
    let r = out.reply.as_ref().expect("expected a local reply");
    (r.status, serde_json::from_slice(&r.body).unwrap())
}

// jwt-simple stamps tokens with the real clock when signing; the verifier is handed the host's
// `now`, so the host clock is real time too.
fn live_host() -> FakeHost {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    FakeHost::at(now).with_property("source.address", "127.0.0.1:5555")
}

#[test]
fn valid_token_is_allowed_and_stamped() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let t = sign_es(&k, claims("agent-7"));
    let mut h = live_host();
    let forged: &[u8] = b"root";
    let out = done(&mut w, req("/echo-subject", &[("authorization", &bearer(&t)), ("x-warden-subject", forged)]), &mut h);
    assert!(out.reply.is_none(), "{:?}", out.reply);
    assert_eq!(out.remove_headers, vec!["x-warden-subject"]);
    assert_eq!(header(&out.set_headers, "x-warden-subject"), Some("agent-7"));
    assert_eq!(header(&out.set_headers, "x-policy-saw"), Some("agent-7"));
    assert_eq!(header(&out.set_headers, "x-warden-step"), Some("1"));
    let sid = header(&out.set_headers, "x-warden-session").unwrap().to_string();
    assert!(sid.starts_with("ses_"));
    assert!(correlation::is_valid_traceparent(header(&out.set_headers, "traceparent").unwrap()));
    assert_eq!(header(&out.response_headers, "x-warden-session"), Some(sid.as_str()));
    assert!(out.metrics.contains(&"warden.jwt_cache.miss".to_string()));

    // Same token again, same session: cache hit, step 2, traceparent kept.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let out = done(
        &mut w,
        req("/x", &[("authorization", &bearer(&t)), ("x-session-id", sid.as_bytes()), ("traceparent", tp.as_bytes())]),
        &mut h,
    );
    assert!(out.reply.is_none());
    assert_eq!(header(&out.set_headers, "x-warden-step"), Some("2"));
    assert_eq!(header(&out.set_headers, "traceparent"), Some(tp));
    assert!(out.metrics.contains(&"warden.jwt_cache.hit".to_string()));
}

#[test]
fn token_failures_have_distinct_reasons() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let mut h = live_host();
    let now = h.now_ms / 1000;
    let other = ES256KeyPair::generate().with_key_id("es1");
    let b64 = |v: &serde_json::Value| ct_codecs::Base64UrlSafeNoPadding::encode_to_string(v.to_string()).unwrap();
    let none_token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"iss": ISS, "sub": "x", "aud": "svc", "exp": now + 600}))
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("credential_missing", Vec::new()),
        ("token_expired", bearer(&sign_es(&k, with(claims("a"), |c| c.expires_at = Some(Duration::from_secs(now - 3600)))))),
        ("token_not_yet_valid", bearer(&sign_es(&k, claims("a").invalid_before(Duration::from_secs(now + 3600))))),
        ("token_audience_not_allowed", bearer(&sign_es(&k, claims("a").with_audience("other")))),
        ("token_issuer_not_allowed", bearer(&sign_es(&k, claims("a").with_issuer("https://evil.test")))),
        ("token_signature_invalid", bearer(&other.sign(claims("a")).unwrap())),
        ("token_algorithm_not_allowed", bearer(&none_token)),
        ("token_malformed", bearer("not.a.jwt")),
        ("header_malformed", b"Bearer \xff\xfe".to_vec()),
        ("header_malformed", b"Basic abc".to_vec()),
        ("api_key_unknown", Vec::new()),
    ];
    for (i, (want, value)) in cases.into_iter().enumerate() {
        let headers = match (want, i) {
            ("credential_missing", _) => req("/", &[]),
            ("api_key_unknown", _) => req("/", &[("x-api-key", b"wrong")]),
            _ => req("/", &[("authorization", &value)]),
        };
        let out = done(&mut w, headers, &mut h);
        let (status, body) = reply_reason(&out);
        assert_eq!(body["reason"], json!(want), "case {i}");
        assert_eq!(status, if want == "header_malformed" { 400 } else { 401 }, "case {i}");
        assert!(out.metrics.contains(&format!("warden.identity_failures.{want}")));
    }
}

#[test]
fn a_token_without_a_subject_never_binds_a_session_to_the_empty_subject() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let mut h = live_host();
    let no_sub = Claims::with_custom_claims(json!({"client_id": "svc-batch"}), Duration::from_mins(10)).with_issuer(ISS).with_audience("svc");
    let out = done(&mut w, req("/", &[("authorization", &bearer(&sign_es(&k, no_sub.clone())))]), &mut h);
    assert_eq!((reply_reason(&out).0, reply_reason(&out).1["reason"].clone()), (401, json!("token_subject_missing")));
    let empty = sign_es(&k, claims(""));
    assert_eq!(reply_reason(&done(&mut w, req("/", &[("authorization", &bearer(&empty))]), &mut h)).1["reason"], json!("token_subject_missing"));
    // A claim that could not travel as a header value is refused with a reason, not a 5xx.
    for bad in ["agent\r\nx-injected: 1", "agent\u{0}", "agent\n"] {
        let t = sign_es(&k, claims(bad));
        let (status, body) = reply_reason(&done(&mut w, req("/", &[("authorization", &bearer(&t))]), &mut h));
        assert_eq!((status, body["reason"].clone()), (401, json!("token_subject_invalid")), "{bad:?}");
    }
    // A configured claim names OAuth clients that carry no `sub`.
    let mut cfg: serde_json::Value = serde_json::from_slice(&config(&k, json!({}))).unwrap();
    cfg["identity"]["jwt"]["providers"][0]["subject_claims"] = json!(["sub", "azp", "client_id"]);
    let mut w = Warden::from_json(&serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = done(&mut w, req("/", &[("authorization", &bearer(&sign_es(&k, no_sub)))]), &mut h);
    assert!(out.reply.is_none());
    assert_eq!(header(&out.set_headers, "x-warden-subject"), Some("svc-batch"));
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    // A provider that only allows RS256/ES256 must not accept HS256 at all, whatever the secret.
    let k = keys();
    let mut cfg: serde_json::Value = serde_json::from_slice(&config(&k, json!({}))).unwrap();
    cfg["identity"]["jwt"]["providers"][0]["algorithms"] = json!(["ES256"]);
    let mut w = Warden::from_json(&serde_json::to_vec(&cfg).unwrap()).unwrap();
    let pk = k.es.public_key().to_bytes();
    let forged = HS256Key::from_bytes(&pk).authenticate(claims("a")).unwrap();
    let out = done(&mut w, req("/", &[("authorization", &bearer(&forged))]), &mut live_host());
    assert_eq!(reply_reason(&out).1["reason"], json!("token_algorithm_not_allowed"));
}

#[test]
fn hs256_with_an_oct_key_works_when_allowed() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let t = k.hs.authenticate(claims("hs-user")).unwrap();
    let out = done(&mut w, req("/echo-subject", &[("authorization", &bearer(&t))]), &mut live_host());
    assert!(out.reply.is_none(), "{:?}", out.reply);
    assert_eq!(header(&out.set_headers, "x-warden-subject"), Some("hs-user"));
}

#[test]
fn policy_actions_are_enforced() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let t = bearer(&sign_es(&k, claims("a")));
    let mut h = live_host();

    let out = done(&mut w, req("/admin/x", &[("authorization", &t)]), &mut h);
    let (status, body) = reply_reason(&out);
    assert_eq!((status, body["reasons"].clone(), body["action"].clone()), (403, json!(["path_forbidden"]), json!("deny")));
    assert!(body["decision_id"].as_str().unwrap().starts_with("dec_"));

    let out = done(&mut w, req("/secrets", &[("authorization", &t)]), &mut h);
    let r = out.reply.as_ref().unwrap();
    assert_eq!(r.status, 401);
    let www = header(&r.headers, "www-authenticate").unwrap();
    assert!(www.contains("error=\"insufficient_user_authentication\"") && www.contains("acr_values=\"phr\""), "{www}");

    let out = done(&mut w, req("/busy", &[("authorization", &t)]), &mut h);
    let r = out.reply.as_ref().unwrap();
    assert_eq!((r.status, header(&r.headers, "retry-after")), (429, Some("9")));
    assert!(out.metrics.contains(&"warden.decisions.throttle".to_string()));
}

#[test]
fn terminate_revokes_the_session() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let t = bearer(&sign_es(&k, claims("a")));
    let mut h = live_host();
    let sid: &[u8] = b"wf-1";
    assert!(done(&mut w, req("/ok", &[("authorization", &t), ("x-session-id", sid)]), &mut h).reply.is_none());
    let out = done(&mut w, req("/kill", &[("authorization", &t), ("x-session-id", sid)]), &mut h);
    assert_eq!(reply_reason(&out).1["error"], json!("session_terminated"));
    let out = done(&mut w, req("/ok", &[("authorization", &t), ("x-session-id", sid)]), &mut h);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["session_revoked"]));
}

#[test]
fn another_subject_cannot_take_over_a_session() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let mut h = live_host();
    let sid: &[u8] = b"wf-2";
    let a = bearer(&sign_es(&k, claims("alice")));
    let m = bearer(&sign_es(&k, claims("mallory")));
    assert!(done(&mut w, req("/", &[("authorization", &a), ("x-session-id", sid)]), &mut h).reply.is_none());
    let out = done(&mut w, req("/", &[("authorization", &m), ("x-session-id", sid)]), &mut h);
    let (status, body) = reply_reason(&out);
    assert_eq!((status, body["reasons"].clone()), (403, json!(["session_bound_to_other_subject"])));
    // Rotation by the same subject is fine.
    let a2 = bearer(&k.hs.authenticate(claims("alice")).unwrap());
    let out = done(&mut w, req("/", &[("authorization", &a2), ("x-session-id", sid)]), &mut h);
    assert!(out.reply.is_none());
    assert_eq!(header(&out.set_headers, "x-warden-step"), Some("2"));
}

#[test]
fn session_from_claim_and_malformed_session_ids() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let mut h = live_host();
    let mut c = claims("a");
    c.custom = json!({"sid": "from-claim"});
    let t = bearer(&sign_es(&k, c));
    let out = done(&mut w, req("/", &[("authorization", &t)]), &mut h);
    assert_eq!(header(&out.set_headers, "x-warden-session"), Some("from-claim"));
    let out = done(&mut w, req("/", &[("authorization", &t), ("x-session-id", b"bad id")]), &mut h);
    assert_eq!(reply_reason(&out).0, 400);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["session_id_malformed"]));
    // Two values for the session, in one header sent twice or in two session headers: the
    // upstream could act on the one the policy did not see.
    for extra in [
        vec![("x-session-id", &b"s-1"[..]), ("x-session-id", &b"s-2"[..])],
        vec![("mcp-session-id", &b"s-1"[..]), ("x-session-id", &b"s-2"[..])],
    ] {
        let mut hs = vec![("authorization", &t[..])];
        hs.extend(extra);
        let out = done(&mut w, req("/", &hs), &mut h);
        assert_eq!(reply_reason(&out).0, 400);
        assert_eq!(reply_reason(&out).1["reasons"], json!(["session_id_ambiguous"]));
    }
    // The same value repeated is not ambiguous.
    let out = done(&mut w, req("/", &[("authorization", &t), ("x-session-id", b"s-1"), ("mcp-session-id", b"s-1")]), &mut h);
    assert_eq!(header(&out.set_headers, "x-warden-session"), Some("s-1"));
}

#[test]
fn region_and_device_are_believed_only_from_trusted_sources_and_bounded() {
    let k = keys();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let mut w = with_state(&k, "sync");
    let headers = |region: &[u8]| req("/", &[("authorization", &t), ("x-client-region", region), ("x-device-id", b"host-1")]);
    let mut trusted = live_host();
    let (_, begin) = call(&mut w, headers(b"eu"), &mut trusted);
    assert_eq!((begin.region.as_deref(), begin.device.as_deref()), (Some("eu"), Some("host-1")));
    // A client that is not a configured source cannot steer drift detection: ignored.
    let mut client = FakeHost::at(trusted.now_ms).with_property("source.address", "203.0.113.7:4444");
    let (_, begin) = call(&mut w, headers(b"eu"), &mut client);
    assert_eq!((begin.region, begin.device), (None, None));
    // A trusted source's value must be short and printable.
    for bad in [b"x".repeat(129), b"eu\x01".to_vec(), Vec::new()] {
        let out = done(&mut w, headers(&bad), &mut trusted);
        assert_eq!((reply_reason(&out).0, reply_reason(&out).1["reasons"].clone()), (400, json!(["context_header_invalid"])));
    }
    let out = done(&mut w, req("/", &[("authorization", &t), ("x-client-region", b"eu"), ("x-client-region", b"us")]), &mut trusted);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["context_header_invalid"]), "two regions at once");
}

#[test]
fn delegation_chain_is_kept_in_order() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let mut c = claims("user-1");
    c.custom = json!({"act": {"sub": "agent-a", "act": {"sub": "orchestrator"}}});
    let out = done(&mut w, req("/delegation", &[("authorization", &bearer(&sign_es(&k, c)))]), &mut live_host());
    assert_eq!(header(&out.set_headers, "x-delegation"), Some("agent-a,orchestrator"));
}

#[test]
fn api_key_and_spiffe_identities() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let out = done(&mut w, req("/echo-subject", &[("x-api-key", b"key-123")]), &mut live_host());
    assert_eq!(header(&out.set_headers, "x-warden-subject"), Some("svc-batch"));

    let mut h = live_host().with_property("connection.uri_san_peer_certificate", "spiffe://example.org/ns/a/sa/b");
    let out = done(&mut w, req("/echo-subject", &[]), &mut h);
    assert!(out.reply.is_none(), "{:?}", out.reply);
    assert_eq!(header(&out.set_headers, "x-warden-subject"), Some("spiffe://example.org/ns/a/sa/b"));

    let mut h = live_host().with_property("connection.uri_san_peer_certificate", "spiffe://evil.org/x");
    let out = done(&mut w, req("/", &[]), &mut h);
    assert_eq!(reply_reason(&out).1["reason"], json!("spiffe_id_not_trusted"));

    // XFCC only counts from a trusted hop.
    let xfcc: &[u8] = b"By=spiffe://example.org/gw;URI=spiffe://example.org/ns/x/sa/y";
    let out = done(&mut w, req("/", &[("x-forwarded-client-cert", xfcc)]), &mut live_host());
    assert_eq!(reply_reason(&out).1["reason"], json!("credential_missing"));
    let mut h = live_host().with_property("source.address", "10.0.0.9:4444");
    let out = done(&mut w, req("/echo-subject", &[("x-forwarded-client-cert", xfcc)]), &mut h);
    assert_eq!(header(&out.set_headers, "x-warden-subject"), Some("spiffe://example.org/ns/x/sa/y"));
}

#[test]
fn shadow_mode_never_blocks_but_counts() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({"mode": "shadow"}))).unwrap();
    let t = bearer(&sign_es(&k, claims("a")));
    let out = done(&mut w, req("/admin", &[("authorization", &t)]), &mut live_host());
    assert!(out.reply.is_none());
    assert!(out.metrics.contains(&"warden.shadow.deny".to_string()));
    assert_eq!(out.decision.unwrap().action, Action::Deny);
    let out = done(&mut w, req("/admin", &[]), &mut live_host());
    assert!(out.reply.is_none());
    assert!(out.metrics.contains(&"warden.shadow.unauthenticated".to_string()));
}

#[test]
fn policy_errors_fail_closed_unless_configured() {
    let k = keys();
    let broken = json!({"policy": {"modules": {"p.rego": "package warden.session\nimport rego.v1\ndecision := {\"action\": \"maybe\"}"}}});
    let mut w = Warden::from_json(&config(&k, broken.clone())).unwrap();
    let t = bearer(&sign_es(&k, claims("a")));
    let out = done(&mut w, req("/", &[("authorization", &t)]), &mut live_host());
    assert_eq!(reply_reason(&out).1["reasons"], json!(["policy_error"]));
    assert!(out.metrics.contains(&"warden.policy_errors".to_string()));

    let mut open = broken;
    open["policy"]["on_error"] = json!("allow");
    let mut w = Warden::from_json(&config(&k, open)).unwrap();
    let out = done(&mut w, req("/", &[("authorization", &t)]), &mut live_host());
    assert!(out.reply.is_none());
}

#[test]
fn bad_configs_are_rejected_with_the_field() {
    let k = keys();
    let e = Warden::from_json(&config(&k, json!({"policy": {"modules": {"p.rego": "package x\nnot rego at all {"}}}))).err().unwrap();
    assert_eq!(e.field, "policy");
    assert!(e.message.contains("p.rego"), "{e}");
    let mut bad: serde_json::Value = serde_json::from_slice(&config(&k, json!({}))).unwrap();
    bad["identity"]["jwt"]["providers"][0]["jwks"] = json!({"keys": [{"kty": "RSA", "n": "x"}]});
    let e = Warden::from_json(&serde_json::to_vec(&bad).unwrap()).err().unwrap();
    assert_eq!(e.field, "identity.jwt.providers[0].jwks");
}

#[test]
fn jwks_fetch_installs_keys_and_keeps_old_ones_on_garbage() {
    let k = keys();
    let mut cfg: serde_json::Value = serde_json::from_slice(&config(&k, json!({}))).unwrap();
    let provider = &mut cfg["identity"]["jwt"]["providers"][0];
    let jwks = provider["jwks"].take();
    provider.as_object_mut().unwrap().remove("jwks");
    provider["jwks_uri"] = json!({"cluster": "idp", "path": "/jwks.json"});
    let mut w = Warden::from_json(&serde_json::to_vec(&cfg).unwrap()).unwrap();
    assert_eq!(w.jwks_targets().len(), 1);
    let t = bearer(&sign_es(&k, claims("a")));
    let out = done(&mut w, req("/", &[("authorization", &t)]), &mut live_host());
    assert_eq!(reply_reason(&out).1["reason"], json!("token_keys_unavailable"));
    assert_eq!(w.install_jwks(0, jwks.to_string().as_bytes()), Ok(2));
    assert!(done(&mut w, req("/", &[("authorization", &t)]), &mut live_host()).reply.is_none());
    assert!(w.install_jwks(0, b"<html>").is_err());
    assert!(done(&mut w, req("/", &[("authorization", &t)]), &mut live_host()).reply.is_none());
}

#[test]
fn no_input_makes_it_panic() {
    // Arbitrary bytes in every header the filter reads: always an outcome, never a panic.
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let mut h = live_host();
    let samples: [&[u8]; 8] = [b"", b"\xff", b"Bearer ", b"Bearer a.b.c", b"Bearer ..", b"Bearer \xc3\x28", &[0u8; 3], b"Bearer e30.e30.e30"];
    for name in ["authorization", "x-api-key", "x-session-id", "mcp-session-id", "traceparent", "x-forwarded-client-cert", "x-client-region"] {
        for s in samples {
            let _ = done(&mut w, req("/", &[(name, s)]), &mut h);
        }
    }
}

/// A request through sync mode, the service answering like the real one would (counting steps
/// per session in `steps`): records exist only when there is a service to send them to.
fn through_service(w: &mut Warden, headers: Headers, body: Body<'_>, host: &mut FakeHost, steps: &mut std::collections::HashMap<String, u64>) -> RequestOutcome {
    match w.on_request(headers, body, host) {
        Step::Done(out) => out,
        Step::Call { pending, call } => {
            let begin: BeginStep = serde_json::from_slice(&call.body).unwrap();
            let n = steps.entry(begin.session_id).or_insert(0);
            *n += 1;
            w.resume(pending, Ok(answer(*n, *n == 1, &begin.subject)), host)
        }
    }
}

fn with_state_config(k: &Keys, extra: serde_json::Value) -> Warden {
    let mut cfg: serde_json::Value = serde_json::from_slice(&config(k, extra)).unwrap();
    cfg["state"] = json!({"cluster": "warden-state", "mode": "sync", "token": "proxy-token-0123456789"});
    Warden::from_json(&serde_json::to_vec(&cfg).unwrap()).unwrap()
}

fn with_state(k: &Keys, mode: &str) -> Warden {
    let state = json!({"state": {"cluster": "warden-state", "mode": mode, "token": "proxy-token-0123456789"}});
    Warden::from_json(&config(k, state)).unwrap()
}

fn call(w: &mut Warden, headers: Headers, host: &mut FakeHost) -> (Box<Pending>, BeginStep) {
    match w.on_request(headers, Body::Absent, host) {
        Step::Call { pending, call } => {
            assert_eq!(call.path, "/v1/steps/begin");
            (pending, serde_json::from_slice(&call.body).unwrap())
        }
        Step::Done(out) => panic!("expected a state-service call, got {:?}", out.reply),
    }
}

fn answer(step: u64, new: bool, subject: &str) -> BeginResponse {
    let session = SessionState { subject: subject.into(), steps: step - 1, subjects: vec![subject.into()], ..Default::default() };
    BeginResponse { outcome: BeginOutcome::Ok, step, new, session }
}

#[test]
fn sync_mode_asks_the_service_and_stamps_its_step() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let (pending, begin) = call(&mut w, req("/tickets", &[("authorization", &t), ("x-session-id", b"wf-9"), ("x-client-region", b"eu")]), &mut h);
    assert_eq!((begin.session_id.as_str(), begin.subject.as_str(), begin.region.as_deref()), ("wf-9", "agent-7", Some("eu")));
    assert!(begin.credential.unwrap().starts_with("sha256:"));
    let out = w.resume(pending, Ok(answer(7, false, "agent-7")), &mut h);
    assert!(out.reply.is_none());
    assert_eq!(header(&out.set_headers, "x-warden-step"), Some("7"));
    let rec = out.record.unwrap();
    assert_eq!((rec.step, rec.action.as_str(), rec.subject.as_str(), rec.enforced), (7, "allow", "agent-7", true));
    assert_eq!(rec.path.as_deref(), Some("/tickets"));
    assert!(!rec.degraded);

    // The service says the session belongs to someone else.
    let (pending, _) = call(&mut w, req("/", &[("authorization", &t), ("x-session-id", b"wf-10")]), &mut h);
    let refused = BeginResponse { outcome: BeginOutcome::SubjectMismatch, step: 0, new: false, session: SessionState::default() };
    let out = w.resume(pending, Ok(refused), &mut h);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["session_bound_to_other_subject"]));
    assert!(out.record.is_none(), "an intruder's attempt is an audit event at the service, not a step");
}

#[test]
fn unavailable_state_reaches_the_policy_and_steps_continue_locally() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let (pending, _) = call(&mut w, req("/", &[("authorization", &t), ("x-session-id", b"wf-11")]), &mut h);
    w.resume(pending, Ok(answer(3, false, "agent-7")), &mut h);
    let (pending, _) = call(&mut w, req("/", &[("authorization", &t), ("x-session-id", b"wf-11")]), &mut h);
    let out = w.resume(pending, Err("timeout".into()), &mut h);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["state_unavailable"]));
    assert!(out.metrics.contains(&"warden.state.unavailable".to_string()));
    let rec = out.record.unwrap();
    assert!(rec.degraded);
    assert_eq!(rec.step, 4, "degraded steps continue from the last known count");
}

#[test]
fn cached_mode_counts_in_shared_data_and_applies_revocations() {
    let k = keys();
    let mut w = with_state(&k, "cached");
    let mut h = live_host();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let headers = || req("/", &[("authorization", &t), ("x-session-id", b"wf-12")]);
    let (pending, _) = call(&mut w, headers(), &mut h);
    w.resume(pending, Ok(answer(1, true, "agent-7")), &mut h);
    // A second VM of the same proxy shares the snapshot.
    let mut other = with_state(&k, "cached");
    let out = done(&mut other, headers(), &mut h);
    assert_eq!(header(&out.set_headers, "x-warden-step"), Some("2"));
    let out = done(&mut w, headers(), &mut h);
    assert_eq!(header(&out.set_headers, "x-warden-step"), Some("3"));
    let m = bearer(&sign_es(&k, claims("mallory")));
    let out = done(&mut w, req("/", &[("authorization", &m), ("x-session-id", b"wf-12")]), &mut h);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["session_bound_to_other_subject"]));
    other.apply_revocation("wf-12", &mut h);
    let out = done(&mut w, headers(), &mut h);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["session_revoked"]));
}

fn post(path: &str, extra: &[(&str, &[u8])]) -> Headers {
    let mut v: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), b"POST".to_vec()),
        (":path".into(), path.as_bytes().to_vec()),
        (":authority".into(), b"api.test".to_vec()),
    ];
    for (k, val) in extra {
        v.push((k.to_string(), val.to_vec()));
    }
    Headers::from_pairs(v)
}

fn mcp_done(w: &mut Warden, headers: Headers, body: Body<'_>, host: &mut FakeHost) -> RequestOutcome {
    match w.on_request(headers, body, host) {
        Step::Done(out) => out,
        Step::Call { .. } => panic!("expected a decision"),
    }
}

#[test]
fn mcp_tool_calls_reach_the_policy_and_refusals_are_jsonrpc_errors() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let mut h = live_host();
    let mut steps = Default::default();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let headers = || post("/mcp", &[("authorization", &t), ("mcp-session-id", b"mcp-1")]);
    assert!(w.wants_body(&headers()));
    assert!(!w.wants_body(&req("/mcp", &[])), "GET streams are not read");
    let ok = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"q":"x"}}}"#;
    let out = through_service(&mut w, headers(), Body::Complete(ok), &mut h, &mut steps);
    assert!(out.reply.is_none());
    let rec = out.record.unwrap();
    assert_eq!((rec.tool.as_deref(), rec.mcp_method.as_deref()), (Some("search"), Some("tools/call")));
    assert!(rec.arguments_digest.unwrap().starts_with("sha256:"));

    let bad = br#"{"jsonrpc":"2.0","id":"c-9","method":"tools/call","params":{"name":"shell.exec"}}"#;
    let out = through_service(&mut w, headers(), Body::Complete(bad), &mut h, &mut steps);
    let r = out.reply.unwrap();
    assert_eq!(r.status, 403);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["id"], json!("c-9"));
    assert_eq!(body["error"]["code"], json!(-32001));
    assert_eq!(body["error"]["data"]["reasons"], json!(["tool_forbidden"]));

    let out = through_service(&mut w, headers(), Body::Complete(b"{nope"), &mut h, &mut steps);
    assert_eq!(reply_reason(&out), (400, reply_reason(&out).1.clone()));
    assert_eq!(reply_reason(&out).1["reasons"], json!(["mcp_body_not_json"]));
    let out = through_service(&mut w, headers(), Body::TooLarge, &mut h, &mut steps);
    assert_eq!(reply_reason(&out).0, 413);
}

#[test]
fn an_mcp_initialize_is_adopted_under_the_servers_session_id() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let init = br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#;
    let mut out = mcp_done(&mut w, post("/mcp", &[("authorization", &t)]), Body::Complete(init), &mut h);
    assert!(out.adopt_session);
    let minted = out.session_id.clone().unwrap();
    assert!(w.adopt_session(&minted, "server-sess-1", out.record.as_mut(), &mut h));
    assert_eq!(out.record.unwrap().session_id, "server-sess-1");
    // The next step of that session tells the service one step was already taken.
    let (_, begin) = call(&mut w, post("/mcp", &[("authorization", &t), ("mcp-session-id", b"server-sess-1")]), &mut h);
    assert_eq!(begin.known_steps, Some(1));
}

#[test]
fn risk_flags_and_step_ups_carry_to_the_next_step() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let mut h = live_host();
    let mut steps = Default::default();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let sid: &[u8] = b"carry-1";
    let first = through_service(&mut w, req("/risky", &[("authorization", &t), ("x-session-id", sid)]), Body::Absent, &mut h, &mut steps);
    assert_eq!(first.record.as_ref().unwrap().risk, 10.0);
    let second = through_service(&mut w, req("/risky", &[("authorization", &t), ("x-session-id", sid)]), Body::Absent, &mut h, &mut steps);
    let rec = second.record.unwrap();
    assert_eq!((rec.risk_before, rec.risk), (10.0, 20.0));
    assert_eq!(rec.flags, vec!["risky"]);
    let out = through_service(&mut w, req("/strong", &[("authorization", &t), ("x-session-id", sid)]), Body::Absent, &mut h, &mut steps);
    assert!(out.record.unwrap().step_up);
    let out = through_service(&mut w, req("/check-step-up", &[("authorization", &t), ("x-session-id", sid)]), Body::Absent, &mut h, &mut steps);
    assert_eq!(header(&out.set_headers, "x-last-step-up"), Some((h.now_ms / 1000).to_string().as_str()));
}

#[test]
fn a_candidate_policy_is_evaluated_beside_and_disagreements_are_recorded() {
    let k = keys();
    let candidate = json!({"policy": {"modules": {"session.rego": POLICY}, "candidate": {"modules": {"c.rego":
        "package warden.session\nimport rego.v1\ndefault decision := {\"action\": \"allow\"}\ndecision := {\"action\": \"deny\", \"reasons\": [\"candidate_says_no\"]} if input.request.path == \"/tickets\""}}}});
    let mut w = with_state_config(&k, candidate);
    assert!(w.candidate_version().is_some());
    let t = bearer(&sign_es(&k, claims("a")));
    let mut steps = Default::default();
    let out = through_service(&mut w, req("/tickets", &[("authorization", &t)]), Body::Absent, &mut live_host(), &mut steps);
    assert!(out.reply.is_none(), "the candidate never acts");
    let c = out.record.unwrap().candidate.unwrap();
    assert_eq!((c.action.as_str(), c.disagrees, c.reasons), ("deny", true, vec!["candidate_says_no".to_string()]));
    assert!(out.metrics.contains(&"warden.candidate.disagreements".to_string()));
    let out = through_service(&mut w, req("/other", &[("authorization", &t)]), Body::Absent, &mut live_host(), &mut steps);
    assert!(!out.record.unwrap().candidate.unwrap().disagrees);
}

#[test]
fn the_recorded_input_reproduces_the_decision() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let t = bearer(&sign_es(&k, claims("a")));
    let mut steps = Default::default();
    for path in ["/admin/x", "/secrets", "/busy", "/ok"] {
        let out = through_service(&mut w, req(path, &[("authorization", &t)]), Body::Absent, &mut live_host(), &mut steps);
        let rec = out.record.unwrap();
        let input = rec.input.as_ref().expect("the input is recorded").to_json().unwrap();
        assert!(!input.to_string().contains(&String::from_utf8_lossy(&t)[7..]), "the token itself is never recorded");
        let mut p = Policy::compile(&PolicySource { modules: vec![("session.rego", POLICY)], data: None, entrypoint: "data.warden.session.decision", max_instructions: 100_000 }).unwrap();
        let again = decision::parse_output(&p.eval(regorus::Value::from(input)).unwrap()).unwrap();
        assert_eq!(again.action.as_str(), rec.action, "{path}");
        assert_eq!(again.reasons, rec.reasons, "{path}");
    }
}

#[test]
fn without_a_state_service_no_record_is_built() {
    let k = keys();
    let mut w = Warden::from_json(&config(&k, json!({}))).unwrap();
    let out = done(&mut w, req("/ok", &[("authorization", &bearer(&sign_es(&k, claims("a"))))]), &mut live_host());
    assert!(out.reply.is_none() && out.record.is_none());
}

#[test]
fn recorded_input_is_carried_as_recorded() {
    let rec = StepRecord { step: 1, input: wire::RecordedInput::new(&json!({"b": 1, "a": [true, null]})), ..Default::default() };
    assert_eq!(rec.input.as_ref().unwrap().get(), r#"{"a":[true,null],"b":1}"#);
    let text = serde_json::to_string(&rec).unwrap();
    assert!(text.contains(r#""input":{"a":[true,null],"b":1}"#), "{text}");
    let back: StepRecord = serde_json::from_str(&text).unwrap();
    assert_eq!(back, rec);
    // Through a JSON tree too (as a test client may build it).
    let via_tree: StepRecord = serde_json::from_value(serde_json::to_value(&rec).unwrap()).unwrap();
    assert_eq!(via_tree, rec);
    assert_eq!(back.input.unwrap().to_json().unwrap(), json!({"a": [true, null], "b": 1}));
}

mod binding;
mod bounds;
mod callouts;
mod mcp_modern;
mod paths;

#[test]
fn cached_steps_decide_on_the_profile_the_service_handed_out_without_another_call() {
    let k = keys();
    let mut w = with_state(&k, "cached");
    let mut h = live_host();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let headers = || req("/", &[("authorization", &t), ("x-session-id", b"wf-13")]);
    let (pending, _) = call(&mut w, headers(), &mut h);
    let mut learned = crate::profile::Profile::default();
    let seen = StepRecord { step: 1, at_ms: 1_000, region: Some("eu".into()), ..Default::default() };
    learned.observe(&seen, &SessionState::default());
    let mut a = answer(1, true, "agent-7");
    a.session.profile = Some(Box::new(learned));
    let first = w.resume(pending, Ok(a), &mut h);
    let input = |out: &RequestOutcome| out.record.as_ref().and_then(|r| r.input.as_ref()).map(|i| i.to_json().unwrap()).unwrap();
    assert_eq!(input(&first)["identity"]["profile"]["regions"]["eu"].as_f64(), Some(1.0));
    // The next step is taken on the shared snapshot (no call), and decides on the same profile.
    let out = done(&mut w, headers(), &mut h);
    assert_eq!(header(&out.set_headers, "x-warden-step"), Some("2"));
    assert_eq!(input(&out)["identity"]["profile"]["steps"].as_f64(), Some(1.0));
    // A subject the service has no profile of: null.
    let (pending, _) = call(&mut w, req("/", &[("authorization", &t), ("x-session-id", b"wf-14")]), &mut h);
    let out = w.resume(pending, Ok(answer(1, true, "agent-7")), &mut h);
    assert_eq!(input(&out)["identity"]["profile"], json!(null));
}

#[test]
fn a_cached_step_writes_its_snapshot_once_and_carries_the_responses_since_the_last() {
    let k = keys();
    let mut w = with_state(&k, "cached");
    let mut h = live_host();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let headers = || req("/", &[("authorization", &t), ("x-session-id", b"wf-15")]);
    let (pending, _) = call(&mut w, headers(), &mut h);
    w.resume(pending, Ok(answer(1, true, "agent-7")), &mut h);
    let snapshot = |h: &FakeHost| {
        let (bytes, version) = h.shared.borrow().get("session-warden.session.wf-15").cloned().unwrap();
        (serde_json::from_slice::<SessionState>(&bytes).unwrap(), version)
    };
    let input = |out: &RequestOutcome| out.record.as_ref().and_then(|r| r.input.as_ref()).map(|i| i.to_json().unwrap()).unwrap();
    let (_, v0) = snapshot(&h);
    // An ordinary step (the decision leaves nothing new): one write, the step's.
    let out = done(&mut w, headers(), &mut h);
    assert_eq!(header(&out.set_headers, "x-warden-step"), Some("2"));
    assert_eq!(snapshot(&h).1, v0 + 1);
    // Its response's bytes wait for this VM's next step of the session, which decides on them.
    w.after_response("wf-15", 5_000, &mut h);
    assert_eq!(snapshot(&h), (snapshot(&h).0, v0 + 1));
    assert_eq!(snapshot(&h).0.bytes_out, 0);
    let out = done(&mut w, headers(), &mut h);
    assert_eq!(input(&out)["session"]["bytes_out"].as_u64(), Some(5_000));
    assert_eq!(snapshot(&h), (snapshot(&h).0, v0 + 2));
    assert_eq!(snapshot(&h).0.bytes_out, 5_000);
    // Bytes of a session this VM takes no further step of are shared on the tick, for the others.
    w.after_response("wf-15", 700, &mut h);
    w.share_response_bytes(&mut h);
    assert_eq!(snapshot(&h).0.bytes_out, 5_700);
    let mut other = with_state(&k, "cached");
    let out = done(&mut other, headers(), &mut h);
    assert_eq!(input(&out)["session"]["bytes_out"].as_u64(), Some(5_700));
    // Nothing counted twice: the next step of the first VM carries nothing more.
    let out = done(&mut w, headers(), &mut h);
    assert_eq!(input(&out)["session"]["bytes_out"].as_u64(), Some(5_700));
}

/// The input the flow builds has exactly the fields `policies/input.schema.json` documents,
/// wherever the schema lists an object's properties.
fn schema_matches(input: &serde_json::Value) {
    let schema: serde_json::Value = serde_json::from_str(include_str!("../../../../policies/input.schema.json")).unwrap();
    fn walk(root: &serde_json::Value, schema: &serde_json::Value, value: &serde_json::Value, at: &str) {
        if let Some(name) = schema.get("$ref").and_then(|r| r.as_str()).and_then(|r| r.strip_prefix("#/$defs/")) {
            return walk(root, &root["$defs"][name], value, at);
        }
        if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
            for (i, v) in values.iter().enumerate() {
                walk(root, items, v, &format!("{at}[{i}]"));
            }
        }
        let (Some(props), Some(obj)) = (schema.get("properties").and_then(|p| p.as_object()), value.as_object()) else { return };
        let documented: std::collections::BTreeSet<&String> = props.keys().collect();
        let built: std::collections::BTreeSet<&String> = obj.keys().collect();
        assert_eq!(built, documented, "input{at}: built vs documented fields");
        for (k, sub) in props {
            walk(root, sub, &obj[k], &format!("{at}.{k}"));
        }
    }
    walk(&schema, &schema, input, "");
}
