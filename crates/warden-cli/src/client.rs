//! A small blocking client for the state service's admin API. Errors say what to do.

use serde::de::DeserializeOwned;
use serde::Serialize;
use warden_core::wire::ErrorBody;

pub struct Client {
    base: String,
    auth: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .new_agent();
        Self { base: base.trim_end_matches('/').to_string(), auth: format!("Bearer {token}"), agent }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let resp = self.agent.get(&format!("{}{path}", self.base)).header("authorization", &self.auth).call();
        self.read(resp)
    }

    /// A text answer (a signed checkpoint).
    pub fn get_text(&self, path: &str) -> Result<String, String> {
        let resp = self.agent.get(&format!("{}{path}", self.base)).header("authorization", &self.auth).call();
        self.read_with(resp, |t| Ok(t.to_string()))
    }

    /// `Ok(None)` when the service answers 503 (it has no log key), for the commands that work
    /// without the log's evidence and say so.
    pub fn get_optional<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, String> {
        let resp = self.agent.get(&format!("{}{path}", self.base)).header("authorization", &self.auth).call();
        match self.read::<T>(resp) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.starts_with("HTTP 503") => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, String> {
        let resp = self.agent.post(&format!("{}{path}", self.base)).header("authorization", &self.auth).send_json(body);
        self.read(resp)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let resp = self.agent.delete(&format!("{}{path}", self.base)).header("authorization", &self.auth).call();
        self.read(resp)
    }

    fn read<T: DeserializeOwned>(&self, resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<T, String> {
        self.read_with(resp, |text| serde_json::from_str(text).map_err(|e| format!("unexpected answer from the service: {e}")))
    }

    fn read_with<T>(&self, resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, String> {
        let mut resp = resp.map_err(|e| format!("cannot reach the state service at {} ({e}): is it running? set WARDEN_STATE_URL or --url", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(|e| format!("unreadable answer: {e}"))?;
        if status != 200 {
            let msg = serde_json::from_str::<ErrorBody>(&text).map(|e| e.message).unwrap_or(text);
            return Err(match status {
                401 => format!("the service refused the token ({msg}): set WARDEN_ADMIN_TOKEN to the admin token"),
                403 => format!("this token may not do that ({msg}): use the admin token, not the proxy token"),
                404 => format!("not found: {msg}"),
                _ => format!("HTTP {status}: {msg}"),
            });
        }
        parse(&text)
    }
}

/// Percent-encode a path segment or query value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
