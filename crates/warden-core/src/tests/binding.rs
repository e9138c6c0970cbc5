//! Sender-constrained tokens (RFC 8705 mTLS-bound, RFC 9449 DPoP) through the whole flow, with
//! every hostile case: proofs for another method, URL or token, stale or future proofs, replays
//! (in this VM and at the state service), a missing or doubled proof, `alg: none`, HS256, a
//! proof signed by another key than the one it carries, a proof of another key than the
//! token's, and mTLS-bound tokens over plain TLS or from another certificate.

use ct_codecs::{Base64UrlSafeNoPadding, Encoder};
use p256::ecdsa::signature::Signer as _;

use super::*;
use crate::hash::{hex, sha256};

/// Refuses a bound token whose binding did not hold (as the shipped library does) and tells
/// the test what the policy saw.
const BINDING_POLICY: &str = r#"package warden.session
import rego.v1
b := input.identity.binding
decision := {"action": "deny", "reasons": ["token_binding_unproven"]} if {
    b.kind != null
    not b.held
} else := {"action": "allow", "reasons": [], "headers": {"x-binding": sprintf("%v:%v:%v", [b.kind, b.held, b.thumbprint])}}
"#;

fn b64(bytes: &[u8]) -> String {
    Base64UrlSafeNoPadding::encode_to_string(bytes).unwrap()
}

fn binding_warden(k: &Keys, extra: serde_json::Value) -> Warden {
    let mut cfg: serde_json::Value = serde_json::from_slice(&config(k, extra)).unwrap();
    cfg["policy"] = json!({"modules": {"session.rego": BINDING_POLICY}});
    Warden::from_json(&serde_json::to_vec(&cfg).unwrap()).unwrap()
}

/// A client's DPoP key.
struct Client(ES256KeyPair);

impl Client {
    fn new() -> Self {
        Self(ES256KeyPair::generate())
    }

    fn jwk(&self) -> serde_json::Value {
        let mut j: serde_json::Value = serde_json::from_str(&self.0.public_key().to_jwk()).unwrap();
        let o = j.as_object_mut().unwrap();
        o.retain(|k, _| ["kty", "crv", "x", "y"].contains(&k.as_str()));
        j
    }

    fn jkt(&self) -> String {
        self.0.public_key().jwk_thumbprint()
    }

    /// A proof with this header and these claims, signed by `signer` (normally the same key).
    fn sign_with(&self, signer: &ES256KeyPair, header: serde_json::Value, claims: serde_json::Value) -> String {
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sk = p256::ecdsa::SigningKey::from_slice(&signer.to_bytes()).unwrap();
        let sig: p256::ecdsa::Signature = sk.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig.to_bytes()))
    }

    fn header(&self) -> serde_json::Value {
        json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk()})
    }

    fn claims(&self, method: &str, htu: &str, token: &str, now_s: u64) -> serde_json::Value {
        json!({"htm": method, "htu": htu, "iat": now_s, "jti": format!("j-{}", rand_id()), "ath": b64(&sha256(token.as_bytes()))})
    }

    fn proof(&self, method: &str, htu: &str, token: &str, now_s: u64) -> String {
        self.sign_with(&self.0, self.header(), self.claims(method, htu, token, now_s))
    }
}

fn rand_id() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn now_s(h: &FakeHost) -> u64 {
    h.now_ms / 1000
}

/// A token bound to `cnf`.
fn bound_token(k: &Keys, cnf: serde_json::Value) -> String {
    sign_es(k, with(claims("agent-7"), |c| c.custom = json!({"cnf": cnf})))
}

fn dpop_auth(t: &str) -> Vec<u8> {
    format!("DPoP {t}").into_bytes()
}

const HTU: &str = "https://api.test/tickets";

fn get(extra: &[(&str, &[u8])]) -> Headers {
    let mut v: Vec<(&str, &[u8])> = vec![(":scheme", b"https")];
    v.extend_from_slice(extra);
    req("/tickets?page=2", &v)
}

fn reason(out: &RequestOutcome) -> (u32, String) {
    let (status, body) = reply_reason(out);
    let r = body.get("reason").cloned().unwrap_or_else(|| body["reasons"][0].clone());
    (status, r.as_str().unwrap_or_default().to_string())
}

