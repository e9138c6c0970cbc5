//! Shared Signals (OpenID SSF 1.0, CAEP 1.0): Security Event Tokens (RFC 8417) that other
//! systems send when a session or a credential should no longer be trusted, and the ones the
//! warden sends when it ends a session. What a SET must be to be believed (`Receiver::verify`)
//! and which governed sessions an event names (`Target`) live here, for the state service's
//! receiver; the SET the warden transmits is built by `session_revoked`.

use jwt_simple::prelude::*;
use jwt_simple::JWTError;
use serde_json::{json, Value};

use crate::identity::jwks::{KeySet, VerifyKey};

pub const SESSION_REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
pub const CREDENTIAL_CHANGE: &str = "https://schemas.openid.net/secevent/caep/event-type/credential-change";
/// The `typ` of a SET's header (RFC 8417 2.3).
pub const SET_TYP: &str = "secevent+jwt";
/// The longest SET taken.
pub const MAX_SET_BYTES: usize = 16 * 1024;

/// Which governed sessions an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One session, by its id (an `opaque` subject identifier, or a complex subject's `session`).
    Session(String),
    /// Every session of a subject (`iss_sub`'s `sub`, `email`, or a complex subject's `user`).
    Subject(String),
    /// Every session that presented a credential (an `opaque` id of the form `sha256:…` in a
    /// `credential-change` event: the fingerprint the warden records).
    Credential(String),
}

/// One event of a SET the warden acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `session-revoked` or `credential-change`.
    pub kind: &'static str,
    pub target: Target,
    /// For the revocation's reason (and the trail): the event and who sent it.
    pub reason: String,
}

/// Why a SET is refused, with RFC 8935's error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub err: &'static str,
    pub description: String,
}

fn refused(err: &'static str, description: impl Into<String>) -> Refused {
    Refused { err, description: description.into() }
}

/// A SET receiver's trust: the transmitter's issuer and keys, the audience it must name.
pub struct Receiver {
    pub issuer: String,
    pub audience: String,
    pub keys: KeySet,
    /// How old (`iat`) a SET may be.
    pub max_age_seconds: u64,
}

impl Receiver {
    /// Verify a SET and read the events the warden acts on. Events of other types are ignored
    /// (a receiver acknowledges what it does not act on); a SET with none of ours is still valid.
    pub fn verify(&self, token: &str, now: u64) -> Result<(String, Vec<Event>), Refused> {
        if token.len() > MAX_SET_BYTES {
            return Err(refused("invalid_request", format!("the SET is longer than {MAX_SET_BYTES} bytes")));
        }
        let meta = Token::decode_metadata(token).map_err(|_| refused("invalid_request", "not a JWS compact serialization"))?;
        if meta.signature_type() != Some(SET_TYP) {
            return Err(refused("invalid_request", format!("the header's typ must be {SET_TYP}")));
        }
        let options = VerificationOptions {
            allowed_issuers: Some(std::iter::once(self.issuer.clone()).collect()),
            allowed_audiences: Some(std::iter::once(self.audience.clone()).collect()),
            artificial_time: Some(Duration::from_secs(now)),
            time_tolerance: Some(Duration::from_secs(60)),
            max_token_length: Some(MAX_SET_BYTES),
            ..Default::default()
        };
        let mut last = refused("invalid_key", "no key of the transmitter matches the SET's alg and kid");
        let mut verified = None;
        for jwk in self.keys.candidates(meta.algorithm(), meta.key_id()) {
            let result = match &jwk.key {
                VerifyKey::Rs256(k) => k.verify_token::<Value>(token, Some(options.clone())),
                VerifyKey::Es256(k) => k.verify_token::<Value>(token, Some(options.clone())),
                VerifyKey::EdDsa(k) => k.verify_token::<Value>(token, Some(options.clone())),
                // A transmitter signs; a shared secret is not a transmitter's key.
                VerifyKey::Hs256(_) => continue,
            };
            match result {
                Ok(c) => {
                    verified = Some(c);
                    break;
                }
                Err(e) => last = map_error(&e),
            }
        }
        let claims = verified.ok_or(last)?;
        let iat = claims.issued_at.ok_or_else(|| refused("invalid_request", "no iat"))?.as_secs();
        if iat.saturating_add(self.max_age_seconds) < now {
            return Err(refused("invalid_request", format!("issued {}s ago, more than the {}s taken", now - iat, self.max_age_seconds)));
        }
        let jti = claims.jwt_id.clone().ok_or_else(|| refused("invalid_request", "no jti"))?;
        let events = claims.custom.get("events").and_then(Value::as_object).ok_or_else(|| refused("invalid_request", "no events claim"))?;
        let top_sub = claims.custom.get("sub_id");
        let mut out = Vec::new();
        for (uri, body) in events {
            let kind = match uri.as_str() {
                SESSION_REVOKED => "session-revoked",
                CREDENTIAL_CHANGE => "credential-change",
                _ => continue,
            };
            let sub = body.get("subject").or(top_sub).ok_or_else(|| refused("invalid_request", format!("the {kind} event names no subject (sub_id)")))?;
            let targets = targets(kind, sub);
            if targets.is_empty() {
                return Err(refused("invalid_request", format!("the {kind} event's subject is of no format the warden knows (opaque, iss_sub, email, complex)")));
            }
            let why = body.get("reason_admin").and_then(|r| r.get("en")).and_then(Value::as_str).unwrap_or("");
            let reason = format!("ssf {kind} from {} (jti {jti}){}{why}", self.issuer, if why.is_empty() { "" } else { ": " });
            out.extend(targets.into_iter().map(|target| Event { kind, target, reason: reason.clone() }));
        }
        Ok((jti, out))
    }
}

