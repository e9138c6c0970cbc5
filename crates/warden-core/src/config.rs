//! The plugin configuration: the JSON a user puts in Envoy's `configuration` (or Istio's
//! `pluginConfig`). Parsed once, in `on_configure`; every error names the field at fault.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::ConfigError;

/// Header names the filter stamps. Client copies of every one of them are removed before
/// anything else runs, so a client can never forge its identity, session binding or step.
pub const STAMPED_HEADER_PREFIX: &str = "x-warden-";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decisions are enforced.
    #[default]
    Enforce,
    /// Decisions are evaluated, counted and recorded, but never block.
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Refuse the request (fail closed). The default everywhere.
    #[default]
    Deny,
    /// Let the request through and record that it was let through.
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    #[serde(default)]
    pub mode: Mode,
    pub policy: PolicyConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub session: SessionConfig,
    #[serde(default)]
    pub context: ContextConfig,
    #[serde(default)]
    pub token_cache: TokenCacheConfig,
    /// The session-state service. Without it, session state is kept per proxy VM.
    #[serde(default)]
    pub state: Option<StateConfig>,
    #[serde(default)]
    pub mcp: McpConfig,
}

/// MCP (Streamable HTTP) awareness: which requests are read as JSON-RPC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// Path prefixes of MCP endpoints. A POST there, or any POST carrying `mcp-session-id`, is MCP.
    #[serde(default = "default_mcp_paths")]
    pub paths: Vec<String>,
    /// Larger MCP bodies get 413.
    #[serde(default = "default_mcp_max_body")]
    pub max_body_bytes: usize,
    /// Refuse MCP requests (deny, terminate, revoked or foreign session) with a JSON-RPC error
    /// body on the 403, which MCP clients surface as an ordinary error of the call.
    #[serde(default = "default_true")]
    pub jsonrpc_errors: bool,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self { paths: default_mcp_paths(), max_body_bytes: default_mcp_max_body(), jsonrpc_errors: true }
    }
}

