//! The contract test: `openapi.yaml` checked against what the service really does.
//!
//! The API tests' clients hand every exchange to [`check`], which finds the spec's operation for
//! the method and concrete path (path templates matched as OpenAPI matches them) and checks:
//! - the status is documented for that operation, and the body validates against that status'
//!   schema for the response's media type (JSON, or text/plain as a JSON string);
//! - the token: a 2xx (or 404, 5xx) only with a token the operation's `security` lists, 401 only
//!   without a known token, 403 only with a known token it does not list;
//! - a request the service took (any status but a refusal: 400, 401, 403, 405, 413, 415, 422):
//!   its body validates against the operation's `requestBody` schema, its path and query
//!   parameters against theirs, and it sends no undocumented query parameter. Requests a test
//!   makes invalid on purpose are refused, so only their status and answer are checked.
//!
//! [`assert_exercised`] runs the test binary again and asserts every operation got a documented
//! 2xx in that run, so the spec cannot drift in the other direction either. A mismatch names the
//! operation, the status and the JSON pointer of the value that does not match.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{LazyLock, Mutex};

use jsonschema::{Draft, Registry, Validator};
use serde_json::{json, Value};

const SPEC_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
/// The spec's URI in the schema registry: every schema is compiled as a `$ref` into it.
const SPEC_URI: &str = "urn:warden-state:openapi";
/// Set in the run `assert_exercised` starts: where each exchange's (operation, status) goes.
const TALLY_ENV: &str = "WARDEN_CONTRACT_TALLY";
/// Statuses of requests the service (or axum) refused: their bodies need not match the spec.
const REFUSALS: [u16; 7] = [400, 401, 403, 405, 413, 415, 422];

/// Who sent a request, as the operations' `security` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// No `Authorization` header.
    Anonymous,
    /// A bearer token the service does not know.
    Unknown,
    /// A token of one of the spec's security schemes (`proxy`, `admin`, `log`).
    Role(&'static str),
}

/// One request and its answer, as a test client sent and got it.
pub struct Exchange<'a> {
    pub method: &'a str,
    /// Path and query, as sent (percent-encoded).
    pub uri: &'a str,
    pub caller: Caller,
    /// The request's Content-Type and body, if it had one.
    pub request: Option<(&'a str, &'a [u8])>,
    pub status: u16,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

struct Spec {
    ops: Vec<Operation>,
    unknown_endpoint: Response,
}

struct Operation {
    method: String,
    template: String,
    segments: Vec<Segment>,
    /// The security schemes any one of which opens it; empty: open to anyone.
    security: Vec<String>,
    params: Vec<Param>,
    request: Option<RequestBody>,
    responses: BTreeMap<u16, Response>,
}

enum Segment {
    Literal(String),
    Param(String),
}

struct Param {
    name: String,
    in_path: bool,
    required: bool,
    /// Query values are text: those of an integer parameter are validated as numbers.
    integer: bool,
    schema: Validator,
}

struct RequestBody {
    required: bool,
    media: BTreeMap<String, Validator>,
}

struct Response {
    /// Media type -> schema; empty when the response has no body.
    media: BTreeMap<String, Validator>,
}

impl Operation {
    fn key(&self) -> String {
        format!("{} {}", self.method, self.template)
    }
}

static SPEC: LazyLock<Spec> = LazyLock::new(|| load().unwrap_or_else(|e| panic!("{SPEC_FILE}: {e}")));

/// Statuses seen per operation key (`fallback` for paths the spec does not have).
static SEEN: LazyLock<Mutex<BTreeSet<(String, u16)>>> = LazyLock::new(Default::default);

// ------------------------------------------------------------------------------ loading

