//! Who is calling: a verified JWT, an API key (compared by hash), or the SPIFFE ID of the
//! mTLS peer. The peer's SPIFFE ID is also the `workload` behind any token it presents.

pub mod binding;
pub mod jwks;
pub mod jwt;
pub mod xfcc;

use std::collections::HashMap;
use std::rc::Rc;

use crate::config::{ApiKeyConfig, DpopConfig, IdentityConfig, SpiffeConfig};
use crate::error::IdentityError;
use crate::hash::{fingerprint, hex, sha256};
use crate::host::{Headers, Host};
use jwt::{JwtVerifier, VerifiedToken};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    Jwt,
    ApiKey,
    Spiffe,
    Anonymous,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::ApiKey => "api_key",
            Self::Spiffe => "spiffe",
            Self::Anonymous => "anonymous",
        }
    }
}

#[derive(Debug)]
pub struct Identity {
    pub kind: IdentityKind,
    pub subject: String,
    pub issuer: Option<String>,
    pub scopes: Vec<String>,
    pub token: Option<Rc<VerifiedToken>>,
    /// SPIFFE ID of the calling workload, when known.
    pub workload: Option<String>,
    /// Fingerprint of the credential presented (never the credential).
    pub fingerprint: Option<String>,
    pub token_cache_hit: bool,
    /// A sender-constrained token's binding (RFC 8705 mTLS, RFC 9449 DPoP) and whether it held.
    pub binding: Option<binding::Binding>,
}

struct ApiKey {
    subject: String,
    scopes: Vec<String>,
}

/// Everything needed to identify a request, built once per configuration.
pub struct Identifier {
    jwt: Option<(String, JwtVerifier)>,
    api_keys: Option<(String, HashMap<String, ApiKey>)>,
    spiffe: Option<SpiffeConfig>,
    allow_anonymous: bool,
    dpop: DpopConfig,
    /// DPoP proof uses this VM has seen (`consume_proof`).
    replays: binding::ReplayCache,
}

impl Identifier {
    pub fn new(cfg: &IdentityConfig, jwt: Option<JwtVerifier>) -> Self {
        let jwt = match (&cfg.jwt, jwt) {
            (Some(c), Some(v)) => Some((c.header.to_ascii_lowercase(), v)),
            _ => None,
        };
        Self {
            jwt,
            api_keys: cfg.api_keys.as_ref().map(api_key_table),
            spiffe: cfg.spiffe.clone(),
            allow_anonymous: cfg.allow_anonymous,
            dpop: cfg.dpop.clone(),
            replays: binding::ReplayCache::new(cfg.dpop.replay_cache_entries),
        }
    }

    /// Whether this VM has already seen a DPoP proof's use (a replay), without remembering it.
    pub fn proof_seen(&self, proof: &crate::wire::ProofUse, now_ms: u64) -> bool {
        self.replays.seen(proof, now_ms)
    }

    /// Remember a DPoP proof's use in this VM; false when it is a replay.
    pub fn consume_proof(&mut self, proof: &crate::wire::ProofUse, now_ms: u64) -> bool {
        self.replays.consume(proof, now_ms)
    }

    pub fn jwt_mut(&mut self) -> Option<&mut JwtVerifier> {
        self.jwt.as_mut().map(|(_, v)| v)
    }

    pub fn identify(&mut self, headers: &Headers, host: &dyn Host, now: u64) -> Result<Identity, IdentityError> {
        let workload = match &self.spiffe {
            Some(cfg) => peer_spiffe_id(cfg, headers, host)?,
            None => None,
        };

        if let Some((header, verifier)) = &mut self.jwt {
            if let Some(raw) = headers.get(header.as_str()) {
                let value = std::str::from_utf8(raw).map_err(|_| IdentityError::MalformedHeader)?;
                let (token, dpop_scheme) = credential(value).ok_or(IdentityError::MalformedHeader)?;
                let (tok, hit) = verifier.verify(token, now)?;
                let binding = binding::check(&self.dpop, &tok, token, dpop_scheme, headers, host, now)?;
                return Ok(Identity {
                    kind: IdentityKind::Jwt,
                    subject: tok.subject.clone(),
                    issuer: Some(tok.issuer.clone()),
                    scopes: tok.scopes.clone(),
                    fingerprint: Some(tok.fingerprint.clone()),
                    token: Some(tok),
                    workload,
                    token_cache_hit: hit,
                    binding,
                });
            }
        }

        if let Some((header, table)) = &self.api_keys {
            if let Some(raw) = headers.get(header.as_str()) {
                if raw.is_empty() || raw.iter().any(|b| !b.is_ascii_graphic()) {
                    return Err(IdentityError::MalformedHeader);
                }
                let hash = sha256(raw);
                let key = table.get(&hex(&hash)).ok_or(IdentityError::UnknownApiKey)?;
                return Ok(Identity {
                    kind: IdentityKind::ApiKey,
                    subject: key.subject.clone(),
                    issuer: None,
                    scopes: key.scopes.clone(),
                    token: None,
                    workload,
                    fingerprint: Some(fingerprint(&hash)),
                    token_cache_hit: false,
                    binding: None,
                });
            }
        }

        if let Some(id) = workload {
            return Ok(Identity {
                kind: IdentityKind::Spiffe,
                subject: id.clone(),
                issuer: None,
                scopes: Vec::new(),
                token: None,
                fingerprint: host.property(&["connection", "sha256_peer_certificate_digest"]).and_then(|d| {
                    std::str::from_utf8(&d).ok().filter(|s| !s.is_empty()).map(|s| format!("sha256:{}", s.chars().take(32).collect::<String>()))
                }),
                workload: Some(id),
                token_cache_hit: false,
                binding: None,
            });
        }

        if self.allow_anonymous {
            return Ok(Identity {
                kind: IdentityKind::Anonymous,
                subject: String::new(),
                issuer: None,
                scopes: Vec::new(),
                token: None,
                workload: None,
                fingerprint: None,
                token_cache_hit: false,
                binding: None,
            });
        }
        Err(IdentityError::MissingCredential)
    }
}