fn default_mcp_paths() -> Vec<String> {
    vec!["/mcp".into()]
}
fn default_mcp_max_body() -> usize {
    1024 * 1024
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StateMode {
    /// One callout per request: the strongest guarantees.
    #[default]
    Sync,
    /// Session snapshots cached in the proxy's shared data; revocations polled on the tick.
    Cached,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Envoy cluster of the session-state service.
    pub cluster: String,
    /// `:authority` for callouts; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub mode: StateMode,
    /// The proxy token the service expects (never logged).
    pub token: String,
    /// Deadline of each begin-step callout.
    #[serde(default = "default_state_timeout")]
    pub timeout_ms: u64,
    /// How often queued attribution records are sent.
    #[serde(default = "default_flush_interval")]
    pub flush_interval_ms: u64,
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// A batch's body is kept under this many bytes (a record larger than it goes alone), well
    /// below the service's body limit (`wire::limits::MAX_BODY_BYTES`).
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Records kept while the service is unreachable; beyond it the oldest are dropped (and counted).
    #[serde(default = "default_queue_limit")]
    pub queue_limit: usize,
    /// How often the revocation feed is polled (cached mode).
    #[serde(default = "default_revocation_poll")]
    pub revocation_poll_ms: u64,
}

fn default_state_timeout() -> u64 {
    250
}
fn default_flush_interval() -> u64 {
    200
}
fn default_max_batch() -> usize {
    500
}
fn default_max_batch_bytes() -> usize {
    1024 * 1024
}
fn default_queue_limit() -> usize {
    50_000
}
fn default_revocation_poll() -> u64 {
    250
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Rego modules, by file name. At least one.
    pub modules: BTreeMap<String, String>,
    /// The policy's `data` document.
    #[serde(default)]
    pub data: Option<serde_json::Value>,
    /// The rule whose value is the decision, e.g. `data.warden.session.decision`.
    #[serde(default = "default_entrypoint")]
    pub entrypoint: String,
    /// Request headers copied into `input.request.headers` (lower-case names).
    #[serde(default = "default_input_headers")]
    pub input_headers: Vec<String>,
    /// What a policy runtime error (or an output of the wrong shape) does.
    #[serde(default)]
    pub on_error: FailureMode,
    /// `Retry-After` seconds for `throttle` when the policy gives none.
    #[serde(default = "default_retry_after")]
    pub default_retry_after: u32,
    /// Upper bound on RVM instructions per evaluation: a runaway policy fails (closed).
    #[serde(default = "default_max_instructions")]
    pub max_instructions: usize,
    /// A candidate (shadow) policy evaluated beside the enforced one: it never acts; when it
    /// decides differently, that is counted and recorded in the trail.
    #[serde(default)]
    pub candidate: Option<CandidatePolicy>,
    /// Record each step's exact policy input in the trail, so `warden replay` can re-run it.
    #[serde(default = "default_true")]
    pub record_input: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidatePolicy {
    pub modules: BTreeMap<String, String>,
    #[serde(default)]
    pub data: Option<serde_json::Value>,
    #[serde(default = "default_entrypoint")]
    pub entrypoint: String,
}

fn default_entrypoint() -> String {
    crate::policy::DEFAULT_ENTRYPOINT.into()
}
fn default_input_headers() -> Vec<String> {
    vec!["user-agent".into(), "content-type".into()]
}
fn default_retry_after() -> u32 {
    5
}
fn default_max_instructions() -> usize {
    crate::policy::DEFAULT_MAX_INSTRUCTIONS
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub api_keys: Option<ApiKeyConfig>,
    #[serde(default)]
    pub spiffe: Option<SpiffeConfig>,
    /// Let requests without any credential reach the policy as `identity.kind = "anonymous"`.
    /// Off by default: a request without a credential gets 401.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Sender-constrained tokens: how DPoP proofs (RFC 9449) are checked.
    #[serde(default)]
    pub dpop: DpopConfig,
}

/// DPoP proofs (RFC 9449). Always on: a token bound to a key (`cnf.jkt`) or presented under the
/// `DPoP` scheme needs a valid proof, whatever this says; this only tunes the checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpopConfig {
    /// How old a proof's `iat` may be.
    #[serde(default = "default_dpop_max_age")]
    pub max_age_seconds: u64,
    /// How far ahead of the proxy's clock a proof's `iat` may be.
    #[serde(default = "default_dpop_future")]
    pub future_skew_seconds: u64,
    /// Accepted proof algorithms (`ES256`, `EdDSA`).
    #[serde(default = "default_dpop_algorithms")]
    pub algorithms: Vec<String>,
    /// Larger proofs are refused (`dpop_proof_invalid`).
    #[serde(default = "default_dpop_max_bytes")]
    pub max_proof_bytes: usize,
    /// Proof `jti`s remembered per proxy VM (the state service remembers them for every proxy).
    #[serde(default = "default_dpop_cache")]
    pub replay_cache_entries: usize,
}

impl Default for DpopConfig {
    fn default() -> Self {
        Self {
            max_age_seconds: default_dpop_max_age(),
            future_skew_seconds: default_dpop_future(),
            algorithms: default_dpop_algorithms(),
            max_proof_bytes: default_dpop_max_bytes(),
            replay_cache_entries: default_dpop_cache(),
        }
    }
}

fn default_dpop_max_age() -> u64 {
    60
}
fn default_dpop_future() -> u64 {
    5
}
fn default_dpop_algorithms() -> Vec<String> {
    vec!["ES256".into(), "EdDSA".into()]
}
fn default_dpop_max_bytes() -> usize {
    4096
}
fn default_dpop_cache() -> usize {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Header carrying `Bearer <token>`.
    #[serde(default = "default_jwt_header")]
    pub header: String,
    pub providers: Vec<JwtProviderConfig>,
}

fn default_jwt_header() -> String {
    "authorization".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderConfig {
    pub name: String,
    /// Required `iss`; tokens are routed to their provider by it.
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any audience.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Inline JWKS document (an object with `keys`).
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    /// JWKS fetched from an Envoy cluster and refreshed on the root tick.
    #[serde(default)]
    pub jwks_uri: Option<JwksUriConfig>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`/`nbf`/`iat`, like Envoy jwt_authn's default of 60 s.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// Tokens without `exp` are refused unless this is false.
    #[serde(default = "default_true")]
    pub require_exp: bool,
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// The claims that name the subject, first present wins (e.g. `["sub", "azp", "client_id"]`
    /// for OAuth client-credentials tokens without `sub`). A token with none of them is refused:
    /// a session is never bound to an empty subject.
    #[serde(default = "default_subject_claims")]
    pub subject_claims: Vec<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
}
fn default_leeway() -> u64 {
    60
}
fn default_true() -> bool {
    true
}
fn default_max_token_bytes() -> usize {
    8192
}
fn default_subject_claims() -> Vec<String> {
    vec!["sub".into()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksUriConfig {
    /// Envoy cluster that serves the JWKS.
    pub cluster: String,
    /// Path of the JWKS on that cluster.
    pub path: String,
    /// `:authority` sent; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_refresh")]
    pub refresh_seconds: u64,
    #[serde(default = "default_fetch_timeout")]
    pub timeout_ms: u64,
}

fn default_refresh() -> u64 {
    300
}
fn default_fetch_timeout() -> u64 {
    2000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    #[serde(default = "default_api_key_header")]
    pub header: String,
    pub keys: Vec<ApiKeyEntry>,
}

fn default_api_key_header() -> String {
    "x-api-key".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// Hex SHA-256 of the key: the key itself never appears in the config.
    pub sha256: String,
    pub subject: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SpiffeConfig {
    /// Accepted trust domains (e.g. `example.org`); empty accepts any.
    #[serde(default)]
    pub trust_domains: Vec<String>,
    /// Downstream addresses (IP, no port) whose `x-forwarded-client-cert` is believed.
    /// From any other peer the header is ignored (and stripped by Envoy's own settings).
    #[serde(default)]
    pub trusted_xfcc_hops: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Headers that carry the session id, in order of preference.
    #[serde(default = "default_session_headers")]
    pub headers: Vec<String>,
    /// JWT claim that carries the session id when no header does.
    #[serde(default = "default_session_claim")]
    pub claim: String,
    /// Sessions kept in the proxy when no state service is configured.
    #[serde(default = "default_local_sessions")]
    pub local_max_sessions: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            headers: default_session_headers(),
            claim: default_session_claim(),
            local_max_sessions: default_local_sessions(),
        }
    }
}

fn default_session_headers() -> Vec<String> {
    vec!["mcp-session-id".into(), "x-session-id".into()]
}
fn default_session_claim() -> String {
    "sid".into()
}
fn default_local_sessions() -> usize {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextConfig {
    #[serde(default = "default_region_header")]
    pub region_header: String,
    #[serde(default = "default_device_header")]
    pub device_header: String,
    /// Direct peers (IP addresses, as Envoy's `source.address` without the port) whose region
    /// and device headers are believed: the proxies or gateways that set them. From anyone else
    /// they are ignored, so a client cannot steer drift detection. `"*"` believes every peer.
    #[serde(default)]
    pub trusted_sources: Vec<String>,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self { region_header: default_region_header(), device_header: default_device_header(), trusted_sources: Vec::new() }
    }
}

/// A region or device value longer than this, or with other than visible ASCII and spaces, is
/// refused (400 `context_header_invalid`) even from a trusted source.
pub const MAX_CONTEXT_VALUE: usize = 128;

fn default_region_header() -> String {
    "x-client-region".into()
}
fn default_device_header() -> String {
    "x-device-id".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCacheConfig {
    #[serde(default = "default_cache_entries")]
    pub max_entries: usize,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        Self { max_entries: default_cache_entries() }
    }
}

fn default_cache_entries() -> usize {
    1024
}

/// Parse the plugin configuration. The error names the offending field by its path.
pub fn parse(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new("(root)", "configuration is empty: a JSON object with at least `policy` is required"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let cfg: PluginConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        // `.` is the root itself; an empty path is an unknown empty key (`""`) at the root.
        let path = if path == "." || path.is_empty() { "(root)".to_string() } else { path };
        ConfigError::new(&path, &e.into_inner().to_string())
    })?;
    cfg.validate()?;
    Ok(cfg)
}

impl PluginConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.policy.modules.is_empty() {
            return Err(ConfigError::new("policy.modules", "at least one Rego module is required"));
        }
        if let Some(c) = &self.policy.candidate {
            if c.modules.is_empty() {
                return Err(ConfigError::new("policy.candidate.modules", "at least one Rego module is required"));
            }
            if !c.entrypoint.starts_with("data.") {
                return Err(ConfigError::new("policy.candidate.entrypoint", "must be a rule path starting with `data.`"));
            }
        }
        if !self.policy.entrypoint.starts_with("data.") {
            return Err(ConfigError::new("policy.entrypoint", "must be a rule path starting with `data.`"));
        }
        if let Some(jwt) = &self.identity.jwt {
            if jwt.providers.is_empty() {
                return Err(ConfigError::new("identity.jwt.providers", "at least one provider is required"));
            }
            for (i, p) in jwt.providers.iter().enumerate() {
                let at = |f: &str| format!("identity.jwt.providers[{i}].{f}");
                if p.issuer.is_empty() {
                    return Err(ConfigError::new(&at("issuer"), "must not be empty"));
                }
                match (&p.jwks, &p.jwks_uri) {
                    (None, None) => {
                        return Err(ConfigError::new(&at("jwks"), "one of `jwks` (inline) or `jwks_uri` is required"))
                    }
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::new(&at("jwks_uri"), "give either `jwks` or `jwks_uri`, not both"))
                    }
                    _ => {}
                }
                if p.algorithms.is_empty() {
                    return Err(ConfigError::new(&at("algorithms"), "at least one algorithm is required"));
                }
                for alg in &p.algorithms {
                    if !matches!(alg.as_str(), "RS256" | "ES256" | "EdDSA" | "HS256") {
                        return Err(ConfigError::new(
                            &at("algorithms"),
                            &format!("unsupported algorithm `{alg}` (supported: RS256, ES256, EdDSA, HS256)"),
                        ));
                    }
                }
                if let Some(u) = &p.jwks_uri {
                    if u.cluster.is_empty() || !u.path.starts_with('/') {
                        return Err(ConfigError::new(&at("jwks_uri"), "needs a `cluster` and a `path` starting with `/`"));
                    }
                    if u.refresh_seconds == 0 {
                        return Err(ConfigError::new(&at("jwks_uri.refresh_seconds"), "must be at least 1"));
                    }
                }
            }
        }
        if let Some(keys) = &self.identity.api_keys {
            for (i, k) in keys.keys.iter().enumerate() {
                let ok = k.sha256.len() == 64 && k.sha256.bytes().all(|b| b.is_ascii_hexdigit());
                if !ok {
                    return Err(ConfigError::new(
                        &format!("identity.api_keys.keys[{i}].sha256"),
                        "must be the 64-hex-digit SHA-256 of the key (never the key itself)",
                    ));
                }
                if k.subject.is_empty() {
                    return Err(ConfigError::new(&format!("identity.api_keys.keys[{i}].subject"), "must not be empty"));
                }
            }
        }
        if let Some(st) = &self.state {
            if st.cluster.is_empty() {
                return Err(ConfigError::new("state.cluster", "must name the Envoy cluster of the session-state service"));
            }
            if st.token.len() < 16 {
                return Err(ConfigError::new("state.token", "must be the service's proxy token (at least 16 characters)"));
            }
            if st.timeout_ms == 0 || st.flush_interval_ms == 0 || st.revocation_poll_ms == 0 {
                return Err(ConfigError::new("state", "timeout_ms, flush_interval_ms and revocation_poll_ms must be at least 1"));
            }
            if st.max_batch == 0 || st.max_batch > 1000 {
                return Err(ConfigError::new("state.max_batch", "must be between 1 and 1000"));
            }
            if st.max_batch_bytes < 4096 || st.max_batch_bytes > crate::wire::limits::MAX_BATCH_BYTES {
                return Err(ConfigError::new(
                    "state.max_batch_bytes",
                    &format!("must be between 4096 and {} (below the service's body limit)", crate::wire::limits::MAX_BATCH_BYTES),
                ));
            }
            if st.queue_limit < st.max_batch {
                return Err(ConfigError::new("state.queue_limit", "must be at least max_batch"));
            }
        }
        if self.mcp.max_body_bytes == 0 || self.mcp.max_body_bytes > 16 * 1024 * 1024 {
            return Err(ConfigError::new("mcp.max_body_bytes", "must be between 1 and 16777216"));
        }
        for h in &self.policy.input_headers {
            let secret = matches!(h.to_ascii_lowercase().as_str(), "authorization" | "cookie" | "proxy-authorization")
                || self.identity.api_keys.as_ref().is_some_and(|k| k.header.eq_ignore_ascii_case(h))
                || self.identity.jwt.as_ref().is_some_and(|j| j.header.eq_ignore_ascii_case(h));
            if secret {
                return Err(ConfigError::new("policy.input_headers", &format!("`{h}` carries a credential: it never goes into the policy input or the trail")));
            }
        }
        let dpop = &self.identity.dpop;
        if dpop.algorithms.is_empty() {
            return Err(ConfigError::new("identity.dpop.algorithms", "at least one algorithm is required"));
        }
        for alg in &dpop.algorithms {
            if !matches!(alg.as_str(), "ES256" | "EdDSA") {
                return Err(ConfigError::new("identity.dpop.algorithms", &format!("unsupported algorithm `{alg}` (supported: ES256, EdDSA)")));
            }
        }
        if dpop.max_age_seconds == 0 || dpop.max_age_seconds > 3600 || dpop.future_skew_seconds > 300 {
            return Err(ConfigError::new("identity.dpop", "max_age_seconds must be 1-3600 and future_skew_seconds at most 300"));
        }
        if dpop.max_proof_bytes < 256 || dpop.max_proof_bytes > 16384 {
            return Err(ConfigError::new("identity.dpop.max_proof_bytes", "must be between 256 and 16384"));
        }
        if dpop.replay_cache_entries == 0 {
            return Err(ConfigError::new("identity.dpop.replay_cache_entries", "must be at least 1"));
        }
        if self.token_cache.max_entries == 0 {
            return Err(ConfigError::new("token_cache.max_entries", "must be at least 1"));
        }
        if self.session.local_max_sessions == 0 {
            return Err(ConfigError::new("session.local_max_sessions", "must be at least 1"));
        }
        if self.session.headers.iter().any(|h| h.starts_with(STAMPED_HEADER_PREFIX)) {
            return Err(ConfigError::new("session.headers", "must not use the x-warden- prefix (those headers are stamped by the filter)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        match parse(json.as_bytes()) {
            Ok(_) => String::from("parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_unknown_empty_key_at_the_root_is_blamed_on_the_root() {
        // Found by the `config` fuzz target: the error named no field at all.
        let e = parse(br#"{"": 1, "policy": {"modules": {"p.rego": "package warden.session"}}}"#).unwrap_err();
        assert_eq!(e.field, "(root)");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let cfg = parse(br#"{"policy":{"modules":{"p.rego":"package warden.session"}}}"#).unwrap();
        assert_eq!(cfg.mode, Mode::Enforce);
        assert_eq!(cfg.policy.on_error, FailureMode::Deny);
        assert_eq!(cfg.policy.entrypoint, "data.warden.session.decision");
        assert_eq!(cfg.session.headers, vec!["mcp-session-id", "x-session-id"]);
        assert!(!cfg.identity.allow_anonymous);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err("").contains("configuration is empty"));
        assert!(err("{}").contains("missing field `policy`"));
        assert!(err(r#"{"policy":{"modules":{}}}"#).starts_with("policy.modules:"));
        let e = err(r#"{"policy":{"modules":{"a":"b"}},"mode":"loud"}"#);
        assert!(e.starts_with("mode:"), "{e}");
        let e = err(r#"{"policy":{"modules":{"a":"b"}},"identity":{"jwt":{"providers":[{"name":"x","issuer":"i"}]}}}"#);
        assert!(e.starts_with("identity.jwt.providers[0].jwks:"), "{e}");
        let e = err(r#"{"policy":{"modules":{"a":"b"}},"identity":{"jwt":{"providers":[{"name":"x","issuer":"i","jwks":{},"algorithms":["none"]}]}}}"#);
        assert!(e.contains("unsupported algorithm `none`"), "{e}");
        let e = err(r#"{"policy":{"modules":{"a":"b"}},"identity":{"api_keys":{"keys":[{"sha256":"secret","subject":"s"}]}}}"#);
        assert!(e.starts_with("identity.api_keys.keys[0].sha256:"), "{e}");
        let e = err(r#"{"policy":{"modules":{"a":"b"}},"typo":1}"#);
        assert!(e.contains("unknown field `typo`"), "{e}");
    }
}