fn load() -> Result<Spec, String> {
    let text = std::fs::read_to_string(SPEC_FILE).map_err(|e| e.to_string())?;
    let doc: Value = yaml_serde::from_str(&text).map_err(|e| format!("not YAML: {e}"))?;
    let registry = Registry::new().draft(Draft::Draft202012).add(SPEC_URI, doc.clone()).and_then(|r| r.prepare()).map_err(|e| e.to_string())?;
    let l = Loader { doc: &doc, registry: &registry };
    let mut ops = Vec::new();
    for (template, item) in doc["paths"].as_object().ok_or("no paths")? {
        let item_ptr = format!("/paths/{}", escape(template));
        let shared = item.get("parameters").cloned().unwrap_or(json!([]));
        for (method, op) in item.as_object().ok_or("a path item is not an object")? {
            if !["get", "put", "post", "delete", "options", "head", "patch", "trace"].contains(&method.as_str()) {
                continue;
            }
            let op_ptr = format!("{item_ptr}/{method}");
            let name = format!("{} {template}", method.to_uppercase());
            ops.push(l.operation(template, method, op, &op_ptr, &shared, &item_ptr).map_err(|e| format!("{name}: {e}"))?);
        }
    }
    let unknown_endpoint = l.response("/components/responses/UnknownEndpoint")?;
    Ok(Spec { ops, unknown_endpoint })
}

struct Loader<'a> {
    doc: &'a Value,
    registry: &'a Registry<'a>,
}

impl Loader<'_> {
    /// The value at `ptr`, following `$ref`s (local ones: the spec is one file); and its pointer.
    fn resolve(&self, mut ptr: String) -> Result<(String, &Value), String> {
        for _ in 0..16 {
            let v = self.doc.pointer(&ptr).ok_or_else(|| format!("nothing at #{ptr}"))?;
            match v.get("$ref").and_then(Value::as_str) {
                Some(r) => ptr = r.strip_prefix('#').ok_or_else(|| format!("{r}: only local references"))?.to_string(),
                None => return Ok((ptr, v)),
            }
        }
        Err(format!("#{ptr}: a cycle of references"))
    }

    fn schema(&self, ptr: &str) -> Result<Validator, String> {
        let wrapper = json!({"$ref": format!("{SPEC_URI}#{}", percent_encode(ptr))});
        jsonschema::options().with_draft(Draft::Draft202012).with_registry(self.registry).build(&wrapper).map_err(|e| format!("the schema at #{ptr}: {e}"))
    }

    fn media(&self, ptr: &str) -> Result<BTreeMap<String, Validator>, String> {
        let mut out = BTreeMap::new();
        if let Some(content) = self.doc.pointer(ptr).and_then(Value::as_object) {
            for (media, m) in content {
                if m.get("schema").is_none() {
                    return Err(format!("#{ptr}/{media}: no schema"));
                }
                out.insert(media.to_ascii_lowercase(), self.schema(&format!("{ptr}/{}/schema", escape(media)))?);
            }
        }
        Ok(out)
    }

    fn response(&self, ptr: &str) -> Result<Response, String> {
        let (ptr, _) = self.resolve(ptr.to_string())?;
        Ok(Response { media: self.media(&format!("{ptr}/content"))? })
    }

    fn operation(&self, template: &str, method: &str, op: &Value, op_ptr: &str, shared: &Value, item_ptr: &str) -> Result<Operation, String> {
        let security = match op.get("security").or_else(|| self.doc.get("security")) {
            Some(list) => list.as_array().ok_or("security is not a list")?.iter().flat_map(|req| req.as_object().into_iter().flat_map(|o| o.keys().cloned())).collect(),
            None => Vec::new(),
        };
        let mut params = Vec::new();
        // The operation's own first: they override the path item's of the same name (OpenAPI).
        let lists = [(op.get("parameters").unwrap_or(&Value::Null), format!("{op_ptr}/parameters")), (shared, format!("{item_ptr}/parameters"))];
        for (list, ptr) in lists {
            for i in 0..list.as_array().map_or(0, Vec::len) {
                let (p_ptr, p) = self.resolve(format!("{ptr}/{i}"))?;
                let name = p["name"].as_str().ok_or("a parameter without a name")?.to_string();
                let location = p["in"].as_str().unwrap_or_default();
                if params.iter().any(|q: &Param| q.name == name && q.in_path == (location == "path")) {
                    continue;
                }
                if location != "path" && location != "query" {
                    return Err(format!("parameter {name}: only path and query parameters are checked"));
                }
                // A schema's `$ref` is compiled with its siblings, not followed like a Reference Object's.
                let s_ptr = format!("{p_ptr}/schema");
                params.push(Param {
                    integer: self.is_integer(&s_ptr),
                    in_path: location == "path",
                    required: p["required"].as_bool().unwrap_or(false),
                    schema: self.schema(&s_ptr)?,
                    name,
                });
            }
        }
        let request = match op.get("requestBody") {
            None => None,
            Some(_) => {
                let (ptr, body) = self.resolve(format!("{op_ptr}/requestBody"))?;
                Some(RequestBody { required: body["required"].as_bool().unwrap_or(false), media: self.media(&format!("{ptr}/content"))? })
            }
        };
        let mut responses = BTreeMap::new();
        for status in op["responses"].as_object().ok_or("no responses")?.keys() {
            let code = status.parse::<u16>().map_err(|_| format!("response {status:?}: only explicit statuses (no `default`, no ranges)"))?;
            responses.insert(code, self.response(&format!("{op_ptr}/responses/{status}"))?);
        }
        let segments = template
            .split('/')
            .skip(1)
            .map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => Segment::Param(name.to_string()),
                None => Segment::Literal(s.to_string()),
            })
            .collect::<Vec<_>>();
        for s in &segments {
            if let Segment::Param(name) = s {
                if !params.iter().any(|p| p.in_path && &p.name == name) {
                    return Err(format!("path parameter {name} is not declared"));
                }
            }
        }
        Ok(Operation { method: method.to_uppercase(), template: template.to_string(), segments, security, params, request, responses })
    }

    /// The schema at `ptr` (or the one it refers to) is of type integer.
    fn is_integer(&self, ptr: &str) -> bool {
        let mut ptr = ptr.to_string();
        for _ in 0..16 {
            let Some(s) = self.doc.pointer(&ptr) else { return false };
            if let Some(t) = s.get("type") {
                return t == "integer";
            }
            match s.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix('#')) {
                Some(r) => ptr = r.to_string(),
                None => return false,
            }
        }
        false
    }
}

