//! Shared Signals in the service: a receiver of Security Event Tokens (pushed, RFC 8935, or
//! polled, RFC 8936) that revokes the governed sessions they name, and a transmitter that pushes
//! a CAEP `session-revoked` SET to configured receivers for every revocation in the store's feed
//! (admin revokes, terminate decisions, other replicas'), retried until accepted. What a SET must
//! be and whom it names is `warden_core::ssf`; this file is the I/O around it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jwt_simple::prelude::*;
use serde_json::{json, Value};
use warden_core::ssf::{self, Event, Receiver, Refused, Target};

use crate::store::{Search, Store};

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Sessions a subject or a credential has, at most this many per event.
const MAX_SESSIONS_PER_EVENT: usize = 10_000;

/// Revoke what the events name; the number of sessions revoked (newly or again).
pub async fn act(store: &dyn Store, events: &[Event]) -> Result<usize, String> {
    let mut n = 0;
    for e in events {
        let ids = match &e.target {
            Target::Session(id) => vec![id.clone()],
            Target::Subject(s) => sessions(store, Search { subject: Some(s.clone()), limit: MAX_SESSIONS_PER_EVENT, ..Default::default() }).await?,
            Target::Credential(c) => sessions(store, Search { credential: Some(c.clone()), limit: MAX_SESSIONS_PER_EVENT, ..Default::default() }).await?,
        };
        for id in ids {
            if !warden_core::session::is_valid_session_id(&id) {
                continue;
            }
            store.revoke(id, e.reason.clone(), now_ms()).await.map_err(|e| e.to_string())?;
            n += 1;
        }
    }
    Ok(n)
}

async fn sessions(store: &dyn Store, q: Search) -> Result<Vec<String>, String> {
    Ok(store.search(q).await.map_err(|e| e.to_string())?.into_iter().map(|s| s.id).collect())
}

/// RFC 8935's error body.
pub fn error_body(r: &Refused) -> Value {
    json!({"err": r.err, "description": r.description})
}

/// The receiver's polling (RFC 8936): ask the transmitter for SETs, act on them, acknowledge
/// them (or report why one was refused) in the next request.
pub async fn poll(store: Arc<dyn Store>, receiver: Arc<Receiver>, url: String, token: Option<String>, every: Duration) {
    let mut acks: Vec<String> = Vec::new();
    let mut errs = serde_json::Map::new();
    loop {
        let body = json!({"maxEvents": 100, "returnImmediately": true, "ack": acks, "setErrs": errs});
        let (u, t) = (url.clone(), token.clone());
        let answer = tokio::task::spawn_blocking(move || post_json(&u, t.as_deref(), &body)).await;
        let mut more = false;
        match answer {
            Ok(Ok(doc)) => {
                acks = Vec::new();
                errs = serde_json::Map::new();
                more = doc.get("moreAvailable").and_then(Value::as_bool).unwrap_or(false);
                for (jti, set) in doc.get("sets").and_then(Value::as_object).into_iter().flatten() {
                    let Some(set) = set.as_str() else { continue };
                    match receiver.verify(set, now_ms() / 1000) {
                        Ok((_, events)) => match act(store.as_ref(), &events).await {
                            Ok(_) => acks.push(jti.clone()),
                            // Not acknowledged: the transmitter offers it again.
                            Err(e) => log::error!("ssf poll: cannot act on SET {jti}: {e}"),
                        },
                        Err(r) => {
                            log::warn!("ssf poll: SET {jti} refused: {} ({})", r.err, r.description);
                            errs.insert(jti.clone(), error_body(&r));
                        }
                    }
                }
            }
            Ok(Err(e)) => log::warn!("ssf poll: {url}: {e}"),
            Err(e) => log::error!("ssf poll: {e}"),
        }
        if !more {
            tokio::time::sleep(every).await;
        }
    }
}

fn post_json(url: &str, token: Option<&str>, body: &Value) -> Result<Value, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(10))).build().into();
    let mut req = agent.post(url).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.send(body.to_string()).map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {}", text.chars().take(300).collect::<String>()));
    }
    serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))
}

/// A receiver the transmitter pushes to.
#[derive(Clone, Debug)]
pub struct Destination {
    pub url: String,
    pub audience: String,
    pub token: Option<String>,
}

/// The transmitter: its issuer name and signing key.
pub struct Transmitter {
    pub issuer: String,
    key: ES256KeyPair,
    pub kid: String,
}

impl Transmitter {
    /// From a PEM file (PKCS#8 or SEC1 P-256 private key, e.g. `openssl ecparam -genkey -name
    /// prime256v1 -noout | openssl pkcs8 -topk8 -nocrypt`). The key id is its JWK thumbprint.
    pub fn from_pem(issuer: &str, pem: &str) -> Result<Self, String> {
        let key = ES256KeyPair::from_pem(pem).map_err(|e| format!("the SSF signing key is not a P-256 private key in PEM: {e}"))?;
        let kid = warden_core::hash::hex(&warden_core::hash::sha256(&key.public_key().public_key().to_bytes_uncompressed()))[..16].to_string();
        let key = key.with_key_id(&kid);
        Ok(Self { issuer: issuer.to_string(), key, kid })
    }

