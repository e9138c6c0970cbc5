//! The proxy-wasm filter: the only code that imports proxy_wasm. It adapts Envoy's host calls to
//! warden-core's `Host` trait and applies the `RequestOutcome` the core returns.
//!
//! Every host call goes through `proxy_wasm::hostcalls`, which returns a `Result`: the SDK's
//! trait helpers unwrap internally, and a trapped VM takes every request of its worker with it.

mod metrics;
mod state;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use warden_core::host::{Headers, Host};
use warden_core::wire::StepRecord;
use warden_core::{Body, Early, Held, Pending, RequestOutcome, Step, Warden};

use metrics::Metrics;
use warden_core::callouts::jwks::JwksFetcher;
use warden_core::callouts::state::{self as state_service, StateClient};
use warden_core::metrics::Counters;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(WardenRoot::default()) });
}}

/// Envoy's host calls behind warden-core's `Host` trait.
pub struct ProxyHost;

impl Host for ProxyHost {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(v), Some(cas))) => Some((v, cas)),
            _ => None,
        }
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        DRBG.with(|d| d.borrow_mut().fill(buf));
    }

    fn http_call(&mut self, cluster: &str, headers: &[(&str, &str)], body: Option<&[u8]>, timeout_ms: u64) -> Result<u32, String> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], Duration::from_millis(timeout_ms)).map_err(|e| format!("{e:?}"))
    }
}

/// Ids (session, decision, trace) come from a hash DRBG seeded once per VM from WASI
/// `random_get`: SHA-256(key || counter). One host call per VM instead of several per request;
/// the key never leaves the VM, so the ids stay unpredictable.
struct Drbg {
    key: Option<[u8; 32]>,
    counter: u64,
}

impl Drbg {
    fn fill(&mut self, buf: &mut [u8]) {
        let key = *self.key.get_or_insert_with(|| {
            let mut k = [0u8; 32];
            if getrandom::getrandom(&mut k).is_err() {
                // WASI random_get is always there in Envoy; should it fail, ids must still differ.
                k = warden_core::hash::sha256(&now_ms().to_le_bytes());
            }
            k
        });
        for chunk in buf.chunks_mut(32) {
            self.counter = self.counter.wrapping_add(1);
            let mut block = [0u8; 40];
            block[..32].copy_from_slice(&key);
            block[32..].copy_from_slice(&self.counter.to_le_bytes());
            let out = warden_core::hash::sha256(&block);
            chunk.copy_from_slice(&out[..chunk.len()]);
        }
    }
}

thread_local! {
    static DRBG: RefCell<Drbg> = const { RefCell::new(Drbg { key: None, counter: 0 }) };
}

/// The VM's linear memory: it only grows, so after `on_configure` it is what configuring took.
fn memory_kib() -> usize {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) * 64
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct WardenRoot {
    warden: Option<Rc<RefCell<Warden>>>,
    metrics: Rc<RefCell<Metrics>>,
    jwks: Option<JwksFetcher>,
    state: Option<Rc<RefCell<StateClient>>>,
    /// Set when Envoy lets go of this configuration (`on_done`): until then, and at most until
    /// this time, the root context stays to send the attribution records still queued in it.
    draining_until: Option<u64>,
}

/// How long a replaced configuration's root context may take to hand its queued records to the
/// state service before it lets go (and counts what is left as dropped).
const DRAIN_MS: u64 = 5_000;

impl WardenRoot {
    /// Every request of this configuration has ended (the HTTP contexts hold the client too) and
    /// every record has been taken by the service.
    fn drained(&self) -> bool {
        self.state.as_ref().is_none_or(|c| Rc::strong_count(c) == 1 && c.borrow().is_drained())
    }

    /// While draining: let go once drained, or at the deadline.
    fn finish_draining(&mut self) {
        let Some(deadline) = self.draining_until else { return };
        if !self.drained() {
            if now_ms() < deadline {
                return;
            }
            let left = self.state.as_ref().map_or(0, |c| c.borrow().queued());
            error!("session-warden: {left} attribution record(s) not taken by the state service within {DRAIN_MS} ms of the configuration being replaced: dropped");
            let mut metrics = self.metrics.borrow_mut();
            for _ in 0..left {
                metrics.increment(warden_core::metrics::RECORDS_DROPPED);
            }
        }
        self.metrics.borrow_mut().flush();
        self.draining_until = None;
        let _ = hostcalls::done();
    }
}