/// A JSON pointer token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// A JSON pointer as a URI fragment: `{` and `}` of path templates are not allowed there.
fn percent_encode(ptr: &str) -> String {
    let mut out = String::new();
    for b in ptr.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let (b, mut out, mut i) = (s.as_bytes(), Vec::new(), 0);
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ------------------------------------------------------------------------------ checking

/// The operation for a method and a concrete path: a template's literal segments equal, its
/// parameters any one non-empty segment; concrete paths win over templated ones (OpenAPI).
fn find<'s>(spec: &'s Spec, method: &str, path: &str) -> (Option<&'s Operation>, bool) {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut best: Option<(&Operation, usize)> = None;
    let mut path_known = false;
    for op in &spec.ops {
        if op.segments.len() != segments.len() {
            continue;
        }
        let matches = op.segments.iter().zip(&segments).all(|(t, s)| match t {
            Segment::Literal(l) => l == s,
            Segment::Param(_) => !s.is_empty(),
        });
        if !matches {
            continue;
        }
        path_known = true;
        if op.method != method.to_uppercase() {
            continue;
        }
        let literals = op.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        if best.is_none_or(|(_, n)| literals > n) {
            best = Some((op, literals));
        }
    }
    (best.map(|(op, _)| op), path_known)
}

fn validate(problems: &mut Vec<String>, what: &str, schema: &Validator, value: &Value) {
    for e in schema.iter_errors(value) {
        let at = e.instance_path().to_string();
        // Where in openapi.yaml: the keyword's absolute location in the spec, when known.
        let keyword = match e.absolute_keyword_location() {
            Some(uri) => uri.as_str().strip_prefix(SPEC_URI).and_then(percent_decode).unwrap_or_else(|| uri.to_string()),
            None => e.evaluation_path().to_string(),
        };
        problems.push(format!("{what} at {:?}: {} (openapi.yaml {keyword})", if at.is_empty() { "/" } else { &at }, clip(&e.to_string())));
    }
}

/// A message that quotes a large value: its start and its end (where the reason is).
fn clip(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 400 {
        return s.to_string();
    }
    format!("{} ... {}", chars[..240].iter().collect::<String>(), chars[chars.len() - 120..].iter().collect::<String>())
}

/// The body as the value a schema checks: JSON parsed, text as a JSON string.
fn body_value(media: &str, body: &[u8]) -> Result<Value, String> {
    if media == "application/json" || media.ends_with("+json") {
        serde_json::from_slice(body).map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&body[..body.len().min(200)])))
    } else {
        String::from_utf8(body.to_vec()).map(Value::String).map_err(|_| "not UTF-8 text".to_string())
    }
}

fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

