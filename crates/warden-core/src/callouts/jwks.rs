//! Keeps JWKS fetched from the proxy's clusters fresh. Fetches go out on the root tick; the last
//! good document is published in shared data so the other workers' VMs install it without
//! fetching it again; on a failed fetch the keys in use are kept and the fetch is retried with
//! back-off.

use std::collections::HashMap;

use log::{info, warn};

use super::Answer;
use crate::flow::{JwksTarget, Warden};
use crate::host::Host;
use crate::metrics::{self as names, Counters};

struct State {
    target: JwksTarget,
    /// Shared-data version (CAS) of the document installed here.
    installed_cas: Option<u32>,
    next_fetch_ms: u64,
    failures: u32,
    in_flight: bool,
}

pub struct JwksFetcher {
    states: Vec<State>,
    calls: HashMap<u32, usize>,
}

const SHARED_PREFIX: &str = "session-warden.jwks.";
/// A published document: 8 bytes fetched-at (ms, little-endian), then the JWKS as fetched.
const STAMP: usize = 8;

fn shared_key(t: &JwksTarget) -> String {
    format!("{SHARED_PREFIX}{}.{}", t.uri.cluster, t.uri.path)
}

impl JwksFetcher {
    pub fn new(targets: Vec<JwksTarget>) -> Self {
        let states = targets
            .into_iter()
            .map(|target| State { target, installed_cas: None, next_fetch_ms: 0, failures: 0, in_flight: false })
            .collect();
        Self { states, calls: HashMap::new() }
    }

    pub fn on_tick(&mut self, warden: &mut Warden, host: &mut dyn Host, counters: &mut dyn Counters) {
        let now = host.now_ms();
        for (i, s) in self.states.iter_mut().enumerate() {
            // A document another VM fetched.
            if let Some((bytes, cas)) = host.shared_get(&shared_key(&s.target)) {
                if s.installed_cas != Some(cas) && bytes.len() > STAMP {
                    let mut at = [0u8; STAMP];
                    at.copy_from_slice(&bytes[..STAMP]);
                    let fetched_at = u64::from_le_bytes(at);
                    if warden.install_jwks(s.target.provider, &bytes[STAMP..]).is_ok() {
                        s.installed_cas = Some(cas);
                        s.next_fetch_ms = s.next_fetch_ms.max(fetched_at + s.target.uri.refresh_seconds * 1000);
                    }
                }
            }
            if s.in_flight || now < s.next_fetch_ms {
                continue;
            }
            let uri = &s.target.uri;
            let authority = uri.authority.as_deref().unwrap_or(&uri.cluster);
            let headers = [(":method", "GET"), (":path", uri.path.as_str()), (":authority", authority), ("accept", "application/json")];
            match host.http_call(&uri.cluster, &headers, None, uri.timeout_ms) {
                Ok(token) => {
                    s.in_flight = true;
                    self.calls.insert(token, i);
                }
                Err(e) => {
                    counters.increment(names::JWKS_FETCH_FAILED);
                    warn!("session-warden: JWKS fetch for provider {} could not start ({e}): is cluster `{}` defined?", s.target.name, uri.cluster);
                    s.failures += 1;
                    s.next_fetch_ms = now + backoff_ms(s.failures);
                }
            }
        }
    }

    /// The answer to a fetch of ours; false if the token was not one of ours.
    pub fn on_response(&mut self, token: u32, answer: Answer, warden: &mut Warden, host: &mut dyn Host, counters: &mut dyn Counters) -> bool {
        let Some(i) = self.calls.remove(&token) else { return false };
        let Some(s) = self.states.get_mut(i) else { return true };
        s.in_flight = false;
        let now = host.now_ms();
        let result = match &answer {
            Some((status, body)) if status == "200" => warden.install_jwks(s.target.provider, body).map(|n| (n, body.as_slice())),
            Some((status, _)) => Err(format!("HTTP status {status}")),
            None => Err("no response (cluster unreachable or timed out)".to_string()),
        };
        match result {
            Ok((n, body)) => {
                counters.increment(names::JWKS_FETCH_OK);
                if s.installed_cas.is_none() {
                    info!("session-warden: loaded {n} key(s) for JWT provider {}", s.target.name);
                }
                s.failures = 0;
                s.next_fetch_ms = now + s.target.uri.refresh_seconds * 1000;
                let mut doc = now.to_le_bytes().to_vec();
                doc.extend_from_slice(body);
                let key = shared_key(&s.target);
                host.shared_set(&key, &doc, None);
                s.installed_cas = host.shared_get(&key).map(|(_, cas)| cas).or(Some(0));
            }
            Err(e) => {
                counters.increment(names::JWKS_FETCH_FAILED);
                s.failures += 1;
                s.next_fetch_ms = now + backoff_ms(s.failures);
                warn!("session-warden: JWKS fetch for provider {} failed: {e}; keeping the keys in use, retrying", s.target.name);
            }
        }
        true
    }
}

/// 1 s, 2 s, 4 s … up to 30 s.
fn backoff_ms(failures: u32) -> u64 {
    (1000u64 << failures.min(5).saturating_sub(1)).min(30_000)
}
