//! `FakeHost`, the test double of `Host`: compiled for warden-core's own tests and, with the
//! `test-support` feature, for the fuzz targets and the native bench; never in the filter.

use std::collections::HashMap;

use super::Host;

/// Shared data of a fake proxy: clones of a `FakeHost` are VMs of the same proxy.
pub type SharedData = std::rc::Rc<std::cell::RefCell<HashMap<String, (Vec<u8>, u32)>>>;

/// An HTTP call a `FakeHost` was asked to make.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeCall {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
}

impl FakeCall {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A host for tests: fixed properties, a settable clock, deterministic "randomness", and HTTP
/// calls that are recorded (or refused, with `calls_fail`) for the test to answer.
#[derive(Debug, Default, Clone)]
pub struct FakeHost {
    pub properties: HashMap<String, Vec<u8>>,
    pub now_ms: u64,
    pub counter: u64,
    pub shared: SharedData,
    pub calls: Vec<FakeCall>,
    pub calls_fail: bool,
}

impl FakeHost {
    pub fn at(now_ms: u64) -> Self {
        // Each fake host draws its own sequence, as two proxies would.
        static SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let counter = SEED.fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed);
        Self { now_ms, counter, ..Default::default() }
    }

    pub fn with_property(mut self, path: &str, value: &str) -> Self {
        self.properties.insert(path.to_string(), value.as_bytes().to_vec());
        self
    }
}

impl Host for FakeHost {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.properties.get(&path.join(".")).cloned()
    }

    fn now_ms(&self) -> u64 {
        self.now_ms
    }

    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.borrow().get(key).cloned()
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let mut map = self.shared.borrow_mut();
        let current = map.get(key).map(|(_, c)| *c);
        if cas.is_some() && cas != current {
            return false;
        }
        map.insert(key.to_string(), (value.to_vec(), current.unwrap_or(0) + 1));
        true
    }

    fn http_call(&mut self, cluster: &str, headers: &[(&str, &str)], body: Option<&[u8]>, timeout_ms: u64) -> Result<u32, String> {
        if self.calls_fail {
            return Err(format!("no cluster {cluster}"));
        }
        let token = self.calls.len() as u32 + 1;
        self.calls.push(FakeCall {
            token,
            cluster: cluster.to_string(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.map(<[u8]>::to_vec),
            timeout_ms,
        });
        Ok(token)
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        for b in buf.iter_mut() {
            self.counter = self.counter.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *b = (self.counter >> 33) as u8;
        }
    }
}
