//! JWT verification: provider by `iss`, key by `kid`, `alg` bound to the key, time claims with
//! the provider's leeway. Verified tokens are cached by hash, because an RS256 verification
//! is expensive inside wasm (bench/README.md) and most requests repeat a token.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use ct_codecs::{Base64UrlSafeNoPadding, Decoder};
use jwt_simple::prelude::*;
use jwt_simple::JWTError;

use super::jwks::{KeySet, VerifyKey};
use crate::config::JwtProviderConfig;
use crate::error::IdentityError;
use crate::hash::{fingerprint, sha256};

/// What a verified token says, kept for as long as it stays valid.
#[derive(Debug)]
pub struct VerifiedToken {
    pub provider: String,
    pub issuer: String,
    pub subject: String,
    pub scopes: Vec<String>,
    /// All claims, converted once to a policy value.
    pub claims: regorus::Value,
    pub raw_claims: serde_json::Value,
    /// RFC 8693 `act` chain, current actor first.
    pub delegation: Vec<String>,
    pub kid: Option<String>,
    pub jti: Option<String>,
    pub iat: Option<u64>,
    pub exp: Option<u64>,
    pub nbf: Option<u64>,
    pub leeway: u64,
    pub fingerprint: String,
    /// RFC 8705 `cnf.x5t#S256`: the base64url SHA-256 of the client certificate it is bound to.
    pub cnf_x5t: Option<String>,
    /// RFC 9449 `cnf.jkt`: the RFC 7638 thumbprint of the key it is bound to.
    pub cnf_jkt: Option<String>,
    /// The parts of the policy input that are the token's alone (`input::build`), built on the
    /// first request that presents it and shared by every later one while it stays cached.
    pub input_parts: std::cell::OnceCell<crate::input::TokenParts>,
}

impl VerifiedToken {
    /// Time checks again, for a token served from the cache.
    fn still_valid(&self, now: u64) -> Result<(), IdentityError> {
        if let Some(exp) = self.exp {
            if now > exp.saturating_add(self.leeway) {
                return Err(IdentityError::Expired);
            }
        }
        if let Some(nbf) = self.nbf {
            if nbf > now.saturating_add(self.leeway) {
                return Err(IdentityError::NotYetValid);
            }
        }
        Ok(())
    }

    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.raw_claims.get(name).and_then(|v| v.as_str())
    }
}

pub struct Provider {
    pub config: JwtProviderConfig,
    pub keys: KeySet,
}

/// The JWT providers of one configuration plus the per-VM cache of verified tokens.
pub struct JwtVerifier {
    pub providers: Vec<Provider>,
    max_token_bytes: usize,
    cache: TokenCache,
}

impl JwtVerifier {
    pub fn new(providers: Vec<Provider>, cache_entries: usize) -> Self {
        let max_token_bytes = providers.iter().map(|p| p.config.max_token_bytes).max().unwrap_or(8192);
        Self { providers, max_token_bytes, cache: TokenCache::new(cache_entries) }
    }

    /// Install a freshly fetched key set. The cache is cleared: a key may have been withdrawn.
    pub fn set_keys(&mut self, provider: usize, keys: KeySet) {
        if let Some(p) = self.providers.get_mut(provider) {
            p.keys = keys;
            self.cache.clear();
        }
    }

    /// Verify `token` at unix time `now` (seconds). Returns the token and whether it came from
    /// the cache.
    pub fn verify(&mut self, token: &str, now: u64) -> Result<(Rc<VerifiedToken>, bool), IdentityError> {
        if token.len() > self.max_token_bytes {
            return Err(IdentityError::TokenTooLarge);
        }
        // Keyed by the token itself: a hit costs one map lookup, no hashing of the token.
        if let Some(hit) = self.cache.get(token) {
            hit.still_valid(now)?;
            return Ok((hit, true));
        }
        let hash = sha256(token.as_bytes());
        let verified = Rc::new(self.verify_uncached(token, &hash, now)?);
        self.cache.insert(token, verified.clone());
        Ok((verified, false))
    }