impl Context for WardenRoot {
    /// Envoy lets go of this configuration: replaced (ECDS, a WasmPlugin change, LDS) or Envoy
    /// stopping. Its records are queued here and nowhere else, so they are sent first; Envoy
    /// keeps the context (its ticks and call answers) until `proxy_done`.
    fn on_done(&mut self) -> bool {
        let Some(client) = self.state.clone() else { return true };
        client.borrow_mut().flush_now(&mut ProxyHost);
        if self.drained() {
            return true;
        }
        let (queued, batches) = (client.borrow().queued(), client.borrow().records_in_flight());
        info!("session-warden: configuration released: its attribution records ({queued} queued, {batches} batch(es) awaiting the service, and those of requests still running) go to the service before it lets go");
        self.draining_until = Some(now_ms() + DRAIN_MS);
        false
    }

    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(warden_rc) = self.warden.clone() else { return };
        let answer = state::response(num_headers, body_size);
        let ours = {
            let (warden, metrics) = (&mut *warden_rc.borrow_mut(), &mut *self.metrics.borrow_mut());
            let ours = self.state.as_ref().is_some_and(|client| client.borrow_mut().on_response(token_id, answer.clone(), warden, &mut ProxyHost, metrics));
            if !ours {
                if let Some(fetcher) = self.jwks.as_mut() {
                    fetcher.on_response(token_id, answer, warden, &mut ProxyHost, metrics);
                }
            }
            ours
        };
        if ours && self.draining_until.is_some() {
            self.finish_draining();
        }
    }
}