#[test]
fn a_valid_dpop_proof_holds_and_the_policy_and_the_record_see_it() {
    let k = keys();
    let client = Client::new();
    let t = bound_token(&k, json!({"jkt": client.jkt()}));
    let mut h = live_host();
    let mut w = binding_warden(&k, json!({}));
    let p = client.proof("GET", HTU, &t, now_s(&h));
    let out = done(&mut w, get(&[("authorization", &dpop_auth(&t)), ("dpop", p.as_bytes())]), &mut h);
    assert!(out.reply.is_none(), "{:?}", out.reply.as_ref().map(|r| String::from_utf8_lossy(&r.body).to_string()));
    assert_eq!(header(&out.set_headers, "x-binding"), Some(format!("dpop:true:{}", client.jkt()).as_str()));

    // Scheme and host case, the default port, the query and dot segments do not matter to htu.
    let p = client.proof("GET", "HTTPS://API.test:443/a/../tickets?x#f", &t, now_s(&h));
    let out = done(&mut w, get(&[("authorization", &dpop_auth(&t)), ("dpop", p.as_bytes())]), &mut h);
    assert!(out.reply.is_none());

    // The record carries the binding (sync mode: records exist).
    let mut w = with_state_config(&k, json!({}));
    let p = client.proof("GET", HTU, &t, now_s(&h));
    let (pending, begin) = call(&mut w, get(&[("authorization", &dpop_auth(&t)), ("dpop", p.as_bytes())]), &mut h);
    let proof = begin.proof.clone().expect("the begin-step carries the proof's use");
    assert_eq!(proof.id.len(), 64);
    assert!(proof.expires_at_ms > h.now_ms && proof.expires_at_ms <= h.now_ms + 62_000);
    let out = w.resume(pending, Ok(answer(1, true, "agent-7")), &mut h);
    let rec = out.record.expect("a record");
    assert_eq!(rec.binding, Some(crate::wire::BindingRecord { kind: "dpop".into(), held: true }));
    let input = rec.input.unwrap().to_json().unwrap();
    assert_eq!(input["identity"]["binding"], json!({"kind": "dpop", "thumbprint": client.jkt(), "held": true}));
}

#[test]
fn an_eddsa_proof_holds_too() {
    let k = keys();
    let kp = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([3u8; 32]));
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(kp.pk.as_ref())});
    let jkt = Ed25519PublicKey::from_bytes(kp.pk.as_ref()).unwrap().jwk_thumbprint();
    let t = bound_token(&k, json!({"jkt": jkt}));
    let mut h = live_host();
    let header = json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk});
    let claims = json!({"htm": "GET", "htu": HTU, "iat": now_s(&h), "jti": "ed-1", "ath": b64(&sha256(t.as_bytes()))});
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let p = format!("{input}.{}", b64(kp.sk.sign(input.as_bytes(), None).as_ref()));
    let mut w = binding_warden(&k, json!({}));
    let out = done(&mut w, get(&[("authorization", &dpop_auth(&t)), ("dpop", p.as_bytes())]), &mut h);
    assert!(out.reply.is_none(), "{:?}", reason(&out));
}

#[test]
fn hostile_dpop_proofs_are_refused_each_with_its_reason() {
    let k = keys();
    let client = Client::new();
    let other = Client::new();
    let t = bound_token(&k, json!({"jkt": client.jkt()}));
    let other_token = bound_token(&k, json!({"jkt": client.jkt(), "x": 1}));
    let mut h = live_host();
    let now = now_s(&h);
    let mut w = binding_warden(&k, json!({}));
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = client.claims("GET", HTU, &t, now);
        f(&mut c);
        c
    };
    let signed = |c: serde_json::Value| client.sign_with(&client.0, client.header(), c);
    let hs_header = json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": client.jwk()});
    let none_proof = format!("{}.{}.", b64(json!({"typ": "dpop+jwt", "alg": "none", "jwk": client.jwk()}).to_string().as_bytes()), b64(claims(&|_| {}).to_string().as_bytes()));
    let mut private_jwk = client.header();
    private_jwk["jwk"]["d"] = json!(b64(&client.0.to_bytes()));
    let cases: Vec<(&str, String, &str)> = vec![
        ("another method", signed(claims(&|c| c["htm"] = json!("POST"))), "dpop_htm_mismatch"),
        ("another URL", signed(claims(&|c| c["htu"] = json!("https://api.test/admin"))), "dpop_htu_mismatch"),
        ("another host", signed(claims(&|c| c["htu"] = json!("https://evil.test/tickets"))), "dpop_htu_mismatch"),
        ("http for https", signed(claims(&|c| c["htu"] = json!("http://api.test/tickets"))), "dpop_htu_mismatch"),
        ("another token", client.proof("GET", HTU, &other_token, now), "dpop_ath_mismatch"),
        ("no ath", signed(claims(&|c| { c.as_object_mut().unwrap().remove("ath"); })), "dpop_ath_mismatch"),
        ("expired", signed(claims(&|c| c["iat"] = json!(now - 61))), "dpop_proof_expired"),
        ("from the future", signed(claims(&|c| c["iat"] = json!(now + 30))), "dpop_proof_in_future"),
        ("no jti", signed(claims(&|c| { c.as_object_mut().unwrap().remove("jti"); })), "dpop_proof_invalid"),
        ("alg none", none_proof, "dpop_proof_invalid"),
        ("HS256", client.sign_with(&client.0, hs_header, claims(&|_| {})), "dpop_proof_invalid"),
        ("wrong typ", client.sign_with(&client.0, json!({"typ": "JWT", "alg": "ES256", "jwk": client.jwk()}), claims(&|_| {})), "dpop_proof_invalid"),
        ("signed by another key than its jwk", client.sign_with(&other.0, client.header(), claims(&|_| {})), "dpop_proof_invalid"),
        ("a private jwk", client.sign_with(&client.0, private_jwk, claims(&|_| {})), "dpop_proof_invalid"),
        ("a proof of another key than the token's", other.proof("GET", HTU, &t, now), "dpop_key_mismatch"),
        ("garbage", "a.b.c".into(), "dpop_proof_invalid"),
        ("oversized", format!("{}.x", "a".repeat(5000)), "dpop_proof_invalid"),
    ];
    for (what, proof, want) in cases {
        let out = done(&mut w, get(&[("authorization", &dpop_auth(&t)), ("dpop", proof.as_bytes())]), &mut h);
        assert_eq!(reason(&out), (401, want.to_string()), "{what}");
        let challenge = header(&out.reply.as_ref().unwrap().headers, "www-authenticate").unwrap().to_string();
        assert!(challenge.starts_with("DPoP "), "{what}: {challenge}");
    }
}