    fn verify_uncached(&self, token: &str, hash: &[u8; 32], now: u64) -> Result<VerifiedToken, IdentityError> {
        let mut parts = token.split('.');
        let (Some(_), Some(payload_b64), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(IdentityError::MalformedToken);
        };
        let payload = Base64UrlSafeNoPadding::decode_to_vec(payload_b64, None).map_err(|_| IdentityError::MalformedToken)?;
        let raw_claims: serde_json::Value = serde_json::from_slice(&payload).map_err(|_| IdentityError::MalformedToken)?;
        if !raw_claims.is_object() {
            return Err(IdentityError::MalformedToken);
        }
        let iss = raw_claims.get("iss").and_then(|v| v.as_str()).ok_or(IdentityError::UnknownIssuer)?;
        let provider = self.providers.iter().find(|p| p.config.issuer == iss).ok_or(IdentityError::UnknownIssuer)?;
        let cfg = &provider.config;
        if token.len() > cfg.max_token_bytes {
            return Err(IdentityError::TokenTooLarge);
        }

        let meta = Token::decode_metadata(token).map_err(|_| IdentityError::MalformedToken)?;
        let alg = meta.algorithm();
        if !cfg.algorithms.iter().any(|a| a == alg) {
            return Err(IdentityError::AlgorithmNotAllowed);
        }
        if provider.keys.is_empty() {
            return Err(IdentityError::KeysUnavailable);
        }
        let kid = meta.key_id();
        let options = VerificationOptions {
            time_tolerance: Some(Duration::from_secs(cfg.leeway_seconds)),
            artificial_time: Some(Duration::from_secs(now)),
            allowed_audiences: (!cfg.audiences.is_empty()).then(|| cfg.audiences.iter().cloned().collect()),
            max_token_length: Some(cfg.max_token_bytes),
            ..Default::default()
        };

        let mut last = IdentityError::UnknownKey;
        let mut claims = None;
        for jwk in provider.keys.candidates(alg, kid) {
            let result = match &jwk.key {
                VerifyKey::Rs256(k) => k.verify_token::<NoCustomClaims>(token, Some(options.clone())),
                VerifyKey::Es256(k) => k.verify_token::<NoCustomClaims>(token, Some(options.clone())),
                VerifyKey::EdDsa(k) => k.verify_token::<NoCustomClaims>(token, Some(options.clone())),
                VerifyKey::Hs256(k) => k.verify_token::<NoCustomClaims>(token, Some(options.clone())),
            };
            match result {
                Ok(c) => {
                    claims = Some(c);
                    break;
                }
                Err(e) => {
                    last = map_error(&e);
                    // Another key of the same algorithm may still match (no kid in the token).
                    if last != IdentityError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        let claims = claims.ok_or(last)?;
        if cfg.require_exp && claims.expires_at.is_none() {
            return Err(IdentityError::MissingExp);
        }

        let subject = subject_of(&raw_claims, &cfg.subject_claims)?;
        Ok(VerifiedToken {
            provider: cfg.name.clone(),
            issuer: iss.to_string(),
            subject,
            scopes: scopes(&raw_claims),
            claims: regorus::Value::from(raw_claims.clone()),
            delegation: delegation(&raw_claims),
            kid: kid.map(str::to_string),
            jti: claims.jwt_id.clone(),
            iat: claims.issued_at.map(|t| t.as_secs()),
            exp: claims.expires_at.map(|t| t.as_secs()),
            nbf: claims.invalid_before.map(|t| t.as_secs()),
            leeway: cfg.leeway_seconds,
            fingerprint: fingerprint(hash),
            cnf_x5t: cnf_member(&raw_claims, "x5t#S256"),
            cnf_jkt: cnf_member(&raw_claims, "jkt"),
            raw_claims,
            input_parts: Default::default(),
        })
    }
}

/// The subject: the first configured claim that is a non-empty string, free of control
/// characters (it is stamped upstream as `x-warden-subject` and binds sessions).
fn subject_of(claims: &serde_json::Value, names: &[String]) -> Result<String, IdentityError> {
    let subject = names
        .iter()
        .find_map(|n| claims.get(n).and_then(|v| v.as_str()).filter(|s| !s.is_empty()))
        .ok_or(IdentityError::MissingSubject)?;
    if subject.chars().any(char::is_control) {
        return Err(IdentityError::InvalidSubject);
    }
    Ok(subject.to_string())
}

fn map_error(e: &jwt_simple::Error) -> IdentityError {
    match e.downcast_ref::<JWTError>() {
        Some(JWTError::InvalidSignature) => IdentityError::BadSignature,
        Some(JWTError::TokenHasExpired) => IdentityError::Expired,
        Some(JWTError::TokenNotValidYet) => IdentityError::NotYetValid,
        Some(JWTError::ClockDrift) => IdentityError::IssuedInFuture,
        Some(JWTError::RequiredAudienceMismatch | JWTError::RequiredAudienceMissing) => IdentityError::AudienceNotAllowed,
        Some(JWTError::AlgorithmMismatch) => IdentityError::AlgorithmNotAllowed,
        Some(JWTError::KeyIdentifierMismatch) => IdentityError::UnknownKey,
        Some(JWTError::TokenTooLong) => IdentityError::TokenTooLarge,
        _ => IdentityError::MalformedToken,
    }
}

/// A confirmation member (RFC 7800 `cnf`). A `cnf` member that is present but not a non-empty
/// string still binds the token: it becomes a value no key or certificate can match, so a token
/// whose binding cannot be read is never treated as unbound.
fn cnf_member(claims: &serde_json::Value, name: &str) -> Option<String> {
    let v = claims.get("cnf")?.get(name)?;
    Some(v.as_str().filter(|s| !s.is_empty()).map(str::to_string).unwrap_or_else(|| "!unreadable".to_string()))
}

/// `scope` (space-separated, RFC 8693) or `scp` (array or string).
fn scopes(claims: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(serde_json::Value::String(s)) => out.extend(s.split_whitespace().map(str::to_string)),
            Some(serde_json::Value::Array(a)) => out.extend(a.iter().filter_map(|v| v.as_str()).map(str::to_string)),
            _ => {}
        }
    }
    out
}

/// The `act` chain, outermost (current actor) first; bounded so a hostile token cannot make
/// us walk forever.
fn delegation(claims: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = claims.get("act");
    while let Some(act) = cur {
        if out.len() >= 16 {
            break;
        }
        match act.get("sub").and_then(|s| s.as_str()) {
            Some(sub) => out.push(sub.to_string()),
            None => break,
        }
        cur = act.get("act");
    }
    out
}

/// Bounded, first-in-first-out cache of verified tokens, keyed by the token.
struct TokenCache {
    max: usize,
    map: HashMap<Rc<str>, Rc<VerifiedToken>>,
    order: VecDeque<Rc<str>>,
}

impl TokenCache {
    fn new(max: usize) -> Self {
        Self { max: max.max(1), map: HashMap::new(), order: VecDeque::new() }
    }

    fn get(&self, token: &str) -> Option<Rc<VerifiedToken>> {
        self.map.get(token).cloned()
    }

    fn insert(&mut self, token: &str, value: Rc<VerifiedToken>) {
        let key: Rc<str> = Rc::from(token);
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > self.max {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }
}
