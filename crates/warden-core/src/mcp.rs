//! MCP (Model Context Protocol) over Streamable HTTP: JSON-RPC POSTs. What a session policy
//! needs of a message: the method, the tool, resource or prompt it names, and a digest of the
//! arguments (never the arguments themselves).

use regorus::Value;
use serde_json::Value as Json;

use crate::hash::{hex, sha256};
use crate::value::{opt_s, s, Obj};

/// One JSON-RPC message of an MCP request.
#[derive(Debug, Clone, PartialEq)]
pub struct McpCall {
    pub method: String,
    /// `id` as JSON text; `None` for a notification.
    pub id: Option<String>,
    pub tool: Option<String>,
    pub resource: Option<String>,
    pub prompt: Option<String>,
    /// `sha256:` + hex of the canonical JSON of `params.arguments` (keys sorted).
    pub arguments_digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct McpRequest {
    pub calls: Vec<McpCall>,
    pub batch: bool,
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
}

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
            Ok(McpRequest { calls, batch: true })
        }
        other => Ok(McpRequest { calls: vec![call(&other)?], batch: false }),
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
    let param = |name: &str| params.and_then(|p| p.get(name)).and_then(Json::as_str).map(|v| v.chars().take(512).collect::<String>());
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
    Ok(McpCall { method, id, tool, resource, prompt, arguments_digest })
}

fn call_value(c: &McpCall) -> Value {
    Obj::new()
        .set("method", s(&c.method))
        .set("tool", opt_s(c.tool.as_deref()))
        .set("resource", opt_s(c.resource.as_deref()))
        .set("prompt", opt_s(c.prompt.as_deref()))
        .set("arguments_digest", opt_s(c.arguments_digest.as_deref()))
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
    obj.insert(Value::from("calls"), Value::from(req.calls.iter().map(call_value).collect::<Vec<_>>()));
    Value::from(obj)
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