impl RootContext for WardenRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            _ => Vec::new(),
        };
        let warden = match Warden::from_json(&bytes) {
            Ok(w) => w,
            Err(e) => {
                error!("session-warden: invalid configuration: {e}");
                return false;
            }
        };
        match warden.policy_fallback() {
            None => info!(
                "session-warden: configured (mode {:?}, policy {} on the RVM; VM memory {} KiB)",
                warden.config.mode,
                warden.policy_version(),
                memory_kib()
            ),
            Some(why) => warn!(
                "session-warden: configured (mode {:?}, policy {}); the RVM cannot compile this policy, using the interpreter: {why}",
                warden.config.mode,
                warden.policy_version()
            ),
        }
        if let Some(v) = warden.candidate_version() {
            info!("session-warden: candidate policy {v} evaluated beside the enforced one (shadow: never acts)");
        }
        self.metrics.borrow_mut().define_known();
        self.metrics.borrow_mut().memory(memory_kib());
        let targets = warden.jwks_targets();
        self.jwks = (!targets.is_empty()).then(|| JwksFetcher::new(targets));
        self.state = warden.config.state.clone().map(|cfg| Rc::new(RefCell::new(StateClient::new(cfg))));
        // The tick flushes counters, fetches JWKS, sends attribution records, polls revocations.
        let _ = hostcalls::set_tick_period(Duration::from_millis(TICK_MS));
        self.warden = Some(Rc::new(RefCell::new(warden)));
        true
    }

    fn on_tick(&mut self) {
        if let Some(w) = &self.warden {
            w.borrow_mut().share_response_bytes(&mut ProxyHost);
        }
        self.metrics.borrow_mut().flush();
        self.metrics.borrow_mut().memory(memory_kib());
        if let Some(client) = &self.state {
            if self.draining_until.is_some() {
                client.borrow_mut().flush_now(&mut ProxyHost);
            } else {
                client.borrow_mut().on_tick(&mut ProxyHost);
            }
        }
        if self.draining_until.is_some() {
            self.finish_draining();
            return;
        }
        let (Some(fetcher), Some(warden)) = (self.jwks.as_mut(), self.warden.as_ref()) else { return };
        fetcher.on_tick(&mut warden.borrow_mut(), &mut ProxyHost, &mut *self.metrics.borrow_mut());
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let warden = self.warden.clone()?;
        Some(Box::new(WardenHttp {
            warden,
            metrics: self.metrics.clone(),
            state: self.state.clone(),
            response_headers: Vec::new(),
            replied: false,
            pending: None,
            record: None,
            started_ms: 0,
            awaiting_body: None,
            body_size: 0,
            adopt: None,
            headers_sent: false,
            held: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The root tick: counter flushes, JWKS fetches, attribution batches and revocation polls each
/// keep their own schedule within it.
const TICK_MS: u64 = 100;

struct WardenHttp {
    warden: Rc<RefCell<Warden>>,
    metrics: Rc<RefCell<Metrics>>,
    state: Option<Rc<RefCell<StateClient>>>,
    response_headers: Vec<(String, String)>,
    replied: bool,
    /// The request waiting for the state service.
    pending: Option<(u32, Box<Pending>)>,
    record: Option<StepRecord>,
    started_ms: u64,
    /// Headers of an MCP request whose body is being read before deciding.
    awaiting_body: Option<(Headers, Early)>,
    /// How much of that body the host has buffered.
    body_size: usize,
    /// The request headers have gone on (MCP body phase): they can no longer be changed.
    headers_sent: bool,
    /// The minted session of an MCP `initialize`, to adopt under the server's session id.
    adopt: Option<String>,
    /// A 2026-07-28 MCP request allowed on its headers, whose body is awaited.
    held: Option<Box<Held>>,
}

impl Context for WardenHttp {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some((token, pending)) = self.pending.take() else { return };
        if token != token_id {
            self.pending = Some((token, pending));
            return;
        }
        let answer = state_service::begin_answer(state::response(num_headers, body_size));
        let outcome = self.warden.borrow_mut().resume(pending, answer, &mut ProxyHost);
        if !self.apply(outcome) {
            let _ = hostcalls::resume_http_request();
        }
    }
}

impl HttpContext for WardenHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.started_ms = now_ms();
        let pairs = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(p) => p,
            Err(_) => {
                self.reply(500, &[("content-type", "application/json")], br#"{"error":"internal","reason":"headers_unreadable"}"#);
                return Action::Pause;
            }
        };
        let headers = Headers::from_pairs(pairs);
        if !end_of_stream && self.warden.borrow().decides_at_headers(&headers) {
            // A 2026-07-28 MCP request: decided on what its headers declare while all of it is
            // still here (a refusal forwards nothing); allowed, its headers go on and the body is
            // held to them (`held`, in `apply`).
            return self.decide(headers, Body::Coming, None);
        }
        if !end_of_stream && self.warden.borrow().wants_body(&headers) {
            // An MCP POST. Proxy-wasm hosts deliver the body only once the headers have gone on
            // (a paused header phase pauses everything), so: refuse now what headers alone decide,
            // else stamp what is known, let the headers go, and hold the body until it is whole.
            let early = self.warden.borrow_mut().on_body_request_headers(&headers, &mut ProxyHost);
            return match early {
                Err(refusal) => {
                    if self.apply(*refusal) {
                        Action::Pause
                    } else {
                        Action::Continue
                    }
                }
                Ok((early, stamps)) => {
                    self.rewrite_headers(&stamps.remove_headers, &stamps.set_headers);
                    self.awaiting_body = Some((headers, early));
                    self.headers_sent = true;
                    Action::Continue
                }
            };
        }
        self.decide(headers, Body::Absent, None)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.held.is_some() {
            return self.on_held_body(body_size, end_of_stream);
        }
        let Some((headers, early)) = self.awaiting_body.take() else { return Action::Continue };
        let max = self.warden.borrow().max_body_bytes();
        if body_size > max {
            return self.decide(headers, Body::TooLarge, Some(&early));
        }
        if !end_of_stream {
            // Keep buffering: nothing of the body goes on before the decision, which comes at
            // the end of the stream, here or with the trailers.
            self.awaiting_body = Some((headers, early));
            self.body_size = body_size;
            return Action::Pause;
        }
        self.decide_on_body(headers, body_size, &early)
    }

    /// A body that ends with trailers ends here: the body buffered so far is the whole body, and
    /// it is decided before the trailers (or any of the body) go on.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.held.is_some() {
            return self.on_held_body(self.body_size, true);
        }
        let Some((headers, early)) = self.awaiting_body.take() else { return Action::Continue };
        self.decide_on_body(headers, self.body_size, &early)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // A local reply carries its own headers; Envoy runs it through here as well.
        if self.replied {
            return Action::Continue;
        }
        if let Some(minted) = self.adopt.take() {
            let assigned = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, "mcp-session-id").ok().flatten();
            if let Some(assigned) = assigned.and_then(|v| String::from_utf8(v).ok()) {
                if self.warden.borrow_mut().adopt_session(&minted, &assigned, self.record.as_mut(), &mut ProxyHost) {
                    for (k, v) in self.response_headers.iter_mut() {
                        if k == warden_core::correlation::SESSION_HEADER {
                            *v = assigned.clone();
                        }
                    }
                }
            }
        }
        for (k, v) in &self.response_headers {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, k, Some(v));
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // A step taken on headers whose body never came whole is still a step of the trail.
        if let Some(held) = self.held.take() {
            let outcome = self.warden.borrow_mut().on_held_body(held, Body::Absent, &mut ProxyHost);
            self.count(&outcome);
            self.record = outcome.record;
        }
        // The step is complete: its record gets the final status and duration and is queued.
        let (Some(mut record), Some(client)) = (self.record.take(), self.state.as_ref()) else { return };
        if record.status.is_none() {
            record.status = u64_property(&["response", "code"]).map(|c| c as u32);
        }
        record.duration_ms = Some(now_ms().saturating_sub(self.started_ms));
        // The response body's size as Envoy counted it: the step's data volume (never the data).
        record.response_bytes = u64_property(&["response", "size"]);
        if let Some(bytes) = record.response_bytes {
            self.warden.borrow_mut().after_response(&record.session_id, bytes, &mut ProxyHost);
        }
        client.borrow_mut().enqueue(record, &mut *self.metrics.borrow_mut());
    }
}

