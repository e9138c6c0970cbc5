//! MCP (Model Context Protocol) over Streamable HTTP: JSON-RPC POSTs. What a session policy
//! needs of a message: the method, the tool, resource or prompt it names, a digest of the
//! arguments (never the arguments themselves), and the protocol version and client the message
//! says it comes from. What 2026-07-28 requests declare in headers is `declared.rs`.

pub mod declared;

use regorus::Value;
use serde_json::Value as Json;

use crate::hash::{hex, sha256};
use crate::value::{opt_s, s, Obj};

/// One JSON-RPC message of an MCP request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct McpCall {
    pub method: String,
    /// `id` as JSON text; `None` for a notification.
    pub id: Option<String>,
    pub tool: Option<String>,
    pub resource: Option<String>,
    pub prompt: Option<String>,
    /// `sha256:` + hex of the canonical JSON of `params.arguments` (keys sorted).
    pub arguments_digest: Option<String>,
    /// `_meta`'s protocol version (2026-07-28), `initialize`'s, or the `MCP-Protocol-Version`
    /// header of a handshake-era request.
    pub protocol_version: Option<String>,
    /// `_meta`'s client info (2026-07-28), or `initialize`'s.
    pub client: Option<ClientInfo>,
    /// The name parameter as the body carries it, uncut, for holding it to the `Mcp-Name` header.
    pub named: Named,
    /// `_meta`'s protocol version as the body carries it, for holding it to the header.
    pub meta_version: Named,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientInfo {
    pub name: Option<String>,
    pub version: Option<String>,
}

/// A string parameter of the body: absent (or null), a string, or something else.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Named {
    #[default]
    Absent,
    Text(String),
    Other,
}

/// What the policy decides on: the headers' declaration (2026-07-28, before the body), or the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Headers,
    Body,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Headers => "headers",
            Self::Body => "body",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct McpRequest {
    pub calls: Vec<McpCall>,
    pub batch: bool,
    pub phase: Phase,
}

impl McpRequest {
    /// The call the session is judged on: a batch is judged on every item, and the policy sees
    /// all of them; the first item's method and tool are the request's headline.
    pub fn first(&self) -> Option<&McpCall> {
        self.calls.first()
    }

    /// Tools this request calls, in order.
    pub fn tools(&self) -> impl Iterator<Item = &str> {
        self.calls.iter().filter_map(|c| c.tool.as_deref())
    }

    /// A handshake-era client names its protocol version in a header after `initialize`.
    pub fn version_from_header(&mut self, header: Option<&str>) {
        let Some(v) = header else { return };
        for c in self.calls.iter_mut().filter(|c| c.protocol_version.is_none()) {
            c.protocol_version = Some(bounded(v));
        }
    }
}

/// How much of a name, version or client string the policy and the trail get.
const MAX_TEXT_CHARS: usize = 512;

pub(crate) fn bounded(v: &str) -> String {
    v.chars().take(MAX_TEXT_CHARS).collect()
}

const PROTOCOL_VERSION_META_KEY: &str = "io.modelcontextprotocol/protocolVersion";
const CLIENT_INFO_META_KEY: &str = "io.modelcontextprotocol/clientInfo";

/// Why an MCP body was not accepted (400 with this reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McpError {
    NotJson,
    NotJsonRpc,
    EmptyBatch,
    TooManyItems,
}

impl McpError {
    pub fn code(self) -> &'static str {
        match self {
            Self::NotJson => "mcp_body_not_json",
            Self::NotJsonRpc => "mcp_body_not_jsonrpc",
            Self::EmptyBatch => "mcp_batch_empty",
            Self::TooManyItems => "mcp_batch_too_large",
        }
    }
}

const MAX_BATCH: usize = 64;

pub fn parse(body: &[u8]) -> Result<McpRequest, McpError> {
    let doc: Json = serde_json::from_slice(body).map_err(|_| McpError::NotJson)?;
    match doc {
        Json::Array(items) => {
            if items.is_empty() {
                return Err(McpError::EmptyBatch);
            }
            if items.len() > MAX_BATCH {
                return Err(McpError::TooManyItems);
            }
            let calls = items.iter().map(call).collect::<Result<Vec<_>, _>>()?;
            Ok(McpRequest { calls, batch: true, phase: Phase::Body })
        }
        other => Ok(McpRequest { calls: vec![call(&other)?], batch: false, phase: Phase::Body }),
    }
}

