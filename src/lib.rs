//! The proxy-wasm filter: the only code that imports proxy_wasm. It adapts Envoy's host calls to
//! warden-core's `Host` trait and applies the `RequestOutcome` the core returns.
//!
//! Every host call goes through `proxy_wasm::hostcalls`, which returns a `Result`: the SDK's
//! trait helpers unwrap internally, and a trapped VM takes every request of its worker with it.

mod jwks;
mod metrics;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use warden_core::host::{Headers, Host};
use warden_core::Warden;

use jwks::JwksFetcher;
use metrics::Metrics;

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

    fn fill_random(&mut self, buf: &mut [u8]) {
        if getrandom::getrandom(buf).is_err() {
            // WASI random_get is always there in Envoy; should it fail, ids must still differ.
            let seed = warden_core::hash::sha256(&now_ms().to_le_bytes());
            for (i, b) in buf.iter_mut().enumerate() {
                *b = seed[i % seed.len()];
            }
        }
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
}

impl Context for WardenRoot {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let (Some(fetcher), Some(warden)) = (self.jwks.as_mut(), self.warden.as_ref()) else { return };
        // Zero headers means the call failed (no cluster, timeout, reset): an answer too.
        let status = if num_headers == 0 {
            None
        } else {
            hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status").ok().flatten()
        };
        let body = if body_size > 0 {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten()
        } else {
            None
        };
        fetcher.on_response(token_id, status.as_deref(), body.as_deref(), &mut warden.borrow_mut(), &mut self.metrics.borrow_mut());
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
                "session-warden: configured (mode {:?}, policy {} on the RVM)",
                warden.config.mode,
                warden.policy_version()
            ),
            Some(why) => warn!(
                "session-warden: configured (mode {:?}, policy {}); the RVM cannot compile this policy, using the interpreter: {why}",
                warden.config.mode,
                warden.policy_version()
            ),
        }
        self.metrics.borrow_mut().define_known();
        let targets = warden.jwks_targets();
        self.jwks = (!targets.is_empty()).then(|| JwksFetcher::new(targets));
        if self.jwks.is_some() {
            // Fetch keys right away and keep trying quickly until every provider has some.
            let _ = hostcalls::set_tick_period(Duration::from_millis(200));
        }
        self.warden = Some(Rc::new(RefCell::new(warden)));
        true
    }

    fn on_tick(&mut self) {
        let (Some(fetcher), Some(warden)) = (self.jwks.as_mut(), self.warden.as_ref()) else { return };
        fetcher.on_tick(now_ms(), &mut warden.borrow_mut(), &mut self.metrics.borrow_mut());
        let period = if fetcher.all_loaded() { Duration::from_secs(1) } else { Duration::from_millis(200) };
        let _ = hostcalls::set_tick_period(period);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let warden = self.warden.clone()?;
        Some(Box::new(WardenHttp { warden, metrics: self.metrics.clone(), response_headers: Vec::new(), replied: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct WardenHttp {
    warden: Rc<RefCell<Warden>>,
    metrics: Rc<RefCell<Metrics>>,
    response_headers: Vec<(String, String)>,
    replied: bool,
}

impl Context for WardenHttp {}

impl HttpContext for WardenHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let pairs = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(p) => p,
            Err(_) => {
                self.reply(500, &[("content-type", "application/json")], br#"{"error":"internal","reason":"headers_unreadable"}"#);
                return Action::Pause;
            }
        };
        let headers = Headers::from_pairs(pairs);
        let outcome = self.warden.borrow_mut().on_request(&headers, &mut ProxyHost);

        {
            let mut m = self.metrics.borrow_mut();
            for name in &outcome.metrics {
                m.increment(name);
            }
        }
        if let Some(line) = &outcome.log {
            info!("session-warden: {line} [decision {}]", outcome.decision_id);
        }
        for name in &outcome.remove_headers {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
        }
        if let Some(reply) = &outcome.reply {
            let hs: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            self.reply(reply.status, &hs, &reply.body);
            return Action::Pause;
        }
        for (k, v) in &outcome.set_headers {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, k, Some(v));
        }
        self.response_headers = outcome.response_headers;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // A local reply carries its own headers; Envoy runs it through here as well.
        if !self.replied {
            for (k, v) in &self.response_headers {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, k, Some(v));
            }
        }
        Action::Continue
    }
}

impl WardenHttp {
    fn reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.replied = true;
        if let Err(e) = hostcalls::send_http_response(status, headers.to_vec(), Some(body)) {
            error!("session-warden: could not send the local reply ({e:?}); resetting the stream");
            let _ = hostcalls::reset_http_request();
        }
    }
}