fn api_key_table(cfg: &ApiKeyConfig) -> (String, HashMap<String, ApiKey>) {
    let table = cfg
        .keys
        .iter()
        .map(|k| (k.sha256.to_ascii_lowercase(), ApiKey { subject: k.subject.clone(), scopes: k.scopes.clone() }))
        .collect();
    (cfg.header.to_ascii_lowercase(), table)
}

/// `Bearer <token>` (scheme case-insensitive, RFC 6750).
#[cfg(test)]
fn bearer(value: &str) -> Option<&str> {
    credential(value).filter(|(_, dpop)| !dpop).map(|(t, _)| t)
}

/// `Bearer <token>` (RFC 6750) or `DPoP <token>` (RFC 9449), scheme case-insensitive: the token
/// and whether it came under the `DPoP` scheme.
fn credential(value: &str) -> Option<(&str, bool)> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    if token.is_empty() || token.contains(' ') {
        return None;
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        Some((token, false))
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Some((token, true))
    } else {
        None
    }
}

/// The SPIFFE ID of the peer: from the mTLS connection Envoy terminated, or from
/// `x-forwarded-client-cert` when, and only when, the direct peer is a trusted hop.
fn peer_spiffe_id(cfg: &SpiffeConfig, headers: &Headers, host: &dyn Host) -> Result<Option<String>, IdentityError> {
    let from_conn = host
        .property(&["connection", "uri_san_peer_certificate"])
        .and_then(|v| String::from_utf8(v).ok())
        .filter(|s| s.starts_with("spiffe://"));
    let id = match from_conn {
        Some(id) => Some(id),
        None if !cfg.trusted_xfcc_hops.is_empty() => {
            let peer = host.property(&["source", "address"]).and_then(|v| String::from_utf8(v).ok());
            let trusted = peer.as_deref().and_then(direct_peer).is_some_and(|ip| cfg.trusted_xfcc_hops.iter().any(|h| h == ip));
            match (trusted, headers.get("x-forwarded-client-cert")) {
                (true, Some(raw)) => {
                    let value = std::str::from_utf8(raw).map_err(|_| IdentityError::MalformedHeader)?;
                    xfcc::last_uri(value).filter(|u| u.starts_with("spiffe://"))
                }
                _ => None,
            }
        }
        None => None,
    };
    if let Some(id) = &id {
        let domain = id.trim_start_matches("spiffe://").split('/').next().unwrap_or_default();
        if !cfg.trust_domains.is_empty() && !cfg.trust_domains.iter().any(|d| d == domain) {
            return Err(IdentityError::UntrustedSpiffeId);
        }
    }
    Ok(id)
}

/// The IP of the direct downstream peer, from Envoy's `source.address`, for trust decisions.
/// When Envoy derived that address from `X-Forwarded-For` (the connection manager without
/// `use_remote_address`, or with trusted hops), it has port 0: no TCP peer does, and an address
/// a client can write into a header is never trusted.
pub fn direct_peer(addr: &str) -> Option<&str> {
    let ip = strip_port(addr);
    let port = addr.rsplit_once(':').map(|(_, p)| p).filter(|_| ip != addr);
    match port {
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) && p.trim_start_matches('0').is_empty() => None,
        _ => Some(ip),
    }
}

/// `10.0.0.1:443` → `10.0.0.1`, `[::1]:443` → `::1`.
pub fn strip_port(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_strict() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer a b"), None);
        assert_eq!(credential("DPoP abc"), Some(("abc", true)));
        assert_eq!(credential("dpop  abc "), Some(("abc", true)));
        assert_eq!(bearer("DPoP abc"), None);
    }

    #[test]
    fn direct_peers_and_ports_in_v4_and_v6_and_never_an_address_taken_from_x_forwarded_for() {
        for (addr, peer) in [("10.0.0.9:51234", Some("10.0.0.9")), ("[::1]:443", Some("::1")), ("10.0.0.9:0", None), ("[2001:db8::9]:0", None)] {
            assert_eq!(direct_peer(addr), peer, "{addr}");
        }
        assert_eq!(strip_port("10.0.0.1:443"), "10.0.0.1");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("10.0.0.1"), "10.0.0.1");
    }
}