/// An integer property of the stream (Envoy encodes them as 8 little-endian bytes).
fn u64_property(path: &[&str]) -> Option<u64> {
    hostcalls::get_property(path.to_vec()).ok().flatten().and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok()).map(u64::from_le_bytes)
}

impl WardenHttp {
    /// A held request's body: buffered (paused) until whole, then held to its headers and decided.
    fn on_held_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(held) = self.held.take() else { return Action::Continue };
        let max = self.warden.borrow().max_body_bytes();
        let outcome = if body_size > max {
            self.warden.borrow_mut().on_held_body(held, Body::TooLarge, &mut ProxyHost)
        } else if !end_of_stream {
            self.held = Some(held);
            self.body_size = body_size;
            return Action::Pause;
        } else {
            let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
                Ok(b) => b.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            self.warden.borrow_mut().on_held_body(held, Body::Complete(&body), &mut ProxyHost)
        };
        if self.apply(outcome) {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn count(&self, outcome: &RequestOutcome) {
        let mut m = self.metrics.borrow_mut();
        for name in &outcome.metrics {
            m.increment(name);
        }
    }

    /// Decide an MCP request on its complete body (buffered by the host while paused).
    fn decide_on_body(&mut self, headers: Headers, body_size: usize, early: &Early) -> Action {
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        self.decide(headers, Body::Complete(&body), Some(early))
    }

    /// Run the request flow; a state-service call pauses the request until its answer.
    fn decide(&mut self, headers: Headers, body: Body<'_>, early: Option<&Early>) -> Action {
        let step = self.warden.borrow_mut().on_request_early(headers, body, early, &mut ProxyHost);
        let outcome = match step {
            Step::Done(outcome) => outcome,
            Step::Call { pending, call } => {
                let dispatched = match &self.state {
                    Some(client) => {
                        let cfg = client.borrow().config().clone();
                        state_service::call(&mut ProxyHost, &cfg, "POST", call.path, Some(&call.body), cfg.timeout_ms)
                            .map_err(|e| format!("dispatch failed ({e}): is cluster `{}` defined?", cfg.cluster))
                    }
                    None => Err("no state client".to_string()),
                };
                match dispatched {
                    Ok(token) => {
                        self.pending = Some((token, pending));
                        return Action::Pause;
                    }
                    // A call that cannot even start is answered now: the request is never left paused.
                    Err(why) => self.warden.borrow_mut().resume(pending, Err(why.into()), &mut ProxyHost),
                }
            }
        };
        if self.apply(outcome) {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    /// Apply a decided outcome. True if a local reply was sent (the request must stay paused).
    fn apply(&mut self, outcome: RequestOutcome) -> bool {
        self.count(&outcome);
        if let Some(line) = &outcome.log {
            info!("session-warden: {line} [decision {}]", outcome.decision_id);
        }
        self.record = outcome.record;
        if outcome.adopt_session {
            self.adopt = outcome.session_id.clone();
        }
        if let Some(reply) = &outcome.reply {
            let hs: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            self.reply(reply.status, &hs, &reply.body);
            return true;
        }
        if !self.headers_sent {
            self.rewrite_headers(&outcome.remove_headers, &outcome.set_headers);
        }
        if let Some(held) = outcome.hold {
            self.held = Some(held);
            self.headers_sent = true;
        }
        self.response_headers = outcome.response_headers;
        false
    }

    /// Strip what a client sent under our names (rare: only names present are removed), then
    /// stamp. Our `x-warden-*` names are added, which costs Envoy less than replacing: any client
    /// copy was just removed and policies may not set them. Anything else (`traceparent`, a
    /// policy's headers) replaces what the request carries.
    fn rewrite_headers(&mut self, remove: &[String], set: &[(String, String)]) {
        for name in remove {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
        }
        for (k, v) in set {
            let _ = if k.starts_with(warden_core::config::STAMPED_HEADER_PREFIX) {
                hostcalls::add_map_value(MapType::HttpRequestHeaders, k, v)
            } else {
                hostcalls::set_map_value(MapType::HttpRequestHeaders, k, Some(v))
            };
        }
    }

    fn reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.replied = true;
        if let Err(e) = hostcalls::send_http_response(status, headers.to_vec(), Some(body)) {
            error!("session-warden: could not send the local reply ({e:?}); resetting the stream");
            let _ = hostcalls::reset_http_request();
        }
    }
}
