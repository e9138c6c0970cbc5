//! Sender-constrained tokens: a token bound to a client certificate (RFC 8705, `cnf.x5t#S256`)
//! holds only over mTLS from that certificate; a token bound to a key (RFC 9449 DPoP,
//! `cnf.jkt`), or presented under the `DPoP` scheme, holds only with a valid proof of that key
//! made for this very request.
//!
//! What is an identity failure (401) and what is left to the policy:
//! - a DPoP proof that is present but wrong (malformed, badly signed, for another method, URL or
//!   token, too old, replayed, another key than the token's) is refused here: someone presented
//!   a proof that proves nothing, and RFC 9449 answers it with `invalid_dpop_proof`;
//! - a bound token presented without its key (no proof for a `cnf.jkt` token sent as `Bearer`,
//!   an `x5t#S256` token over plain TLS or from another certificate) is a verified token whose
//!   binding did not hold: `input.identity.binding.held = false`, and the shipped library
//!   refuses it (`token_binding_unproven`), so a deployment can roll binding out in shadow first.

use ct_codecs::{Base64UrlSafeNoPadding, Decoder, Encoder};
use jwt_simple::prelude::*;
use p256::ecdsa::signature::DigestVerifier as _;

use super::jwt::VerifiedToken;
use crate::config::DpopConfig;
use crate::error::IdentityError;
use crate::hash::{hex, sha256};
use crate::host::{Headers, Host};
use crate::path;
use crate::wire::ProofUse;

/// What a token is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingKind {
    Mtls,
    Dpop,
}

impl BindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mtls => "mtls",
            Self::Dpop => "dpop",
        }
    }
}

/// A bound token's binding, and whether it held on this request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub kind: BindingKind,
    /// The certificate's (`x5t#S256`) or the key's (`jkt`) thumbprint the token names.
    pub thumbprint: Option<String>,
    pub held: bool,
    /// The DPoP proof's one use, to be refused if seen again (this VM, the state service).
    pub proof: Option<ProofUse>,
}

/// The `DPoP` request header.
pub const DPOP_HEADER: &str = "dpop";

/// The binding of `token` on this request, or the proof's failure. `raw` is the token as sent,
/// `dpop_scheme` whether it came as `Authorization: DPoP <token>`.
pub fn check(
    cfg: &DpopConfig,
    token: &VerifiedToken,
    raw: &str,
    dpop_scheme: bool,
    headers: &Headers,
    host: &dyn Host,
    now: u64,
) -> Result<Option<Binding>, IdentityError> {
    let mtls = token.cnf_x5t.as_ref().map(|x5t| Binding {
        kind: BindingKind::Mtls,
        thumbprint: Some(x5t.clone()),
        held: peer_certificate_thumbprint(host).is_some_and(|t| t == *x5t),
        proof: None,
    });
    if !dpop_scheme && token.cnf_jkt.is_none() {
        return Ok(mtls);
    }
    if headers.is_repeated(DPOP_HEADER) {
        return Err(IdentityError::DpopProofAmbiguous);
    }
    // A token bound to both a certificate and a key holds only when both do.
    let mtls_held = mtls.as_ref().is_none_or(|b| b.held);
    let Some(proof) = headers.get(DPOP_HEADER) else {
        if dpop_scheme {
            return Err(IdentityError::DpopProofMissing);
        }
        return Ok(Some(Binding { kind: BindingKind::Dpop, thumbprint: token.cnf_jkt.clone(), held: false, proof: None }));
    };
    let proof = std::str::from_utf8(proof).map_err(|_| IdentityError::DpopProofInvalid)?;
    let verified = verify_proof(cfg, proof, headers, raw, now)?;
    // The proof is valid; it must be a proof of the key the token is bound to.
    if token.cnf_jkt.as_deref() != Some(verified.jkt.as_str()) {
        return Err(IdentityError::DpopKeyMismatch);
    }
    Ok(Some(Binding { kind: BindingKind::Dpop, thumbprint: Some(verified.jkt), held: mtls_held, proof: Some(verified.proof_use) }))
}

/// The peer certificate's SHA-256 as a `x5t#S256` value (base64url, no padding), from Envoy's
/// `connection.sha256_peer_certificate_digest` (hex); `None` without mTLS.
pub fn peer_certificate_thumbprint(host: &dyn Host) -> Option<String> {
    let hex_digest = host.property(&["connection", "sha256_peer_certificate_digest"])?;
    let bytes = from_hex(&hex_digest)?;
    if bytes.len() != 32 {
        return None;
    }
    Base64UrlSafeNoPadding::encode_to_string(&bytes).ok()
}

fn from_hex(s: &[u8]) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16);
    s.chunks(2)
        .map(|p| match p {
            [hi, lo] => Some((digit(*hi)? * 16 + digit(*lo)?) as u8),
            _ => None,
        })
        .collect()
}

struct VerifiedProof {
    jkt: String,
    proof_use: ProofUse,
}