fn map_error(e: &jwt_simple::Error) -> Refused {
    match e.downcast_ref::<JWTError>() {
        Some(JWTError::RequiredIssuerMismatch | JWTError::RequiredIssuerMissing) => refused("invalid_issuer", "the SET's iss is not the configured transmitter"),
        Some(JWTError::RequiredAudienceMismatch | JWTError::RequiredAudienceMissing) => refused("invalid_audience", "the SET's aud does not name this receiver"),
        Some(JWTError::InvalidSignature) => refused("invalid_key", "the signature does not verify with the transmitter's keys"),
        _ => refused("invalid_request", format!("the SET does not verify: {e}")),
    }
}

/// The sessions a subject identifier (RFC 9493) names.
fn targets(kind: &str, sub: &Value) -> Vec<Target> {
    let s = |k: &str| sub.get(k).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_string);
    match sub.get("format").and_then(Value::as_str) {
        Some("opaque") => match s("id") {
            Some(id) if kind == "credential-change" && id.starts_with("sha256:") => vec![Target::Credential(id)],
            Some(id) => vec![Target::Session(id)],
            None => vec![],
        },
        Some("iss_sub") => s("sub").map(Target::Subject).into_iter().collect(),
        Some("email") => s("email").map(Target::Subject).into_iter().collect(),
        Some("complex") | None => {
            let mut out = Vec::new();
            if let Some(session) = sub.get("session") {
                out.extend(targets(kind, session));
            }
            if out.is_empty() {
                if let Some(user) = sub.get("user") {
                    out.extend(targets(kind, user));
                }
            }
            out
        }
        _ => vec![],
    }
}

