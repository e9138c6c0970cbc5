//! Talking to the session-state service: the call itself (its authority and proxy token), what
//! a begin-step answer means (`begin_answer`), the attribution-record queue (drained in batches
//! bounded in count and bytes on the root tick, retried with back-off, bounded; a refused batch
//! split until only a record refused on its own is set aside) and the revocation-feed poller of
//! cached mode.

use std::collections::VecDeque;

use log::{error, warn};

use super::Answer;
use crate::config::{StateConfig, StateMode};
use crate::flow::{StateFailure, Warden};
use crate::host::Host;
use crate::metrics::{self as names, Counters};
use crate::wire::{AppendResult, BeginResponse, ErrorBody, RevocationFeed, StepRecord};

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

/// The answer to a begin-step call, classified. Only a missing answer (no cluster, refused
/// connection, timeout, reset), a 5xx or an unreadable 200 mean the service is unavailable; a
/// 4xx is the service refusing the step.
pub fn begin_answer(answer: Answer) -> Result<BeginResponse, StateFailure> {
    let Some((status, body)) = answer else {
        return Err(StateFailure::Unavailable("no answer (unreachable or past its deadline)".into()));
    };
    let message = || {
        let text = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => format!("{}: {}", e.error, e.message),
            Err(_) => String::from_utf8_lossy(&body).into_owned(),
        };
        text.chars().take(200).collect::<String>()
    };
    match status.parse::<u16>() {
        Ok(200) => serde_json::from_slice::<BeginResponse>(&body).map_err(|e| StateFailure::Unavailable(format!("unreadable answer: {e}"))),
        Ok(400..=499) => Err(StateFailure::Refused(format!("HTTP {status}: {}", message()))),
        _ => Err(StateFailure::Unavailable(format!("HTTP {status}: {}", message()))),
    }
}

/// Batches of records sent and not yet confirmed, at most.
const MAX_BATCHES_IN_FLIGHT: usize = 4;
/// A full page of the revocation feed: poll again at once, there may be more.
const FEED_PAGE: usize = 500;
const RECORDS_TIMEOUT_MS: u64 = 5000;
const FEED_TIMEOUT_MS: u64 = 2000;
/// Records the service refused one by one, kept for inspection (`rejected`); beyond this the
/// oldest is let go (each was logged in full when it was set aside).
const REJECTED_KEPT: usize = 256;

/// A queued record: serialized once, when it is queued, and sent as those bytes in every batch
/// (and every half of a split batch) it goes in.
pub struct Queued {
    json: Vec<u8>,
    pub session_id: String,
    pub step: u64,
    pub decision_id: String,
}

impl Queued {
    fn new(record: &StepRecord) -> Self {
        Self {
            json: serde_json::to_vec(record).unwrap_or_default(),
            session_id: record.session_id.clone(),
            step: record.step,
            decision_id: record.decision_id.clone(),
        }
    }

    /// The record as it is sent.
    pub fn json(&self) -> &[u8] {
        &self.json
    }
}

/// A record the service refused on its own, and why.
pub struct Rejected {
    pub record: Queued,
    pub reason: String,
}

/// `{"records":[...]}` from records already serialized.
fn batch_body(batch: &[Queued]) -> Vec<u8> {
    let mut body = Vec::with_capacity(batch.iter().map(|q| q.json.len() + 1).sum::<usize>() + 16);
    body.extend_from_slice(b"{\"records\":[");
    for (i, q) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&q.json);
    }
    body.extend_from_slice(b"]}");
    body
}

enum InFlight {
    Records(u32, Vec<Queued>),
    Revocations(u32),
}

pub struct StateClient {
    cfg: StateConfig,
    queue: VecDeque<Queued>,
    /// Halves of a batch the service refused (400, 413): sent as they are, never merged again,
    /// until each record is either accepted or refused on its own.
    split: VecDeque<Vec<Queued>>,
    rejected: VecDeque<Rejected>,
    in_flight: Vec<InFlight>,
    next_flush_ms: u64,
    next_poll_ms: u64,
    cursor: Option<u64>,
    failures: u32,
}

impl StateClient {
    pub fn new(cfg: StateConfig) -> Self {
        Self {
            cfg,
            queue: VecDeque::new(),
            split: VecDeque::new(),
            rejected: VecDeque::new(),
            in_flight: Vec::new(),
            next_flush_ms: 0,
            next_poll_ms: 0,
            cursor: None,
            failures: 0,
        }
    }

    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    /// Records waiting to be sent (split halves of a refused batch included).
    pub fn queued(&self) -> usize {
        self.queue.len() + self.split.iter().map(Vec::len).sum::<usize>()
    }

    /// Records the service refused on their own, most recent last.
    pub fn rejected(&self) -> impl Iterator<Item = &Rejected> {
        self.rejected.iter()
    }

    pub fn enqueue(&mut self, mut record: StepRecord, counters: &mut dyn Counters) {
        // Records are bounded when built; the proxy may change one after (adopting an MCP
        // session), and a record the service cannot take must not get this far.
        record.bound();
        if self.queue.len() >= self.cfg.queue_limit {
            // Bounded memory wins over completeness only when the service has been gone long
            // enough to fill the queue; say so loudly and count it.
            self.queue.pop_front();
            counters.increment(names::RECORDS_DROPPED);
            error!("session-warden: attribution queue full ({} records): the state service is unreachable; dropping the oldest record", self.cfg.queue_limit);
        }
        self.queue.push_back(Queued::new(&record));
    }