fn call(msg: &Json) -> Result<McpCall, McpError> {
    let obj = msg.as_object().ok_or(McpError::NotJsonRpc)?;
    if obj.get("jsonrpc").and_then(Json::as_str) != Some("2.0") {
        return Err(McpError::NotJsonRpc);
    }
    // A response or error from the client (e.g. to a server's sampling request) has no method.
    let method = match obj.get("method") {
        Some(Json::String(m)) => m.clone(),
        None if obj.contains_key("result") || obj.contains_key("error") => "(response)".to_string(),
        _ => return Err(McpError::NotJsonRpc),
    };
    let id = obj.get("id").map(Json::to_string);
    let params = obj.get("params");
    let param = |name: &str| params.and_then(|p| p.get(name)).and_then(Json::as_str).map(bounded);
    let (tool, resource, prompt) = match method.as_str() {
        "tools/call" => (param("name"), None, None),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => (None, param("uri"), None),
        "prompts/get" => (None, None, param("name")),
        _ => (None, None, None),
    };
    let arguments_digest = params.and_then(|p| p.get("arguments")).map(|a| {
        // serde_json's maps are ordered by key, so this text is canonical.
        format!("sha256:{}", hex(&sha256(a.to_string().as_bytes())))
    });
    // The name the 2026-07-28 `Mcp-Name` header mirrors (the SDK's NAME_BEARING_METHODS).
    let named = match method.as_str() {
        "tools/call" | "prompts/get" => string_param(params.and_then(|p| p.get("name"))),
        "resources/read" => string_param(params.and_then(|p| p.get("uri"))),
        _ => Named::Absent,
    };
    let meta = params.and_then(|p| p.get("_meta"));
    let meta_version = string_param(meta.and_then(|m| m.get(PROTOCOL_VERSION_META_KEY)));
    // A handshake-era client says who it is once, in `initialize`.
    let handshake = (method == "initialize").then_some(params).flatten();
    let protocol_version = match &meta_version {
        Named::Text(v) => Some(bounded(v.as_str())),
        _ => handshake.and_then(|p| p.get("protocolVersion")).and_then(Json::as_str).map(bounded),
    };
    let client = meta.and_then(|m| m.get(CLIENT_INFO_META_KEY)).or_else(|| handshake.and_then(|p| p.get("clientInfo"))).and_then(client_info);
    Ok(McpCall { method, id, tool, resource, prompt, arguments_digest, protocol_version, client, named, meta_version })
}

/// Methods whose name (tool, prompt, resource URI) a 2026-07-28 client mirrors in `Mcp-Name`.
pub fn is_name_bearing(method: &str) -> bool {
    matches!(method, "tools/call" | "prompts/get" | "resources/read")
}

fn string_param(v: Option<&Json>) -> Named {
    match v {
        None | Some(Json::Null) => Named::Absent,
        Some(Json::String(s)) => Named::Text(s.clone()),
        Some(_) => Named::Other,
    }
}

fn client_info(v: &Json) -> Option<ClientInfo> {
    let text = |k: &str| v.get(k).and_then(Json::as_str).map(bounded);
    v.is_object().then(|| ClientInfo { name: text("name"), version: text("version") })
}

fn call_value(c: &McpCall) -> Value {
    Obj::new()
        .set("method", s(&c.method))
        .set("tool", opt_s(c.tool.as_deref()))
        .set("resource", opt_s(c.resource.as_deref()))
        .set("prompt", opt_s(c.prompt.as_deref()))
        .set("arguments_digest", opt_s(c.arguments_digest.as_deref()))
        .set("protocol_version", opt_s(c.protocol_version.as_deref()))
        .set(
            "client",
            c.client.as_ref().map_or(Value::Null, |ci| Obj::new().set("name", opt_s(ci.name.as_deref())).set("version", opt_s(ci.version.as_deref())).build()),
        )
        .build()
}