/// The claims (beside iss, aud, iat, jti) of the `session-revoked` SET the warden transmits when
/// it ends a session.
pub fn session_revoked(session_id: &str, subject: &str, reason: &str, at_ms: u64) -> Value {
    json!({
        "sub_id": {"format": "complex", "session": {"format": "opaque", "id": session_id}, "user": {"format": "opaque", "id": subject}},
        "events": {SESSION_REVOKED: {"event_timestamp": at_ms / 1000, "initiating_entity": "policy", "reason_admin": {"en": reason}}}
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::jwks::parse_jwks;

    const NOW: u64 = 1_800_000_000;

    fn receiver(kp: &ES256KeyPair) -> Receiver {
        use ct_codecs::{Base64UrlSafeNoPadding, Encoder};
        let (x, y) = {
            let b = kp.public_key().public_key().to_bytes_uncompressed();
            (Base64UrlSafeNoPadding::encode_to_string(&b[1..33]).unwrap(), Base64UrlSafeNoPadding::encode_to_string(&b[33..65]).unwrap())
        };
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "t1", "alg": "ES256"}]});
        let (keys, _) = parse_jwks(&jwks, &["ES256".to_string()]).unwrap();
        Receiver { issuer: "https://idp.test".into(), audience: "https://warden.test".into(), keys, max_age_seconds: 300 }
    }

    fn set(kp: &ES256KeyPair, iss: &str, aud: &str, typ: &str, events: Value, iat: u64) -> String {
        let mut custom = serde_json::Map::new();
        custom.insert("events".into(), events);
        let claims = JWTClaims {
            issued_at: Some(Duration::from_secs(iat)),
            expires_at: None,
            invalid_before: None,
            issuer: Some(iss.into()),
            subject: None,
            audiences: Some(Audiences::AsString(aud.into())),
            jwt_id: Some("set-1".into()),
            nonce: None,
            custom: Value::Object(custom),
        };
        let opts = HeaderOptions { signature_type: Some(typ.into()), ..Default::default() };
        ES256KeyPair::from_bytes(&kp.to_bytes()).unwrap().with_key_id("t1").sign_with_options(claims, &opts).unwrap()
    }

    #[test]
    fn events_name_sessions_subjects_and_credentials() {
        let kp = ES256KeyPair::generate();
        let r = receiver(&kp);
        let events = json!({
            SESSION_REVOKED: {"subject": {"format": "opaque", "id": "ses_1"}, "reason_admin": {"en": "stolen laptop"}},
            CREDENTIAL_CHANGE: {"subject": {"format": "opaque", "id": "sha256:abcd"}},
            "https://example.com/other-event": {},
        });
        let (jti, got) = r.verify(&set(&kp, "https://idp.test", "https://warden.test", SET_TYP, events, NOW), NOW).unwrap();
        assert_eq!(jti, "set-1");
        let targets: Vec<_> = got.iter().map(|e| (e.kind, e.target.clone())).collect();
        assert!(targets.contains(&("session-revoked", Target::Session("ses_1".into()))), "{targets:?}");
        assert!(targets.contains(&("credential-change", Target::Credential("sha256:abcd".into()))), "{targets:?}");
        assert_eq!(targets.len(), 2, "events of other types are acknowledged, not acted on");
        assert!(got[0].reason.contains("from https://idp.test (jti set-1)"));
        let user = json!({SESSION_REVOKED: {"subject": {"format": "complex", "user": {"format": "iss_sub", "iss": "https://idp.test", "sub": "svc-payments"}}}});
        let (_, got) = r.verify(&set(&kp, "https://idp.test", "https://warden.test", SET_TYP, user, NOW), NOW).unwrap();
        assert_eq!(got[0].target, Target::Subject("svc-payments".into()));
    }

    #[test]
    fn a_set_is_believed_only_from_its_transmitter_for_this_receiver() {
        let kp = ES256KeyPair::generate();
        let r = receiver(&kp);
        let ev = || json!({SESSION_REVOKED: {"subject": {"format": "opaque", "id": "ses_1"}}});
        let code = |t: String| r.verify(&t, NOW).unwrap_err().err;
        assert_eq!(code(set(&kp, "https://evil.test", "https://warden.test", SET_TYP, ev(), NOW)), "invalid_issuer");
        assert_eq!(code(set(&kp, "https://idp.test", "https://other.test", SET_TYP, ev(), NOW)), "invalid_audience");
        assert_eq!(code(set(&ES256KeyPair::generate(), "https://idp.test", "https://warden.test", SET_TYP, ev(), NOW)), "invalid_key");
        assert_eq!(code(set(&kp, "https://idp.test", "https://warden.test", "JWT", ev(), NOW)), "invalid_request");
        assert_eq!(code(set(&kp, "https://idp.test", "https://warden.test", SET_TYP, ev(), NOW - 3600)), "invalid_request");
        assert_eq!(code("not.a.set".into()), "invalid_request");
        let nameless = json!({SESSION_REVOKED: {"subject": {"format": "phone_number", "phone_number": "+1"}}});
        assert_eq!(code(set(&kp, "https://idp.test", "https://warden.test", SET_TYP, nameless, NOW)), "invalid_request");
    }
}
