//! The little the core needs from its host. The proxy-wasm crate implements it over Envoy's
//! host calls; `FakeHost` (in `fake.rs`) implements it for tests.

use std::collections::HashMap;

pub trait Host {
    /// An Envoy attribute (`source.address`, `connection.uri_san_peer_certificate`, …) as raw bytes.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Wall-clock time, milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// Cryptographically random bytes (WASI `random_get` in the proxy).
    fn fill_random(&mut self, buf: &mut [u8]);
    /// Shared data (all VMs of the plugin in this proxy): value and its CAS version.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Set shared data if its version is still `cas` (None: unconditionally). False on a lost race.
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
    /// Start an HTTP call to one of the proxy's clusters; its answer comes back later, under the
    /// returned token, to whoever made the call. `Err` when it cannot even start (no such cluster).
    fn http_call(&mut self, cluster: &str, headers: &[(&str, &str)], body: Option<&[u8]>, timeout_ms: u64) -> Result<u32, String>;
}

/// Request headers by lower-case name, values as raw bytes: a header value is not guaranteed to
/// be UTF-8, and reading it as a string must never trap the VM.
#[derive(Debug, Default, Clone)]
pub struct Headers {
    map: HashMap<String, Vec<u8>>,
    /// Names sent more than once with different values.
    conflicting: Vec<String>,
    /// Names sent more than once, whatever the values.
    repeated: Vec<String>,
}

impl Headers {
    pub fn from_pairs<I: IntoIterator<Item = (String, Vec<u8>)>>(pairs: I) -> Self {
        let mut map: HashMap<String, Vec<u8>> = HashMap::new();
        let mut conflicting = Vec::new();
        let mut repeated = Vec::new();
        for (k, v) in pairs {
            // The first value wins; a repeated credential header cannot smuggle a second one.
            // A repeat with another value is remembered: where it matters (the session id) the
            // request is ambiguous, since the upstream may act on either value.
            let k = k.to_ascii_lowercase();
            if map.contains_key(&k) && !repeated.contains(&k) {
                repeated.push(k.clone());
            }
            match map.get(&k) {
                Some(first) if *first != v && !conflicting.contains(&k) => conflicting.push(k),
                Some(_) => {}
                None => {
                    map.insert(k, v);
                }
            }
        }
        Self { map, conflicting, repeated }
    }

    /// Whether `name` was sent more than once, with the same value or not.
    pub fn is_repeated(&self, name: &str) -> bool {
        self.repeated.iter().any(|n| n == name)
    }

    /// Whether `name` was sent more than once with different values.
    pub fn is_conflicting(&self, name: &str) -> bool {
        self.conflicting.iter().any(|n| n == name)
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.map.get(name).map(Vec::as_slice)
    }

    /// The value as text, if it is valid UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }
}

#[cfg(any(test, feature = "test-support"))]
mod fake;
#[cfg(any(test, feature = "test-support"))]
pub use fake::{FakeCall, FakeHost, SharedData};