fn check_response(problems: &mut Vec<String>, response: &Response, ex: &Exchange<'_>) {
    let media = ex.content_type.map(essence);
    if response.media.is_empty() {
        if !ex.body.is_empty() {
            problems.push(format!("a body ({media:?}) where the spec documents none"));
        }
        return;
    }
    let Some(media) = media else {
        problems.push(format!("no Content-Type; documented: {:?}", response.media.keys().collect::<Vec<_>>()));
        return;
    };
    let Some(schema) = response.media.get(&media) else {
        problems.push(format!("Content-Type {media} is not documented for this status; documented: {:?}", response.media.keys().collect::<Vec<_>>()));
        return;
    };
    match body_value(&media, ex.body) {
        Ok(v) => validate(problems, "response body", schema, &v),
        Err(e) => problems.push(format!("response body: {e}")),
    }
}

fn check_security(problems: &mut Vec<String>, op: &Operation, ex: &Exchange<'_>) {
    let allowed = |c: Caller| matches!(c, Caller::Role(r) if op.security.iter().any(|s| s == r));
    let s = ex.status;
    if op.security.is_empty() {
        if s == 401 || s == 403 {
            problems.push("401/403 from an operation whose security is empty (open to anyone)".into());
        }
        return;
    }
    let wrong = match s {
        401 => matches!(ex.caller, Caller::Role(_)),
        403 => !matches!(ex.caller, Caller::Role(_)) || allowed(ex.caller),
        _ if (200..300).contains(&s) || s == 404 || s >= 500 => !allowed(ex.caller),
        _ => false,
    };
    if wrong {
        problems.push(format!("status {s} for a caller {:?}, but the operation's security is {:?}", ex.caller, op.security));
    }
}

fn check_request(problems: &mut Vec<String>, op: &Operation, path: &str, query: Option<&str>, ex: &Exchange<'_>) {
    match (&op.request, ex.request) {
        (None, Some(_)) => problems.push("the request has a body but the operation documents no requestBody".into()),
        (Some(rb), None) if rb.required => problems.push("the service took a request without a body, but the requestBody is required".into()),
        (Some(rb), Some((content_type, body))) => match rb.media.get(&essence(content_type)) {
            None => problems.push(format!("request Content-Type {content_type} is not documented; documented: {:?}", rb.media.keys().collect::<Vec<_>>())),
            Some(schema) => match body_value(&essence(content_type), body) {
                Ok(v) => validate(problems, "request body", schema, &v),
                Err(e) => problems.push(format!("request body: {e}")),
            },
        },
        _ => {}
    }
    for (seg, value) in op.segments.iter().zip(path.split('/').skip(1)) {
        if let Segment::Param(name) = seg {
            let Some(p) = op.params.iter().find(|p| p.in_path && &p.name == name) else { continue };
            match percent_decode(value) {
                Some(v) => validate(problems, &format!("path parameter {name}"), &p.schema, &Value::String(v)),
                None => problems.push(format!("path parameter {name}: {value:?} does not decode to UTF-8")),
            }
        }
    }
    let pairs: Vec<(String, String)> = match serde_urlencoded::from_str(query.unwrap_or_default()) {
        Ok(pairs) => pairs,
        Err(e) => return problems.push(format!("the query does not decode: {e}")),
    };
    for (name, value) in &pairs {
        let Some(p) = op.params.iter().find(|p| !p.in_path && &p.name == name) else {
            problems.push(format!("query parameter {name:?} is not documented"));
            continue;
        };
        let v = match value.parse::<u64>() {
            Ok(n) if p.integer => json!(n),
            _ => Value::String(value.clone()),
        };
        validate(problems, &format!("query parameter {name}"), &p.schema, &v);
    }
    for p in op.params.iter().filter(|p| !p.in_path && p.required) {
        if !pairs.iter().any(|(n, _)| n == &p.name) {
            problems.push(format!("required query parameter {} is missing", p.name));
        }
    }
}

fn tally(key: String, status: u16) {
    let new = SEEN.lock().unwrap().insert((key.clone(), status));
    if let (true, Some(file)) = (new, std::env::var_os(TALLY_ENV)) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).unwrap();
        writeln!(f, "{status} {key}").unwrap();
    }
}

