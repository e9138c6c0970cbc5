//! Counters through proxy-wasm metrics, defined once per VM and looked up by name. Increments
//! are counted in the VM and flushed to Envoy on the root tick (every 100 ms): one host call per
//! counter per tick instead of several per request.

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use warden_core::metrics::{self as names, Counters};

#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, u32>,
    pending: HashMap<u32, i64>,
    memory: Option<u32>,
    memory_reported_kib: usize,
}

impl Metrics {
    /// Define the fixed counters up front so they show (as 0) in `/stats` before first use.
    pub fn define_known(&mut self) {
        let fixed = [
            names::REQUESTS,
            names::JWT_CACHE_HIT,
            names::JWT_CACHE_MISS,
            names::POLICY_ERRORS,
            names::SESSIONS_NEW,
            names::SESSION_BINDING_VIOLATIONS,
            names::JWKS_FETCH_OK,
            names::JWKS_FETCH_FAILED,
            names::STATE_UNAVAILABLE,
            names::STATE_REFUSED,
            names::RECORDS_SENT,
            names::RECORDS_RETRIED,
            names::RECORDS_DROPPED,
            names::RECORDS_REJECTED,
            names::REVOCATIONS_APPLIED,
            names::CANDIDATE_EVALUATIONS,
            names::CANDIDATE_DISAGREEMENTS,
            names::PATHS_REFUSED,
        ];
        for n in fixed {
            self.id(n);
        }
        for action in ["allow", "deny", "step_up", "terminate", "throttle"] {
            self.id(&names::decision(action));
            self.id(&names::shadow(action));
        }
        self.id(&names::shadow("unauthenticated"));
    }

    fn id(&mut self, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(MetricType::Counter, name).ok()?;
        self.ids.insert(name.to_string(), id);
        Some(id)
    }

    /// The `warden.vm.memory_kib` gauge: this VM adds what its linear memory grew by since it
    /// last reported (memory only grows), so the gauge is the sum over the proxy's VMs. A host
    /// call only when it grew.
    pub fn memory(&mut self, kib: usize) {
        if kib <= self.memory_reported_kib {
            return;
        }
        if self.memory.is_none() {
            self.memory = hostcalls::define_metric(MetricType::Gauge, names::VM_MEMORY_KIB).ok();
        }
        let Some(id) = self.memory else { return };
        if hostcalls::increment_metric(id, (kib - self.memory_reported_kib) as i64).is_ok() {
            self.memory_reported_kib = kib;
        }
    }

    pub fn flush(&mut self) {
        for (id, n) in self.pending.drain() {
            let _ = hostcalls::increment_metric(id, n);
        }
    }
}

impl Counters for Metrics {
    fn increment(&mut self, name: &str) {
        if let Some(id) = self.id(name) {
            *self.pending.entry(id).or_insert(0) += 1;
        }
    }
}