    /// The public key receivers verify with (`GET /v1/ssf/jwks`).
    pub fn jwks(&self) -> Value {
        use ct_codecs::{Base64UrlSafeNoPadding, Encoder};
        let b = self.key.public_key().public_key().to_bytes_uncompressed();
        let enc = |s: &[u8]| Base64UrlSafeNoPadding::encode_to_string(s).unwrap_or_default();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "x": enc(&b[1..33]), "y": enc(&b[33..65]), "kid": self.kid, "alg": "ES256", "use": "sig"}]})
    }

    /// A signed `session-revoked` SET for one receiver.
    pub fn sign(&self, aud: &str, session_id: &str, subject: &str, reason: &str, at_ms: u64) -> Result<String, String> {
        let custom = ssf::session_revoked(session_id, subject, reason, at_ms);
        // Unique, not secret: the time, a counter and what the SET is about.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let jti = warden_core::hash::sha256(format!("{nanos}/{seq}/{session_id}/{aud}").as_bytes());
        let claims = JWTClaims {
            issued_at: Some(jwt_simple::prelude::Duration::from_secs(now_ms() / 1000)),
            expires_at: None,
            invalid_before: None,
            issuer: Some(self.issuer.clone()),
            subject: None,
            audiences: Some(Audiences::AsString(aud.to_string())),
            jwt_id: Some(warden_core::hash::hex(&jti[..16])),
            nonce: None,
            custom,
        };
        let opts = HeaderOptions { signature_type: Some(ssf::SET_TYP.into()), ..Default::default() };
        self.key.sign_with_options(claims, &opts).map_err(|e| e.to_string())
    }
}

/// Follow the store's revocation feed from its current end and push a SET for each revocation
/// to every destination, each retried (doubling, up to a minute) until it answers 202 or 200.
/// Revocations that came from a SET are not echoed back.
pub async fn transmit(store: Arc<dyn Store>, tx: Arc<Transmitter>, to: Vec<Destination>, poll: Duration) {
    let mut cursor = latest_cursor(store.as_ref()).await;
    let mut queue: VecDeque<(Destination, String, u32, u64)> = VecDeque::new();
    loop {
        match store.revocations(cursor, 500).await {
            Ok(feed) => {
                for r in &feed.revocations {
                    if r.reason.starts_with("ssf ") {
                        continue;
                    }
                    let subject = match store.session(r.session_id.clone()).await {
                        Ok(Some(v)) => v.state.subject,
                        _ => String::new(),
                    };
                    for d in &to {
                        match tx.sign(&d.audience, &r.session_id, &subject, &r.reason, r.at_ms) {
                            Ok(set) => queue.push_back((d.clone(), set, 0, 0)),
                            Err(e) => log::error!("ssf transmit: cannot sign: {e}"),
                        }
                    }
                }
                cursor = feed.cursor;
            }
            Err(e) => log::warn!("ssf transmit: the revocation feed: {e}"),
        }
        let now = now_ms();
        let mut later = VecDeque::new();
        while let Some((d, set, tries, due)) = queue.pop_front() {
            if due > now {
                later.push_back((d, set, tries, due));
                continue;
            }
            let (dd, s) = (d.clone(), set.clone());
            let sent = tokio::task::spawn_blocking(move || push(&dd, &s)).await.unwrap_or_else(|e| Err(e.to_string()));
            if let Err(e) = sent {
                let backoff = (1000u64 << tries.min(6)).min(60_000);
                log::warn!("ssf transmit: {} refused or unreachable ({e}); again in {} ms", d.url, backoff);
                later.push_back((d, set, tries + 1, now + backoff));
            }
        }
        queue = later;
        tokio::time::sleep(poll).await;
    }
}

async fn latest_cursor(store: &dyn Store) -> u64 {
    let mut cursor = 0;
    loop {
        match store.revocations(cursor, 5000).await {
            Ok(feed) if !feed.revocations.is_empty() => cursor = feed.cursor,
            _ => return cursor,
        }
    }
}

fn push(d: &Destination, set: &str) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(10))).build().into();
    let mut req = agent.post(&d.url).header("content-type", "application/secevent+jwt").header("accept", "application/json");
    if let Some(t) = &d.token {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.send(set).map_err(|e| e.to_string())?;
    match resp.status().as_u16() {
        200 | 202 => Ok(()),
        s => Err(format!("HTTP {s}: {}", resp.body_mut().read_to_string().unwrap_or_default().chars().take(300).collect::<String>())),
    }
}