#[test]
fn a_dpop_proof_is_good_for_one_request() {
    let k = keys();
    let client = Client::new();
    let t = bound_token(&k, json!({"jkt": client.jkt()}));
    let mut h = live_host();
    let mut w = binding_warden(&k, json!({}));
    let p = client.proof("GET", HTU, &t, now_s(&h));
    let headers = || get(&[("authorization", &dpop_auth(&t)), ("dpop", p.as_bytes())]);
    assert!(done(&mut w, headers(), &mut h).reply.is_none());
    assert_eq!(reason(&done(&mut w, headers(), &mut h)), (401, "dpop_replayed".into()));
    // Another proof (another jti) of the same key for the same request is fine.
    let p2 = client.proof("GET", HTU, &t, now_s(&h));
    assert!(done(&mut w, get(&[("authorization", &dpop_auth(&t)), ("dpop", p2.as_bytes())]), &mut h).reply.is_none());
}

#[test]
fn the_state_service_refuses_a_proof_another_proxy_used_and_cached_mode_asks_it() {
    let k = keys();
    let client = Client::new();
    let t = bound_token(&k, json!({"jkt": client.jkt()}));
    let mut h = live_host();
    let p = client.proof("GET", HTU, &t, now_s(&h));
    let headers = || get(&[("authorization", &dpop_auth(&t)), ("dpop", p.as_bytes()), ("x-session-id", b"wf-dpop")]);
    // Proxy B never saw the proof; the service did (proxy A used it).
    let mut w = with_state_config(&k, json!({}));
    let (pending, begin) = call(&mut w, headers(), &mut h);
    assert!(begin.proof.is_some());
    let refused = BeginResponse { outcome: BeginOutcome::ProofReplayed, step: 0, new: false, session: SessionState::default() };
    let out = w.resume(pending, Ok(refused), &mut h);
    assert_eq!(reason(&out), (401, "dpop_replayed".into()));

    // Cached mode: a session whose snapshot is cached still asks the service for a DPoP step.
    let mut w = with_state(&k, "cached");
    let plain = bearer(&sign_es(&k, claims("agent-7")));
    let (pending, _) = call(&mut w, get(&[("authorization", &plain), ("x-session-id", b"wf-c")]), &mut h);
    assert!(w.resume(pending, Ok(answer(1, true, "agent-7")), &mut h).reply.is_none());
    assert!(matches!(w.on_request(get(&[("authorization", &plain), ("x-session-id", b"wf-c")]), Body::Absent, &mut h), Step::Done(_)), "a cached step");
    let q = client.proof("GET", HTU, &t, now_s(&h));
    let (_, begin) = call(&mut w, get(&[("authorization", &dpop_auth(&t)), ("dpop", q.as_bytes()), ("x-session-id", b"wf-c")]), &mut h);
    assert!(begin.proof.is_some());
}

