//! Keeps JWKS fetched from Envoy clusters fresh. Fetches go out on the root tick; the last good
//! document is published in shared data so the other workers' VMs install it without fetching
//! it again; on a failed fetch the keys in use are kept and the fetch is retried with back-off.

use std::collections::HashMap;
use std::time::Duration;

use log::{info, warn};
use proxy_wasm::hostcalls;
use warden_core::{metrics as names, JwksTarget, Warden};

use crate::metrics::Metrics;

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

    pub fn on_tick(&mut self, now: u64, warden: &mut Warden, metrics: &mut Metrics) {
        for (i, s) in self.states.iter_mut().enumerate() {
            // A document another VM fetched: layout is 8 bytes fetched-at (ms, LE) + body.
            if let Ok((Some(bytes), Some(cas))) = hostcalls::get_shared_data(&shared_key(&s.target)) {
                if s.installed_cas != Some(cas) && bytes.len() > 8 {
                    let mut at = [0u8; 8];
                    at.copy_from_slice(&bytes[..8]);
                    let fetched_at = u64::from_le_bytes(at);
                    if warden.install_jwks(s.target.provider, &bytes[8..]).is_ok() {
                        s.installed_cas = Some(cas);
                        s.next_fetch_ms = s.next_fetch_ms.max(fetched_at + s.target.uri.refresh_seconds * 1000);
                    }
                }
            }
            if s.in_flight || now < s.next_fetch_ms {
                continue;
            }
            let authority = s.target.uri.authority.clone().unwrap_or_else(|| s.target.uri.cluster.clone());
            let headers = vec![(":method", "GET"), (":path", s.target.uri.path.as_str()), (":authority", authority.as_str()), ("accept", "application/json")];
            let timeout = Duration::from_millis(s.target.uri.timeout_ms);
            match hostcalls::dispatch_http_call(&s.target.uri.cluster, headers, None, vec![], timeout) {
                Ok(token) => {
                    s.in_flight = true;
                    self.calls.insert(token, i);
                }
                Err(e) => {
                    metrics.increment(names::JWKS_FETCH_FAILED);
                    warn!("session-warden: JWKS fetch for provider {} could not start ({e:?}): is cluster `{}` defined?", s.target.name, s.target.uri.cluster);
                    s.failures += 1;
                    s.next_fetch_ms = now + backoff_ms(s.failures);
                }
            }
        }
    }

    pub fn on_response(&mut self, token: u32, status: Option<&str>, body: Option<&[u8]>, warden: &mut Warden, metrics: &mut Metrics) {
        let Some(i) = self.calls.remove(&token) else { return };
        let Some(s) = self.states.get_mut(i) else { return };
        s.in_flight = false;
        let now = crate::now_ms();
        let result = match (status, body) {
            (Some("200"), Some(body)) => warden.install_jwks(s.target.provider, body).map(|n| (n, body)),
            (Some(code), _) => Err(format!("HTTP status {code}")),
            (None, _) => Err("no response (cluster unreachable or timed out)".to_string()),
        };
        match result {
            Ok((n, body)) => {
                metrics.increment(names::JWKS_FETCH_OK);
                if s.installed_cas.is_none() {
                    info!("session-warden: loaded {n} key(s) for JWT provider {}", s.target.name);
                }
                s.failures = 0;
                s.next_fetch_ms = now + s.target.uri.refresh_seconds * 1000;
                let mut doc = now.to_le_bytes().to_vec();
                doc.extend_from_slice(body);
                let key = shared_key(&s.target);
                let _ = hostcalls::set_shared_data(&key, Some(&doc), None);
                s.installed_cas = hostcalls::get_shared_data(&key).ok().and_then(|(_, cas)| cas).or(Some(0));
            }
            Err(e) => {
                metrics.increment(names::JWKS_FETCH_FAILED);
                s.failures += 1;
                s.next_fetch_ms = now + backoff_ms(s.failures);
                warn!("session-warden: JWKS fetch for provider {} failed: {e}; keeping the keys in use, retrying", s.target.name);
            }
        }
    }
}

/// 1 s, 2 s, 4 s … up to 30 s.
fn backoff_ms(failures: u32) -> u64 {
    (1000u64 << failures.min(5).saturating_sub(1)).min(30_000)
}
