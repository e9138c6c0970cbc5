//! MCP 2026-07-28 requests declare themselves in headers (`Mcp-Method`, `Mcp-Name`,
//! `MCP-Protocol-Version`) so that intermediaries can route and decide without the body. What the
//! headers declare is read here, and this is the one place the body is held to it: a request
//! whose headers and body disagree would be decided on one and executed on the other.

use ct_codecs::{Base64, Decoder, Encoder};

use super::{McpCall, McpRequest, Named, Phase};
use crate::host::Headers;

pub const METHOD_HEADER: &str = "mcp-method";
pub const NAME_HEADER: &str = "mcp-name";
pub const VERSION_HEADER: &str = "mcp-protocol-version";

/// The reason code of every refusal decided here (its rule follows it in `reasons`).
pub const MISMATCH: &str = "mcp_header_mismatch";

/// JSON-RPC codes the 2026-07-28 servers answer these refusals with (the MCP SDK's
/// `HEADER_MISMATCH`, and `INVALID_REQUEST` for a batch, which that revision no longer has).
pub const HEADER_MISMATCH_CODE: i64 = -32020;
pub const INVALID_REQUEST_CODE: i64 = -32600;

/// What the headers of a request declare. The name is decoded (`=?base64?…?=` for values that
/// are not plain visible ASCII), as the body carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    pub method: String,
    pub name: Option<String>,
    pub protocol_version: Option<String>,
}

/// Why headers and body (or the headers alone) cannot be believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disagreement {
    /// A routing header sent twice: first-copy and last-copy readers would disagree.
    DuplicateHeader,
    /// Not UTF-8, or an `=?base64?…?=` value that is not canonical base64 of UTF-8.
    HeaderUnreadable,
    Method,
    Name,
    ProtocolVersion,
    /// A JSON-RPC batch: headers declare one message.
    Batch,
}

impl Disagreement {
    /// The rule, after `mcp_header_mismatch` in the decision's reasons.
    pub fn rule(self) -> &'static str {
        match self {
            Self::DuplicateHeader => "duplicate_header",
            Self::HeaderUnreadable => "header_unreadable",
            Self::Method => "method",
            Self::Name => "name",
            Self::ProtocolVersion => "protocol_version",
            Self::Batch => "batch",
        }
    }

    pub fn from_rule(rule: &str) -> Option<Self> {
        [Self::DuplicateHeader, Self::HeaderUnreadable, Self::Method, Self::Name, Self::ProtocolVersion, Self::Batch]
            .into_iter()
            .find(|d| d.rule() == rule)
    }

    pub fn jsonrpc_code(self) -> i64 {
        match self {
            Self::Batch => INVALID_REQUEST_CODE,
            _ => HEADER_MISMATCH_CODE,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::DuplicateHeader => "an MCP routing header appears more than once",
            Self::HeaderUnreadable => "an MCP routing header cannot be decoded",
            Self::Method => "mcp-method header does not match the request body's method",
            Self::Name => "mcp-name header does not match the request body's name",
            Self::ProtocolVersion => "mcp-protocol-version header does not match the request envelope's protocol version",
            Self::Batch => "Body must be a single JSON-RPC request or notification object",
        }
    }
}

/// Whether the request declares itself in headers (an `Mcp-Method` header, in any form).
pub fn is_declared(headers: &Headers) -> bool {
    headers.get(METHOD_HEADER).is_some()
}

/// What the headers declare, or why they cannot be read.
pub fn declared(headers: &Headers) -> Result<Declared, Disagreement> {
    if [METHOD_HEADER, NAME_HEADER, VERSION_HEADER].iter().any(|h| headers.is_repeated(h)) {
        return Err(Disagreement::DuplicateHeader);
    }
    let text = |name: &str| -> Result<Option<&str>, Disagreement> {
        match headers.get(name) {
            None => Ok(None),
            Some(raw) => std::str::from_utf8(raw).map(Some).map_err(|_| Disagreement::HeaderUnreadable),
        }
    };
    let method = text(METHOD_HEADER)?.ok_or(Disagreement::HeaderUnreadable)?.to_string();
    let name = match text(NAME_HEADER)? {
        Some(v) => Some(decode_header_value(v).ok_or(Disagreement::HeaderUnreadable)?),
        None => None,
    };
    let protocol_version = text(VERSION_HEADER)?.map(str::to_string);
    Ok(Declared { method, name, protocol_version })
}

