//! The request flow of one proxy VM: `Warden` is compiled once from the plugin configuration
//! (`on_configure`) and then takes every request through strip, identify, resolve the session,
//! decide, enforce, correlate and attribute (`request.rs`, `decide.rs`), answering with a
//! `RequestOutcome` (`outcome.rs`) the proxy applies. Refusals are rendered in `reply.rs`;
//! cached mode's shared session snapshots live in `snapshot.rs`.

mod decide;
mod held;
mod outcome;
mod reply;
mod request;
mod snapshot;

use std::collections::{BTreeMap, HashMap};

pub use outcome::{Body, Context, Early, Held, LocalReply, Pending, RequestOutcome, StateCall, StateFailure, Step};

use crate::config::{self, JwksUriConfig, PluginConfig};
use crate::error::{ConfigError, PolicyError};
use crate::identity::jwks::{parse_jwks, KeySet};
use crate::identity::jwt::{JwtVerifier, Provider};
use crate::identity::Identifier;
use crate::policy::{Policy, PolicySource};
use crate::session::LocalSessions;

/// A JWKS the proxy must fetch and keep fresh.
#[derive(Debug, Clone)]
pub struct JwksTarget {
    pub provider: usize,
    pub name: String,
    pub uri: JwksUriConfig,
}

pub struct Warden {
    pub config: PluginConfig,
    identifier: Identifier,
    policy: Policy,
    candidate: Option<Policy>,
    sessions: LocalSessions,
    /// Cached mode: response bytes of sessions not yet in their shared snapshot (`after_response`).
    unshared_bytes: HashMap<String, u64>,
}

impl Warden {
    /// Parse, validate and compile a configuration: the one thing `on_configure` calls.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::new(config::parse(bytes)?)
    }

    pub fn new(config: PluginConfig) -> Result<Self, ConfigError> {
        let jwt = match &config.identity.jwt {
            Some(j) => {
                let mut providers = Vec::new();
                for (i, p) in j.providers.iter().enumerate() {
                    let keys = match &p.jwks {
                        Some(doc) => parse_jwks(doc, &p.algorithms)
                            .map_err(|e| ConfigError::new(&format!("identity.jwt.providers[{i}].jwks"), &e))?
                            .0,
                        None => KeySet::default(),
                    };
                    providers.push(Provider { config: p.clone(), keys });
                }
                Some(JwtVerifier::new(providers, config.token_cache.max_entries))
            }
            None => None,
        };
        let identifier = Identifier::new(&config.identity, jwt);
        let policy = compile_policy(&config.policy.modules, config.policy.data.as_ref(), &config.policy.entrypoint, config.policy.max_instructions)
            .map_err(|e| ConfigError::new("policy", &e.0))?;
        let candidate = match &config.policy.candidate {
            Some(c) => Some(
                compile_policy(&c.modules, c.data.as_ref(), &c.entrypoint, config.policy.max_instructions)
                    .map_err(|e| ConfigError::new("policy.candidate", &e.0))?,
            ),
            None => None,
        };
        let sessions = LocalSessions::new(config.session.local_max_sessions);
        Ok(Self { config, identifier, policy, candidate, sessions, unshared_bytes: HashMap::new() })
    }

    /// The compiled policy and candidate, as the proxy decides with them: what `warden replay
    /// --config` re-decides recorded steps with.
    pub fn into_policies(self) -> (Policy, Option<Policy>) {
        (self.policy, self.candidate)
    }

    pub fn policy_version(&self) -> &str {
        &self.policy.version
    }

    pub fn candidate_version(&self) -> Option<&str> {
        self.candidate.as_ref().map(|c| c.version.as_str())
    }

    /// Why the policy runs on the interpreter rather than the RVM, if it does.
    pub fn policy_fallback(&self) -> Option<&str> {
        self.policy.fallback_reason.as_deref()
    }

    pub fn jwks_targets(&self) -> Vec<JwksTarget> {
        let Some(jwt) = &self.config.identity.jwt else { return Vec::new() };
        jwt.providers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.jwks_uri.clone().map(|uri| JwksTarget { provider: i, name: p.name.clone(), uri }))
            .collect()
    }

    /// Install a fetched JWKS for a provider. On error the keys in use are kept.
    pub fn install_jwks(&mut self, provider: usize, body: &[u8]) -> Result<usize, String> {
        let algs = self
            .config
            .identity
            .jwt
            .as_ref()
            .and_then(|j| j.providers.get(provider))
            .map(|p| p.algorithms.clone())
            .ok_or("no such provider")?;
        let doc: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let (keys, _) = parse_jwks(&doc, &algs)?;
        let n = keys.keys.len();
        if let Some(v) = self.identifier.jwt_mut() {
            v.set_keys(provider, keys);
        }
        Ok(n)
    }
}

fn compile_policy(modules: &BTreeMap<String, String>, data: Option<&serde_json::Value>, entrypoint: &str, max_instructions: usize) -> Result<Policy, PolicyError> {
    Policy::compile(&PolicySource {
        modules: modules.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        data,
        entrypoint,
        max_instructions,
    })
}