/// `input.request.mcp`: the first call's fields at the top, every call under `calls`.
pub fn to_value(req: &McpRequest) -> Value {
    let mut obj = match req.first() {
        Some(first) => match call_value(first) {
            Value::Object(o) => (*o).clone(),
            _ => Default::default(),
        },
        None => Default::default(),
    };
    obj.insert(Value::from("batch"), Value::from(req.batch));
    obj.insert(Value::from("phase"), Value::from(req.phase.as_str()));
    obj.insert(Value::from("calls"), Value::from(req.calls.iter().map(call_value).collect::<Vec<_>>()));
    Value::from(obj)
}

/// The JSON-RPC error a refusal is answered with, if it has one: a policy's refusal (403) as
/// `-32001` to every call, a header/body mismatch as the code a 2026-07-28 server answers it
/// with, to the one message (`id` null for a batch, as the SDK's server does). Other refusals
/// (step-up, throttle, a body that is not JSON-RPC) stay plain HTTP.
pub fn refusal(req: &McpRequest, status: u32, reasons: &[String], message: &str, data: Json) -> Option<Json> {
    if status == 403 {
        return Some(jsonrpc_error(req, -32001, &format!("refused by session policy: {message}"), data));
    }
    let (first, rule) = (reasons.first()?, reasons.get(1)?);
    let why = declared::Disagreement::from_rule(rule).filter(|_| first == declared::MISMATCH)?;
    let one = match why {
        declared::Disagreement::Batch => McpRequest { calls: vec![McpCall::default()], batch: false, phase: req.phase },
        _ => McpRequest { calls: req.calls.iter().take(1).cloned().collect(), batch: false, phase: req.phase },
    };
    Some(jsonrpc_error(&one, why.jsonrpc_code(), why.message(), data))
}

/// A JSON-RPC error answer for a refused MCP request, so MCP clients surface the refusal as an
/// ordinary error instead of a transport failure.
pub fn jsonrpc_error(req: &McpRequest, code: i64, message: &str, data: Json) -> Json {
    let error = |id: Option<&str>| {
        let id: Json = id.and_then(|i| serde_json::from_str(i).ok()).unwrap_or(Json::Null);
        serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message, "data": data}})
    };
    if req.batch {
        Json::Array(req.calls.iter().filter(|c| c.id.is_some()).map(|c| error(c.id.as_deref())).collect())
    } else {
        error(req.first().and_then(|c| c.id.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_call_is_understood() {
        let r = parse(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_ticket","arguments":{"b":2,"a":1}}}"#).unwrap();
        let c = r.first().unwrap();
        assert_eq!((c.method.as_str(), c.tool.as_deref(), c.id.as_deref()), ("tools/call", Some("create_ticket"), Some("7")));
        // Key order does not change the digest.
        let r2 = parse(br#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"create_ticket","arguments":{"a":1,"b":2}}}"#).unwrap();
        assert_eq!(c.arguments_digest, r2.first().unwrap().arguments_digest);
        assert!(c.arguments_digest.as_deref().unwrap().starts_with("sha256:"));
    }

    #[test]
    fn resources_prompts_batches_and_notifications() {
        let r = parse(br#"[{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///etc/x"}},{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"p"}}]"#).unwrap();
        assert!(r.batch);
        assert_eq!(r.calls[0].resource.as_deref(), Some("file:///etc/x"));
        assert_eq!(r.calls[1].id, None);
        assert_eq!(r.calls[2].prompt.as_deref(), Some("p"));
        let err = jsonrpc_error(&r, -32001, "no", Json::Null);
        assert_eq!(err.as_array().unwrap().len(), 2, "notifications get no answer");
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert_eq!(parse(b"not json"), Err(McpError::NotJson));
        assert_eq!(parse(b"[]"), Err(McpError::EmptyBatch));
        assert_eq!(parse(br#"{"id":1,"method":"x"}"#), Err(McpError::NotJsonRpc));
        assert_eq!(parse(br#"{"jsonrpc":"2.0","id":1,"method":5}"#), Err(McpError::NotJsonRpc));
        assert_eq!(parse(b"42"), Err(McpError::NotJsonRpc));
    }
}
