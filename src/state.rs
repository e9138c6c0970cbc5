//! Reading the answer of an HTTP call (state service, JWKS) from the host. What is called and
//! what the answers mean is warden-core's (`callouts`).

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};
use warden_core::callouts::Answer;

/// The status and body of a call's response; `None` when the call failed (zero headers: no
/// cluster, connection refused, timeout).
pub fn response(num_headers: usize, body_size: usize) -> Answer {
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
