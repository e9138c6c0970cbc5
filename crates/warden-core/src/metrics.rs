//! Counter names. Envoy shows them under `wasmcustom.` in `/stats` and as
//! `warden_…` on its Prometheus endpoint (Envoy drops the `wasmcustom` prefix there).

pub const REQUESTS: &str = "warden.requests";
pub const JWT_CACHE_HIT: &str = "warden.jwt_cache.hit";
pub const JWT_CACHE_MISS: &str = "warden.jwt_cache.miss";
pub const POLICY_ERRORS: &str = "warden.policy_errors";
pub const SESSIONS_NEW: &str = "warden.sessions.new";
pub const SESSION_BINDING_VIOLATIONS: &str = "warden.sessions.binding_violations";
pub const JWKS_FETCH_OK: &str = "warden.jwks.fetch_ok";
pub const JWKS_FETCH_FAILED: &str = "warden.jwks.fetch_failed";
pub const STATE_UNAVAILABLE: &str = "warden.state.unavailable";
/// The service answered a begin-step with a 4xx: the request was refused (`session_state_refused`).
pub const STATE_REFUSED: &str = "warden.state.refused";
pub const RECORDS_SENT: &str = "warden.records.sent";
pub const RECORDS_RETRIED: &str = "warden.records.retried";
pub const RECORDS_DROPPED: &str = "warden.records.dropped";
/// Records the service refused one by one (after their batch was split): set aside, logged.
pub const RECORDS_REJECTED: &str = "warden.records.rejected";
pub const REVOCATIONS_APPLIED: &str = "warden.revocations.applied";
pub const CANDIDATE_EVALUATIONS: &str = "warden.candidate.evaluations";
pub const CANDIDATE_DISAGREEMENTS: &str = "warden.candidate.disagreements";
/// Requests refused for an ambiguous or malformed path (`path_ambiguous`).
pub const PATHS_REFUSED: &str = "warden.paths.refused";

/// A gauge, not a counter: the linear memory (KiB) of every VM running the filter in this proxy,
/// summed (each VM adds its own growth). Wasm memory never shrinks, so a soak reads it to see
/// whether the VM heap keeps growing under steady load.
pub const VM_MEMORY_KIB: &str = "warden.vm.memory_kib";

/// `warden.decisions.<action>`: what was enforced.
pub fn decision(action: &str) -> String {
    format!("warden.decisions.{action}")
}

/// `warden.shadow.<action>`: what shadow mode would have done but did not.
pub fn shadow(action: &str) -> String {
    format!("warden.shadow.{action}")
}

/// `warden.identity_failures.<reason>`.
pub fn identity_failure(reason: &str) -> String {
    format!("warden.identity_failures.{reason}")
}

/// Where counts go: the proxy's metrics (flushed to the host on the tick), or a list in tests.
pub trait Counters {
    fn increment(&mut self, name: &str);
}

impl Counters for Vec<String> {
    fn increment(&mut self, name: &str) {
        self.push(name.to_string());
    }
}
