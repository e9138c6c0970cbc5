//! Talking to the session-state service: the callout helper, the attribution-record queue
//! (drained in batches on the root tick, retried, bounded) and the revocation-feed poller.

use std::collections::VecDeque;
use std::time::Duration;

use log::{error, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};
use warden_core::config::{StateConfig, StateMode};
use warden_core::metrics as names;
use warden_core::wire::{AppendResult, RevocationFeed, StepRecord};
use warden_core::Warden;

use crate::metrics::Metrics;

/// Start a call to the state service; the answer arrives in `on_http_call_response` of the
/// context that made it.
pub fn dispatch(cfg: &StateConfig, method: &str, path: &str, body: Option<&[u8]>, timeout_ms: u64) -> Result<u32, Status> {
    let authority = cfg.authority.clone().unwrap_or_else(|| cfg.cluster.clone());
    let auth = format!("Bearer {}", cfg.token);
    let headers = vec![
        (":method", method),
        (":path", path),
        (":authority", authority.as_str()),
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    hostcalls::dispatch_http_call(&cfg.cluster, headers, body, vec![], Duration::from_millis(timeout_ms))
}

/// The status and body of a call's response; `None` when the call failed (zero headers: no
/// cluster, connection refused, timeout).
pub fn response(num_headers: usize, body_size: usize) -> Option<(String, Vec<u8>)> {
    if num_headers == 0 {
        return None;
    }
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status").ok().flatten()?;
    let body = if body_size > 0 {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten().unwrap_or_default()
    } else {
        Vec::new()
    };
    Some((status, body))
}

/// `RecordBatch` by reference: serialized without giving up the records.
#[derive(serde::Serialize)]
struct BatchRef<'a> {
    records: &'a [StepRecord],
}

/// Batches of records sent and not yet confirmed, at most.
const MAX_BATCHES_IN_FLIGHT: usize = 4;

enum InFlight {
    Records(u32, Vec<StepRecord>),
    Revocations(u32),
}

pub struct StateClient {
    cfg: StateConfig,
    queue: VecDeque<StepRecord>,
    in_flight: Vec<InFlight>,
    next_flush_ms: u64,
    next_poll_ms: u64,
    cursor: Option<u64>,
    failures: u32,
}

impl StateClient {
    pub fn new(cfg: StateConfig) -> Self {
        Self { cfg, queue: VecDeque::new(), in_flight: Vec::new(), next_flush_ms: 0, next_poll_ms: 0, cursor: None, failures: 0 }
    }

    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    pub fn enqueue(&mut self, record: StepRecord, metrics: &mut Metrics) {
        if self.queue.len() >= self.cfg.queue_limit {
            // Bounded memory wins over completeness only when the service has been gone long
            // enough to fill the queue; say so loudly and count it.
            self.queue.pop_front();
            metrics.increment(names::RECORDS_DROPPED);
            error!("session-warden: attribution queue full ({} records): the state service is unreachable; dropping the oldest record", self.cfg.queue_limit);
        }
        self.queue.push_back(record);
    }

    pub fn on_tick(&mut self, now: u64) {
        // Send when the interval is up, or at once when a full batch is waiting and the service
        // is healthy: the flush rate must keep up with the request rate, or the queue fills.
        // After a failure only the (backed-off) interval counts.
        let due = now >= self.next_flush_ms || (self.failures == 0 && self.queue.len() >= self.cfg.max_batch);
        if due {
            while !self.queue.is_empty() && self.records_in_flight() < MAX_BATCHES_IN_FLIGHT {
                let n = self.queue.len().min(self.cfg.max_batch);
                let batch: Vec<StepRecord> = self.queue.drain(..n).collect();
                // The batch stays here, to go back in the queue unless the service confirms it.
                let body = serde_json::to_vec(&BatchRef { records: &batch }).unwrap_or_default();
                match dispatch(&self.cfg, "POST", "/v1/records", Some(&body), 5000) {
                    Ok(token) => self.in_flight.push(InFlight::Records(token, batch)),
                    Err(e) => {
                        warn!("session-warden: cannot send attribution records ({e:?}): is cluster `{}` defined?", self.cfg.cluster);
                        self.requeue(batch, now);
                        break;
                    }
                }
                if self.failures > 0 {
                    break;
                }
            }
            if self.failures == 0 {
                self.next_flush_ms = now + self.cfg.flush_interval_ms;
            }
        }
        if self.cfg.mode == StateMode::Cached && now >= self.next_poll_ms && !self.in_flight.iter().any(|f| matches!(f, InFlight::Revocations(_))) {
            let path = format!("/v1/revocations?after={}", self.cursor.unwrap_or(0));
            if let Ok(token) = dispatch(&self.cfg, "GET", &path, None, 2000) {
                self.in_flight.push(InFlight::Revocations(token));
            }
            self.next_poll_ms = now + self.cfg.revocation_poll_ms;
        }
    }

    fn records_in_flight(&self) -> usize {
        self.in_flight.iter().filter(|f| matches!(f, InFlight::Records(..))).count()
    }

    fn requeue(&mut self, batch: Vec<StepRecord>, now: u64) {
        for r in batch.into_iter().rev() {
            self.queue.push_front(r);
        }
        self.failures += 1;
        self.next_flush_ms = now + (self.cfg.flush_interval_ms << self.failures.min(5)).min(10_000);
    }

    /// True if the token was one of ours.
    pub fn on_response(&mut self, token: u32, answer: Option<(String, Vec<u8>)>, now: u64, warden: &mut Warden, metrics: &mut Metrics) -> bool {
        let Some(i) = self.in_flight.iter().position(|f| matches!(f, InFlight::Records(t, _) | InFlight::Revocations(t) if *t == token)) else {
            return false;
        };
        match self.in_flight.swap_remove(i) {
            InFlight::Records(_, batch) => match answer {
                Some((status, body)) if status == "200" && serde_json::from_slice::<AppendResult>(&body).is_ok() => {
                    for _ in 0..batch.len() {
                        metrics.increment(names::RECORDS_SENT);
                    }
                    self.failures = 0;
                }
                Some((status, body)) if status == "400" => {
                    // The service refused the batch as invalid: retrying cannot help.
                    error!("session-warden: the state service refused {} attribution records: {}", batch.len(), String::from_utf8_lossy(&body));
                    for _ in 0..batch.len() {
                        metrics.increment(names::RECORDS_DROPPED);
                    }
                }
                other => {
                    let why = match other {
                        Some((status, _)) => format!("HTTP {status}"),
                        None => "no answer".into(),
                    };
                    warn!("session-warden: attribution records not accepted ({why}); {} will be retried", batch.len());
                    for _ in 0..batch.len() {
                        metrics.increment(names::RECORDS_RETRIED);
                    }
                    self.requeue(batch, now);
                }
            },
            InFlight::Revocations(_) => {
                if let Some(feed) = answer.filter(|(s, _)| s == "200").and_then(|(_, b)| serde_json::from_slice::<RevocationFeed>(&b).ok()) {
                    let mut host = crate::ProxyHost;
                    for r in &feed.revocations {
                        warden.apply_revocation(&r.session_id, &mut host);
                        metrics.increment(names::REVOCATIONS_APPLIED);
                    }
                    self.cursor = Some(feed.cursor);
                    if feed.revocations.len() >= 500 {
                        self.next_poll_ms = 0;
                    }
                }
            }
        }
        true
    }
}