#[test]
fn a_missing_or_doubled_proof() {
    let k = keys();
    let client = Client::new();
    let t = bound_token(&k, json!({"jkt": client.jkt()}));
    let mut h = live_host();
    let mut w = binding_warden(&k, json!({}));
    // The DPoP scheme without a proof: 401.
    assert_eq!(reason(&done(&mut w, get(&[("authorization", &dpop_auth(&t))]), &mut h)), (401, "dpop_proof_missing".into()));
    // A stolen key-bound token sent as a bearer token, without a proof: the binding did not hold,
    // and the policy refuses it.
    assert_eq!(reason(&done(&mut w, get(&[("authorization", &bearer(&t))]), &mut h)), (403, "token_binding_unproven".into()));
    // Two DPoP headers, even with the same value: ambiguous.
    let p = client.proof("GET", HTU, &t, now_s(&h));
    for second in [p.clone(), client.proof("GET", HTU, &t, now_s(&h))] {
        let headers = get(&[("authorization", &dpop_auth(&t)), ("dpop", p.as_bytes()), ("dpop", second.as_bytes())]);
        assert_eq!(reason(&done(&mut w, headers, &mut h)), (401, "dpop_proof_ambiguous".into()));
    }
    // A DPoP-scheme token bound to no key: the proof proves nothing about it.
    let unbound = sign_es(&k, claims("agent-7"));
    let p = client.proof("GET", HTU, &unbound, now_s(&h));
    assert_eq!(reason(&done(&mut w, get(&[("authorization", &dpop_auth(&unbound)), ("dpop", p.as_bytes())]), &mut h)), (401, "dpop_key_mismatch".into()));
    // An unbound bearer token is untouched by a stray DPoP header.
    let out = done(&mut w, get(&[("authorization", &bearer(&unbound)), ("dpop", b"junk")]), &mut h);
    assert!(out.reply.is_none());
    assert_eq!(header(&out.set_headers, "x-binding"), Some("null:false:null"));
}

#[test]
fn an_mtls_bound_token_holds_only_from_its_certificate() {
    let k = keys();
    let cert = b"the client certificate's DER";
    let t = bound_token(&k, json!({"x5t#S256": b64(&sha256(cert))}));
    let mut w = binding_warden(&k, json!({}));
    let digest = |der: &[u8]| hex(&sha256(der));
    let from = |der: Option<&[u8]>| match der {
        Some(d) => live_host().with_property("connection.sha256_peer_certificate_digest", &digest(d)),
        None => live_host(),
    };
    let out = done(&mut w, get(&[("authorization", &bearer(&t))]), &mut from(Some(cert)));
    assert!(out.reply.is_none());
    assert_eq!(header(&out.set_headers, "x-binding"), Some(format!("mtls:true:{}", b64(&sha256(cert))).as_str()));
    // Over plain TLS (no peer certificate), from another certificate: the binding does not hold.
    for der in [None, Some(&b"another certificate"[..])] {
        let out = done(&mut w, get(&[("authorization", &bearer(&t))]), &mut from(der));
        assert_eq!(reason(&out), (403, "token_binding_unproven".into()));
    }
    // An unreadable cnf member binds the token to nothing anyone can prove.
    let odd = bound_token(&k, json!({"x5t#S256": 7}));
    assert_eq!(reason(&done(&mut w, get(&[("authorization", &bearer(&odd))]), &mut from(Some(cert)))), (403, "token_binding_unproven".into()));
}

#[test]
fn a_replayed_proof_is_refused_in_the_headers_phase_of_a_body_request() {
    let k = keys();
    let client = Client::new();
    let t = bound_token(&k, json!({"jkt": client.jkt()}));
    let mut h = live_host();
    let mut w = binding_warden(&k, json!({}));
    let p = client.proof("POST", "https://api.test/mcp", &t, now_s(&h));
    let post = || {
        Headers::from_pairs(
            [(":method", "POST"), (":path", "/mcp"), (":scheme", "https"), (":authority", "api.test"), ("content-type", "application/json")]
                .iter()
                .map(|(a, b)| (a.to_string(), b.as_bytes().to_vec()))
                .chain([("authorization".to_string(), dpop_auth(&t)), ("dpop".to_string(), p.as_bytes().to_vec())]),
        )
    };
    // The headers phase checks, the body phase consumes: the first request goes through whole.
    assert!(w.on_body_request_headers(&post(), &mut h).is_ok());
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    match w.on_request(post(), Body::Complete(body), &mut h) {
        Step::Done(out) => assert!(out.reply.is_none(), "{:?}", reason(&out)),
        Step::Call { .. } => panic!("local mode"),
    }
    let Err(out) = w.on_body_request_headers(&post(), &mut h) else { panic!("a replay must be refused on headers") };
    assert_eq!(reason(&out), (401, "dpop_replayed".into()));
}
