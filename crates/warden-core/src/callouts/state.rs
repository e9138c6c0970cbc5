//! Talking to the session-state service: the call itself (its authority and proxy token), the
//! attribution-record queue (drained in batches on the root tick, retried with back-off,
//! bounded) and the revocation-feed poller of cached mode.

use std::collections::VecDeque;

use log::{error, warn};

use super::Answer;
use crate::config::{StateConfig, StateMode};
use crate::flow::Warden;
use crate::host::Host;
use crate::metrics::{self as names, Counters};
use crate::wire::{AppendResult, RevocationFeed, StepRecord};

/// Start a call to the state service.
pub fn call(host: &mut dyn Host, cfg: &StateConfig, method: &str, path: &str, body: Option<&[u8]>, timeout_ms: u64) -> Result<u32, String> {
    let authority = cfg.authority.as_deref().unwrap_or(&cfg.cluster);
    let auth = format!("Bearer {}", cfg.token);
    let headers = [
        (":method", method),
        (":path", path),
        (":authority", authority),
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    host.http_call(&cfg.cluster, &headers, body, timeout_ms)
}

/// `RecordBatch` by reference: serialized without giving up the records.
#[derive(serde::Serialize)]
struct BatchRef<'a> {
    records: &'a [StepRecord],
}

/// Batches of records sent and not yet confirmed, at most.
const MAX_BATCHES_IN_FLIGHT: usize = 4;
/// A full page of the revocation feed: poll again at once, there may be more.
const FEED_PAGE: usize = 500;
const RECORDS_TIMEOUT_MS: u64 = 5000;
const FEED_TIMEOUT_MS: u64 = 2000;

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

    /// Records waiting to be sent.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn enqueue(&mut self, record: StepRecord, counters: &mut dyn Counters) {
        if self.queue.len() >= self.cfg.queue_limit {
            // Bounded memory wins over completeness only when the service has been gone long
            // enough to fill the queue; say so loudly and count it.
            self.queue.pop_front();
            counters.increment(names::RECORDS_DROPPED);
            error!("session-warden: attribution queue full ({} records): the state service is unreachable; dropping the oldest record", self.cfg.queue_limit);
        }
        self.queue.push_back(record);
    }

    pub fn on_tick(&mut self, host: &mut dyn Host) {
        let now = host.now_ms();
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
                match call(host, &self.cfg, "POST", "/v1/records", Some(&body), RECORDS_TIMEOUT_MS) {
                    Ok(token) => self.in_flight.push(InFlight::Records(token, batch)),
                    Err(e) => {
                        warn!("session-warden: cannot send attribution records ({e}): is cluster `{}` defined?", self.cfg.cluster);
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
            if let Ok(token) = call(host, &self.cfg, "GET", &path, None, FEED_TIMEOUT_MS) {
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

    /// The answer to a call of ours; false if the token was not one of ours.
    pub fn on_response(&mut self, token: u32, answer: Answer, warden: &mut Warden, host: &mut dyn Host, counters: &mut dyn Counters) -> bool {
        let Some(i) = self.in_flight.iter().position(|f| matches!(f, InFlight::Records(t, _) | InFlight::Revocations(t) if *t == token)) else {
            return false;
        };
        match self.in_flight.swap_remove(i) {
            InFlight::Records(_, batch) => match answer {
                Some((status, body)) if status == "200" && serde_json::from_slice::<AppendResult>(&body).is_ok() => {
                    for _ in 0..batch.len() {
                        counters.increment(names::RECORDS_SENT);
                    }
                    self.failures = 0;
                }
                Some((status, body)) if status == "400" => {
                    // The service refused the batch as invalid: retrying cannot help.
                    error!("session-warden: the state service refused {} attribution records: {}", batch.len(), String::from_utf8_lossy(&body));
                    for _ in 0..batch.len() {
                        counters.increment(names::RECORDS_DROPPED);
                    }
                }
                other => {
                    let why = match other {
                        Some((status, _)) => format!("HTTP {status}"),
                        None => "no answer".into(),
                    };
                    warn!("session-warden: attribution records not accepted ({why}); {} will be retried", batch.len());
                    for _ in 0..batch.len() {
                        counters.increment(names::RECORDS_RETRIED);
                    }
                    self.requeue(batch, host.now_ms());
                }
            },
            InFlight::Revocations(_) => {
                if let Some(feed) = answer.filter(|(s, _)| s == "200").and_then(|(_, b)| serde_json::from_slice::<RevocationFeed>(&b).ok()) {
                    for r in &feed.revocations {
                        warden.apply_revocation(&r.session_id, host);
                        counters.increment(names::REVOCATIONS_APPLIED);
                    }
                    self.cursor = Some(feed.cursor);
                    if feed.revocations.len() >= FEED_PAGE {
                        self.next_poll_ms = 0;
                    }
                }
            }
        }
        true
    }
}