/// Members a public JWK must not carry (private key material, symmetric keys).
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Verify a DPoP proof (RFC 9449 §4.3) for this request and this token.
fn verify_proof(cfg: &DpopConfig, proof: &str, headers: &Headers, raw_token: &str, now: u64) -> Result<VerifiedProof, IdentityError> {
    use IdentityError::*;
    if proof.len() > cfg.max_proof_bytes {
        return Err(DpopProofInvalid);
    }
    let mut parts = proof.split('.');
    let (Some(h64), Some(c64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(DpopProofInvalid);
    };
    let decode = |s: &str| Base64UrlSafeNoPadding::decode_to_vec(s, None).map_err(|_| DpopProofInvalid);
    let header: serde_json::Value = serde_json::from_slice(&decode(h64)?).map_err(|_| DpopProofInvalid)?;
    let claims: serde_json::Value = serde_json::from_slice(&decode(c64)?).map_err(|_| DpopProofInvalid)?;
    let signature = decode(s64)?;
    let (Some(header), Some(claims)) = (header.as_object(), claims.as_object()) else { return Err(DpopProofInvalid) };

    // Header: explicit type, an asymmetric algorithm we allow (never `none`, never HS*), the
    // public key itself and nothing we would have to understand (`crit`).
    let typ = header.get("typ").and_then(|v| v.as_str()).unwrap_or_default();
    if !typ.eq_ignore_ascii_case("dpop+jwt") || header.contains_key("crit") {
        return Err(DpopProofInvalid);
    }
    let alg = header.get("alg").and_then(|v| v.as_str()).unwrap_or_default();
    if !cfg.algorithms.iter().any(|a| a == alg) {
        return Err(DpopProofInvalid);
    }
    let jwk = header.get("jwk").and_then(|v| v.as_object()).ok_or(DpopProofInvalid)?;
    if PRIVATE_MEMBERS.iter().any(|m| jwk.contains_key(*m)) {
        return Err(DpopProofInvalid);
    }
    // jwt-simple imports the key strictly (the key type the algorithm needs, public members
    // only) and computes its RFC 7638 thumbprint; its token parser cannot read a proof (the
    // `jwk` header member is an object), so the signature is checked here with the same curve
    // crates jwt-simple uses.
    let jwk_text = serde_json::Value::Object(jwk.clone()).to_string();
    let signed = proof.get(..h64.len() + 1 + c64.len()).ok_or(DpopProofInvalid)?.as_bytes();
    let jkt = match alg {
        "ES256" => {
            let key = ES256PublicKey::from_jwk(&jwk_text).map_err(|_| DpopProofInvalid)?;
            let sig = p256::ecdsa::Signature::from_slice(&signature).map_err(|_| DpopProofInvalid)?;
            // SHA-256 by the hash the rest of the filter uses (as jwt-simple does), not a second one.
            key.public_key()
                .as_ref()
                .verify_digest(
                    |d: &mut hmac_sha256::Hash| {
                        d.update(signed);
                        Ok(())
                    },
                    &sig,
                )
                .map_err(|_| DpopProofInvalid)?;
            key.jwk_thumbprint()
        }
        "EdDSA" => {
            let key = Ed25519PublicKey::from_jwk(&jwk_text).map_err(|_| DpopProofInvalid)?;
            let pk = ed25519_compact::PublicKey::from_slice(&key.to_bytes()).map_err(|_| DpopProofInvalid)?;
            let sig = ed25519_compact::Signature::from_slice(&signature).map_err(|_| DpopProofInvalid)?;
            pk.verify(signed, &sig).map_err(|_| DpopProofInvalid)?;
            key.jwk_thumbprint()
        }
        _ => return Err(DpopProofInvalid),
    };

    // Claims: one use (`jti`), a time (`iat`), this request (`htm`, `htu`), this token (`ath`).
    let jti = claims.get("jti").and_then(|v| v.as_str()).filter(|j| !j.is_empty() && j.len() <= 256).ok_or(DpopProofInvalid)?;
    let iat = claims.get("iat").and_then(|v| v.as_u64()).ok_or(DpopProofInvalid)?;
    if now > iat.saturating_add(cfg.max_age_seconds) {
        return Err(DpopProofExpired);
    }
    if iat > now.saturating_add(cfg.future_skew_seconds) {
        return Err(DpopProofInFuture);
    }
    let htm = claims.get("htm").and_then(|v| v.as_str()).ok_or(DpopProofInvalid)?;
    if Some(htm) != headers.get_str(":method") {
        return Err(DpopHtmMismatch);
    }
    let htu = claims.get("htu").and_then(|v| v.as_str()).ok_or(DpopProofInvalid)?;
    let expected = request_htu(headers).ok_or(DpopHtuMismatch)?;
    if normalize_htu(htu).as_deref() != Some(expected.as_str()) {
        return Err(DpopHtuMismatch);
    }
    let ath = claims.get("ath").and_then(|v| v.as_str()).ok_or(DpopAthMismatch)?;
    let want = Base64UrlSafeNoPadding::encode_to_string(sha256(raw_token.as_bytes())).map_err(|_| DpopProofInvalid)?;
    if ath != want {
        return Err(DpopAthMismatch);
    }
    // The one use the replay caches remember: the key and the jti together (a jti is unique per
    // key, RFC 9449 §11.1), hashed so no client text reaches the store; kept until no clock
    // would accept the proof any more.
    let id = hex(&sha256(format!("{jkt}.{jti}").as_bytes()));
    let expires_at_ms = iat.saturating_add(cfg.max_age_seconds).saturating_add(1).saturating_mul(1000);
    Ok(VerifiedProof { jkt, proof_use: ProofUse { id, expires_at_ms } })
}

/// The URL this request was sent to, as a proof's `htu` must name it: Envoy's `:scheme` and
/// `:authority` and the canonical path (`path.rs`, what the policy decides on and the upstream
/// is sent), without query or fragment, normalized as `normalize_htu` does.
pub fn request_htu(headers: &Headers) -> Option<String> {
    let scheme = headers.get_str(":scheme").unwrap_or("https");
    let authority = headers.get_str(":authority")?;
    let path = headers.get_str(":path")?;
    normalize_htu(&format!("{scheme}://{authority}{path}"))
}

/// RFC 9449 §4.3 step 9: compare ignoring query and fragment, after syntax- and scheme-based
/// normalization (RFC 3986 §6.2.2, §6.2.3): scheme and host in lower case, the default port
/// dropped, the path canonical (dot segments, merged slashes, unreserved escapes decoded: the
/// filter's one path rule), an empty path as `/`. Only `http` and `https` URLs without user
/// information are accepted.
pub fn normalize_htu(url: &str) -> Option<String> {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let (scheme, rest) = url.get(..end)?.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let (authority, raw_path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || authority.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    let canonical = path::canonicalize(raw_path.as_bytes()).ok()?;
    Some(format!("{scheme}://{authority}{}", canonical.path))
}

/// Proof uses seen by this VM, until they expire: a bounded map. When it is full of unexpired
/// entries the oldest is forgotten (the state service, when configured, still remembers it).
#[derive(Debug)]
pub struct ReplayCache {
    max: usize,
    seen: std::collections::HashMap<String, u64>,
    order: std::collections::VecDeque<String>,
}

impl ReplayCache {
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), seen: Default::default(), order: Default::default() }
    }

    /// Whether this use was already seen and has not expired.
    pub fn seen(&self, p: &ProofUse, now_ms: u64) -> bool {
        self.seen.get(&p.id).is_some_and(|exp| *exp > now_ms)
    }

    /// Remember a use; false when it was already seen (a replay).
    pub fn consume(&mut self, p: &ProofUse, now_ms: u64) -> bool {
        if self.seen(p, now_ms) {
            return false;
        }
        // Expired entries go first, oldest first; then the oldest when full.
        while let Some(front) = self.order.front() {
            let expired = self.seen.get(front).is_none_or(|exp| *exp <= now_ms);
            if !(expired || self.seen.len() >= self.max) {
                break;
            }
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        if self.seen.insert(p.id.clone(), p.expires_at_ms).is_none() {
            self.order.push_back(p.id.clone());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htu_normalization() {
        let n = |s: &str| normalize_htu(s);
        assert_eq!(n("https://API.test/a/./b//c?x=1#f").as_deref(), Some("https://api.test/a/b/c"));
        assert_eq!(n("HTTPS://api.test:443").as_deref(), Some("https://api.test/"));
        assert_eq!(n("http://api.test:80/%61").as_deref(), Some("http://api.test/a"));
        assert_eq!(n("https://api.test:8443/a").as_deref(), Some("https://api.test:8443/a"));
        assert_eq!(n("https://user@api.test/a"), None);
        assert_eq!(n("ftp://api.test/a"), None);
        assert_eq!(n("/a"), None);
    }

    #[test]
    fn peer_certificate_digest_becomes_x5t() {
        use crate::host::FakeHost;
        let digest = hex(&sha256(b"cert"));
        let host = FakeHost::at(0).with_property("connection.sha256_peer_certificate_digest", &digest);
        let want = Base64UrlSafeNoPadding::encode_to_string(sha256(b"cert")).unwrap();
        assert_eq!(peer_certificate_thumbprint(&host), Some(want));
        assert_eq!(peer_certificate_thumbprint(&FakeHost::at(0)), None);
        let bad = FakeHost::at(0).with_property("connection.sha256_peer_certificate_digest", "zz");
        assert_eq!(peer_certificate_thumbprint(&bad), None);
    }

    #[test]
    fn the_replay_cache_is_bounded_and_forgets_expired_uses() {
        let mut c = ReplayCache::new(2);
        let u = |id: &str, exp: u64| ProofUse { id: id.into(), expires_at_ms: exp };
        assert!(c.consume(&u("a", 100), 0));
        assert!(!c.consume(&u("a", 100), 50));
        assert!(c.consume(&u("a", 300), 150), "expired: a new use");
        assert!(c.consume(&u("b", 300), 150));
        assert!(c.consume(&u("c", 300), 150));
        assert!(c.seen.len() <= 2);
    }
}