/// The inverse of the SDK's `encode_header_value`: verbatim, unless wrapped as `=?base64?…?=`,
/// whose payload must be canonical padded base64 of UTF-8 (anything else never matches a body).
pub fn decode_header_value(value: &str) -> Option<String> {
    let Some(payload) = value.strip_prefix("=?base64?").and_then(|v| v.strip_suffix("?=")) else {
        return Some(value.to_string());
    };
    let bytes = Base64::decode_to_vec(payload, None).ok()?;
    if Base64::encode_to_string(&bytes).ok()? != payload {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// What the policy decides on before the body: the declared call, as the body must carry it.
pub fn to_request(d: &Declared) -> McpRequest {
    let mut call = McpCall { method: d.method.clone(), protocol_version: d.protocol_version.clone(), ..Default::default() };
    let name = d.name.as_deref().map(super::bounded);
    match d.method.as_str() {
        "tools/call" => call.tool = name,
        "resources/read" => call.resource = name,
        "prompts/get" => call.prompt = name,
        _ => {}
    }
    McpRequest { calls: vec![call], batch: false, phase: Phase::Headers }
}

/// The rule: the body is one message, its method is the declared one, the name it carries (tool,
/// prompt or resource URI, for the methods whose name is mirrored) is the declared name, and
/// its `_meta` protocol version is the declared version. Stricter than the SDK's server in one
/// way: a declared name or version the body does not carry is a mismatch too, since the policy
/// would have decided on a name the call does not have.
pub fn agree(d: &Declared, body: &McpRequest) -> Result<(), Disagreement> {
    if body.batch {
        return Err(Disagreement::Batch);
    }
    let call = body.first().ok_or(Disagreement::Batch)?;
    if call.method != d.method {
        return Err(Disagreement::Method);
    }
    let same = |declared: Option<&str>, carried: &Named| match carried {
        Named::Absent => declared.is_none(),
        Named::Text(v) => declared == Some(v.as_str()),
        Named::Other => false,
    };
    if super::is_name_bearing(&call.method) && !same(d.name.as_deref(), &call.named) {
        return Err(Disagreement::Name);
    }
    if !same(d.protocol_version.as_deref(), &call.meta_version) {
        return Err(Disagreement::ProtocolVersion);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::parse;

    fn headers(pairs: &[(&str, &[u8])]) -> Headers {
        Headers::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_vec())))
    }

    fn call(method: &str, params: &str) -> Vec<u8> {
        format!(r#"{{"jsonrpc":"2.0","id":3,"method":"{method}","params":{params}}}"#).into_bytes()
    }

    const META: &str = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"agent","version":"1.2"}}"#;

    fn check(h: &[(&str, &[u8])], body: &[u8]) -> Result<(), Disagreement> {
        agree(&declared(&headers(h))?, &parse(body).unwrap())
    }

    #[test]
    fn header_values_decode_as_the_sdk_encodes_them() {
        assert_eq!(decode_header_value("search").as_deref(), Some("search"));
        // "søk" as the SDK's encode_header_value writes it.
        assert_eq!(decode_header_value("=?base64?c8O4aw==?=").as_deref(), Some("søk"));
        assert_eq!(decode_header_value("=?base64?c8O4aw?=").as_deref(), None, "unpadded is not canonical");
        assert_eq!(decode_header_value("=?base64?c8O4aw=x?=").as_deref(), None);
        assert_eq!(decode_header_value("=?base64?c8O4ax==?=").as_deref(), None, "non-zero trailing bits are not canonical");
        assert_eq!(decode_header_value("=?base64?/w==?=").as_deref(), None, "not UTF-8");
        assert_eq!(decode_header_value("=?base64??=").as_deref(), Some(""));
    }

    #[test]
    fn headers_and_body_must_agree() {
        let v = &b"2026-07-28"[..];
        let ok = call("tools/call", &format!(r#"{{"name":"search","arguments":{{}},{META}}}"#));
        let base: &[(&str, &[u8])] = &[("mcp-method", b"tools/call"), ("mcp-name", b"search"), ("mcp-protocol-version", v)];
        assert_eq!(check(base, &ok), Ok(()));
        assert_eq!(check(&[("mcp-method", b"tools/list"), ("mcp-name", b"search"), ("mcp-protocol-version", v)], &ok), Err(Disagreement::Method));
        assert_eq!(check(&[("mcp-method", b"tools/call"), ("mcp-name", b"shell.exec"), ("mcp-protocol-version", v)], &ok), Err(Disagreement::Name));
        assert_eq!(check(&[("mcp-method", b"tools/call"), ("mcp-protocol-version", v)], &ok), Err(Disagreement::Name));
        assert_eq!(check(&[("mcp-method", b"tools/call"), ("mcp-name", b"search"), ("mcp-protocol-version", b"2025-11-25")], &ok), Err(Disagreement::ProtocolVersion));
        assert_eq!(check(&[("mcp-method", b"tools/call"), ("mcp-name", b"search")], &ok), Err(Disagreement::ProtocolVersion));
        // A name the body does not carry, or carries as a number, is never believed.
        let nameless = call("tools/call", &format!("{{{META}}}"));
        assert_eq!(check(base, &nameless), Err(Disagreement::Name));
        let numeric = call("tools/call", &format!(r#"{{"name":5,{META}}}"#));
        assert_eq!(check(&[("mcp-method", b"tools/call"), ("mcp-name", b"5"), ("mcp-protocol-version", v)], &numeric), Err(Disagreement::Name));
        // Resources and prompts are named by uri and name.
        let read = call("resources/read", &format!(r#"{{"uri":"file:///a b",{META}}}"#));
        assert_eq!(check(&[("mcp-method", b"resources/read"), ("mcp-name", b"file:///a b"), ("mcp-protocol-version", v)], &read), Ok(()));
        let prompt = call("prompts/get", &format!(r#"{{"name":"søk",{META}}}"#));
        assert_eq!(check(&[("mcp-method", b"prompts/get"), ("mcp-name", b"=?base64?c8O4aw==?="), ("mcp-protocol-version", v)], &prompt), Ok(()));
        assert_eq!(check(&[("mcp-method", b"prompts/get"), ("mcp-name", b"s\xc3\xb8k"), ("mcp-protocol-version", v)], &prompt), Ok(()), "raw UTF-8 is read as is");
        // A name on a method that names nothing is not compared (as the SDK's server does).
        let list = call("tools/list", &format!("{{{META}}}"));
        assert_eq!(check(&[("mcp-method", b"tools/list"), ("mcp-name", b"x"), ("mcp-protocol-version", v)], &list), Ok(()));
        // A batch cannot agree with the headers of one message.
        let batch = format!("[{}]", String::from_utf8(ok.clone()).unwrap()).into_bytes();
        assert_eq!(check(base, &batch), Err(Disagreement::Batch));
    }

    #[test]
    fn headers_alone_can_be_unbelievable() {
        let dup = headers(&[("mcp-method", b"tools/call"), ("mcp-name", b"search"), ("mcp-name", b"search")]);
        assert_eq!(declared(&dup), Err(Disagreement::DuplicateHeader));
        let dup = headers(&[("mcp-method", b"tools/call"), ("mcp-method", b"tools/list")]);
        assert_eq!(declared(&dup), Err(Disagreement::DuplicateHeader));
        assert_eq!(declared(&headers(&[("mcp-method", b"\xff")])), Err(Disagreement::HeaderUnreadable));
        assert_eq!(declared(&headers(&[("mcp-method", b"tools/call"), ("mcp-name", b"=?base64?%%%?=")])), Err(Disagreement::HeaderUnreadable));
        let d = declared(&headers(&[("mcp-method", b"tools/call"), ("mcp-name", b"=?base64?c8O4aw==?=")])).unwrap();
        let r = to_request(&d);
        assert_eq!((r.calls[0].tool.as_deref(), r.phase), (Some("søk"), Phase::Headers));
        for d in [Disagreement::DuplicateHeader, Disagreement::HeaderUnreadable, Disagreement::Method, Disagreement::Name, Disagreement::ProtocolVersion, Disagreement::Batch] {
            assert_eq!(Disagreement::from_rule(d.rule()), Some(d));
        }
    }
}