/// Check one exchange against the spec; panics naming every mismatch.
pub fn check(ex: &Exchange<'_>) {
    let spec = &*SPEC;
    let (path, query) = match ex.uri.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (ex.uri, None),
    };
    let mut problems = Vec::new();
    let (op, path_known) = find(spec, ex.method, path);
    let name = match op {
        Some(op) => op.key(),
        None if path_known => {
            // axum answers a known path's other methods itself.
            if ex.status != 405 || !ex.body.is_empty() {
                problems.push(format!("{} {path} is not an operation of the spec; the service answered {} instead of 405 with no body", ex.method, ex.status));
            }
            "405".into()
        }
        None => {
            if ex.status == 404 {
                check_response(&mut problems, &spec.unknown_endpoint, ex);
            } else {
                problems.push(format!("no operation of the spec matches {} {path}, but the service answered {} (not the UnknownEndpoint 404)", ex.method, ex.status));
            }
            "fallback".into()
        }
    };
    if let Some(op) = op {
        match op.responses.get(&ex.status) {
            Some(response) => check_response(&mut problems, response, ex),
            None => problems.push(format!("status {} is not documented; documented: {:?}", ex.status, op.responses.keys().collect::<Vec<_>>())),
        }
        check_security(&mut problems, op, ex);
        if !REFUSALS.contains(&ex.status) {
            check_request(&mut problems, op, path, query, ex);
        }
    }
    tally(name.clone(), ex.status);
    if !problems.is_empty() {
        panic!(
            "openapi.yaml and the service disagree ({SPEC_FILE}):\n  {} {} -> {} {} (operation {name}):\n  - {}\n  response body: {}",
            ex.method,
            ex.uri,
            ex.status,
            ex.content_type.unwrap_or("no Content-Type"),
            problems.join("\n  - "),
            String::from_utf8_lossy(&ex.body[..ex.body.len().min(2000)]),
        );
    }
}

// ------------------------------------------------------------------------------ coverage

/// Run this test binary again without `this_test` (so with every other test in it, whatever
/// filter this run has) and assert that every operation `mine` selects by path got a documented
/// 2xx there, apart from `exceptions` (operation key such as `GET /v1/sessions`, and why). An
/// exception that is exercised after all is an error too, so the list cannot go stale.
pub fn assert_exercised(this_test: &str, mine: fn(&str) -> bool, exceptions: &[(&str, &str)]) {
    if std::env::var_os(TALLY_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tally");
    std::fs::write(&file, "").unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--skip", this_test, "-q"])
        .env(TALLY_ENV, &file)
        .output()
        .unwrap();
    let mut seen: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for line in std::fs::read_to_string(&file).unwrap().lines() {
        let (status, key) = line.split_once(' ').unwrap();
        seen.entry(key.to_string()).or_default().insert(status.parse().unwrap());
    }
    let spec = &*SPEC;
    let mut problems = Vec::new();
    let mut report = String::new();
    for (key, _) in exceptions {
        if !spec.ops.iter().any(|op| &op.key() == key) {
            problems.push(format!("the exception {key:?} is not an operation of the spec"));
        }
    }
    for op in spec.ops.iter().filter(|op| mine(&op.template)) {
        let key = op.key();
        let got = seen.get(&key).cloned().unwrap_or_default();
        let documented: BTreeSet<u16> = op.responses.keys().copied().collect();
        let ok = got.iter().any(|s| (200..300).contains(s));
        let excepted = exceptions.iter().find(|(k, _)| *k == key);
        match (ok, excepted) {
            (false, None) => problems.push(format!("{key}: no test got a documented 2xx from it (statuses seen: {got:?})")),
            (true, Some((_, why))) => problems.push(format!("{key} is listed as not exercised ({why}), but it is: remove the exception")),
            _ => {}
        }
        let untested: Vec<_> = documented.difference(&got).collect();
        let _ = writeln!(report, "  {key}: exercised {got:?}; documented but not exercised {untested:?}");
    }
    println!("operations of openapi.yaml and the statuses this suite exercised:\n{report}");
    let run = if out.status.success() {
        String::new()
    } else {
        let stdout = String::from_utf8_lossy(&out.stdout);
        format!("\nNB the run of the other tests failed ({}): fix their failures first, they stop before exercising everything:\n{}", out.status, clip(stdout.trim()))
    };
    assert!(problems.is_empty(), "openapi.yaml has operations this suite does not exercise:\n  - {}{run}", problems.join("\n  - "));
}