    /// The next batch: split halves first, else as many queued records as fit in `max_batch`
    /// and `max_batch_bytes` (a record larger than that goes alone).
    fn next_batch(&mut self) -> Option<Vec<Queued>> {
        if let Some(b) = self.split.pop_front() {
            return Some(b);
        }
        let mut bytes = 16;
        let mut n = 0;
        for q in self.queue.iter().take(self.cfg.max_batch) {
            if n > 0 && bytes + q.json.len() + 1 > self.cfg.max_batch_bytes {
                break;
            }
            bytes += q.json.len() + 1;
            n += 1;
        }
        (n > 0).then(|| self.queue.drain(..n).collect())
    }

    pub fn on_tick(&mut self, host: &mut dyn Host) {
        let now = host.now_ms();
        // Send when the interval is up, or at once when a full batch (or a split half) is waiting
        // and the service is healthy: the flush rate must keep up with the request rate, or the
        // queue fills. After a failure only the (backed-off) interval counts.
        let due = now >= self.next_flush_ms || (self.failures == 0 && (self.queue.len() >= self.cfg.max_batch || !self.split.is_empty()));
        if due {
            while self.records_in_flight() < MAX_BATCHES_IN_FLIGHT {
                let Some(batch) = self.next_batch() else { break };
                // The batch stays here, to go back in the queue unless the service confirms it.
                let body = batch_body(&batch);
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

    fn requeue(&mut self, batch: Vec<Queued>, now: u64) {
        for r in batch.into_iter().rev() {
            self.queue.push_front(r);
        }
        self.failures += 1;
        self.next_flush_ms = now + (self.cfg.flush_interval_ms << self.failures.min(5)).min(10_000);
    }

    /// The service refused a batch as invalid or too large: sending it again as it is cannot
    /// help, but the other records in it must not go with the one at fault. Halves go back to be
    /// sent on their own until a record is refused alone; that one is set aside, kept and logged.
    fn refused(&mut self, mut batch: Vec<Queued>, status: &str, body: &[u8], counters: &mut dyn Counters) {
        let reason = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) => e.message,
            Err(_) => String::from_utf8_lossy(body).chars().take(500).collect(),
        };
        if batch.len() > 1 {
            warn!("session-warden: the state service refused a batch of {} attribution records (HTTP {status}: {reason}); sending it in halves", batch.len());
            let second = batch.split_off(batch.len() / 2);
            self.split.push_front(second);
            self.split.push_front(batch);
            return;
        }
        for record in batch {
            self.set_aside(record, format!("HTTP {status}: {reason}"), counters);
        }
    }

    fn set_aside(&mut self, record: Queued, reason: String, counters: &mut dyn Counters) {
        counters.increment(names::RECORDS_REJECTED);
        error!(
            "session-warden: the state service refused the attribution record of session {} step {} (decision {}): {reason}; set aside",
            record.session_id, record.step, record.decision_id
        );
        if self.rejected.len() >= REJECTED_KEPT {
            self.rejected.pop_front();
        }
        self.rejected.push_back(Rejected { record, reason });
    }

    /// 409: the service appended the batch's records but those that contradict what it knows of
    /// their sessions (it keeps them in their audit events). Sending those again cannot help.
    fn partly_refused(&mut self, batch: Vec<Queued>, result: AppendResult, counters: &mut dyn Counters) {
        for record in batch {
            let refusal = result.refused.iter().find(|r| r.session_id == record.session_id && r.step == record.step && r.decision_id == record.decision_id);
            match refusal {
                Some(r) => {
                    let reason = format!("HTTP 409: {} (kept in the session's audit events)", r.code);
                    self.set_aside(record, reason, counters);
                }
                None => counters.increment(names::RECORDS_SENT),
            }
        }
        self.failures = 0;
    }

    /// The answer to a call of ours; false if the token was not one of ours.
    pub fn on_response(&mut self, token: u32, answer: Answer, warden: &mut Warden, host: &mut dyn Host, counters: &mut dyn Counters) -> bool {
        let Some(i) = self.in_flight.iter().position(|f| matches!(f, InFlight::Records(t, _) | InFlight::Revocations(t) if *t == token)) else {
            return false;
        };
        match self.in_flight.swap_remove(i) {
            InFlight::Records(_, batch) => {
                let answer = answer.map(|(status, body)| {
                    let result = serde_json::from_slice::<AppendResult>(&body).ok();
                    (status, body, result)
                });
                match answer {
                    Some((status, _, Some(_))) if status == "200" => {
                        for _ in 0..batch.len() {
                            counters.increment(names::RECORDS_SENT);
                        }
                        self.failures = 0;
                    }
                    Some((status, body, _)) if status == "400" || status == "413" => self.refused(batch, &status, &body, counters),
                    Some((status, _, Some(result))) if status == "409" && !result.refused.is_empty() => self.partly_refused(batch, result, counters),
                    other => {
                        let why = match other {
                            Some((status, _, _)) => format!("HTTP {status}"),
                            None => "no answer".into(),
                        };
                        warn!("session-warden: attribution records not accepted ({why}); {} will be retried", batch.len());
                        for _ in 0..batch.len() {
                            counters.increment(names::RECORDS_RETRIED);
                        }
                        self.requeue(batch, host.now_ms());
                    }
                }
            }
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
