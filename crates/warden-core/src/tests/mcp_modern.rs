//! MCP 2026-07-28: decided on the headers (`Mcp-Method`, `Mcp-Name`) before any of the body
//! moves, the body then held to them, every way out recorded once.

use serde_json::json;

use super::*;

const META: &str = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"agent-sdk","version":"2.3.0"},"io.modelcontextprotocol/clientCapabilities":{}}"#;

fn modern(t: &[u8], method: &str, name: Option<&[u8]>, extra: &[(&str, &[u8])]) -> Headers {
    let mut h: Vec<(&str, &[u8])> =
        vec![("authorization", t), ("x-session-id", b"run-1"), ("mcp-method", method.as_bytes()), ("mcp-protocol-version", b"2026-07-28")];
    if let Some(n) = name {
        h.push(("mcp-name", n));
    }
    h.extend_from_slice(extra);
    post("/mcp", &h)
}

fn tool_call(id: u32, tool: &str) -> Vec<u8> {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{{"q":"x"}},{META}}}}}"#).into_bytes()
}

/// The headers phase through a service that counts steps: a refusal, or a held step.
fn at_headers(w: &mut Warden, headers: Headers, h: &mut FakeHost, steps: &mut std::collections::HashMap<String, u64>) -> RequestOutcome {
    assert!(w.decides_at_headers(&headers));
    through_service(w, headers, Body::Coming, h, steps)
}

fn rpc(out: &RequestOutcome) -> (u32, serde_json::Value) {
    let r = out.reply.as_ref().expect("a local reply");
    (r.status, serde_json::from_slice(&r.body).unwrap())
}

#[test]
fn a_denied_tool_is_refused_on_the_headers_and_recorded() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let out = at_headers(&mut w, modern(&t, "tools/call", Some(b"shell.exec"), &[]), &mut h, &mut steps);
    assert!(out.hold.is_none(), "refused: nothing is held, nothing goes on");
    let (status, body) = rpc(&out);
    assert_eq!(status, 403);
    assert_eq!((body["id"].clone(), body["error"]["code"].clone()), (json!(null), json!(-32001)), "no body read yet: id null");
    assert_eq!(body["error"]["data"]["reasons"], json!(["tool_forbidden"]));
    let rec = out.record.expect("the refused step is recorded");
    assert_eq!((rec.step, rec.tool.as_deref(), rec.mcp_method.as_deref(), rec.action.as_str()), (1, Some("shell.exec"), Some("tools/call"), "deny"));
    let input = rec.input.expect("recorded input").to_json().unwrap();
    assert_eq!(input["request"]["mcp"]["phase"], json!("headers"));
    assert_eq!(input["request"]["mcp"]["protocol_version"], json!("2026-07-28"));
    schema_matches(&input);
}

#[test]
fn an_allowed_call_is_held_then_decided_on_its_body_under_the_same_step() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let mut out = at_headers(&mut w, modern(&t, "tools/call", Some(b"search"), &[]), &mut h, &mut steps);
    assert!(out.reply.is_none() && out.record.is_none());
    assert_eq!(header(&out.set_headers, "x-warden-step"), Some("1"), "the step is known on the headers");
    assert_eq!(header(&out.set_headers, "x-warden-session"), Some("run-1"));
    assert!(out.metrics.contains(&"warden.requests".to_string()));
    let held = out.hold.take().expect("held for the body");
    let out = w.on_held_body(held, Body::Complete(&tool_call(4, "search")), &mut h);
    assert!(out.reply.is_none());
    assert!(!out.metrics.contains(&"warden.requests".to_string()), "one request counted once");
    let rec = out.record.expect("recorded once, with the final decision");
    assert_eq!((rec.step, rec.action.as_str(), rec.tool.as_deref()), (1, "allow", Some("search")));
    assert!(rec.arguments_digest.is_some());
    let input = rec.input.unwrap().to_json().unwrap();
    let m = &input["request"]["mcp"];
    assert_eq!((m["phase"].clone(), m["protocol_version"].clone()), (json!("body"), json!("2026-07-28")));
    assert_eq!(m["client"], json!({"name": "agent-sdk", "version": "2.3.0"}));
    schema_matches(&input);
    assert_eq!(steps.get("run-1"), Some(&1), "one begin-step for the two phases");
}

#[test]
fn what_only_the_body_says_is_still_decided() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let mut out = at_headers(&mut w, modern(&t, "tools/list", None, &[]), &mut h, &mut steps);
    let body = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"old-agent","version":"0.1"}}}}"#;
    let out = w.on_held_body(out.hold.take().unwrap(), Body::Complete(body.as_bytes()), &mut h);
    let (status, body) = rpc(&out);
    assert_eq!((status, body["id"].clone(), body["error"]["data"]["reasons"].clone()), (403, json!(2), json!(["client_forbidden"])));
    assert_eq!(out.record.unwrap().action, "deny");
}

#[test]
fn headers_and_body_that_disagree_are_refused_as_the_sdk_answers_and_recorded() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let cases: Vec<(Headers, Vec<u8>, &str, serde_json::Value, i64)> = vec![
        // The headers say a harmless method, the body calls a tool.
        (modern(&t, "tools/list", None, &[]), tool_call(7, "shell.exec"), "method", json!(7), -32020),
        // The headers name an allowed tool, the body calls a denied one.
        (modern(&t, "tools/call", Some(b"search"), &[]), tool_call(8, "shell.exec"), "name", json!(8), -32020),
        // 2026-07-28 has no batches: one message's headers never describe a batch.
        (modern(&t, "tools/call", Some(b"search"), &[]), [b"[".as_slice(), &tool_call(9, "search"), b"]"].concat(), "batch", json!(null), -32600),
    ];
    for (headers, body, rule, id, code) in cases {
        let mut out = at_headers(&mut w, headers, &mut h, &mut steps);
        let out = w.on_held_body(out.hold.take().expect("allowed on the headers"), Body::Complete(&body), &mut h);
        let (status, reply) = rpc(&out);
        assert_eq!((status, reply["id"].clone(), reply["error"]["code"].as_i64()), (400, id, Some(code)), "{rule}");
        assert_eq!(reply["error"]["data"]["reasons"], json!(["mcp_header_mismatch", rule]));
        let rec = out.record.expect("a mismatch is a recorded step");
        assert_eq!((rec.action.as_str(), rec.reasons.clone()), ("deny", vec!["mcp_header_mismatch".to_string(), rule.to_string()]));
        // The trail shows what the body asked for, not what the headers said.
        assert_eq!(rec.tool.as_deref(), if rule == "batch" { Some("search") } else { Some("shell.exec") }, "{rule}");
        // No policy decided it: no recorded input for `warden replay` to re-decide.
        assert!(rec.input.is_none(), "{rule}");
    }
}

#[test]
fn headers_that_cannot_be_believed_are_refused_on_the_headers() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    for (headers, rule) in [
        (modern(&t, "tools/call", Some(b"search"), &[("mcp-name", b"shell.exec")]), "duplicate_header"),
        (modern(&t, "tools/call", Some(b"search"), &[("mcp-name", b"search")]), "duplicate_header"),
        (modern(&t, "tools/call", Some(b"=?base64?not base64?="), &[]), "header_unreadable"),
    ] {
        let out = at_headers(&mut w, headers, &mut h, &mut steps);
        assert!(out.hold.is_none());
        let (status, reply) = rpc(&out);
        assert_eq!((status, reply["error"]["code"].clone(), reply["id"].clone()), (400, json!(-32020), json!(null)), "{rule}");
        assert_eq!(out.record.expect("recorded").reasons, vec!["mcp_header_mismatch".to_string(), rule.to_string()]);
    }
}

#[test]
fn non_ascii_names_are_decided_decoded() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    // "søk", as the SDK encodes a name that is not plain ASCII.
    let mut out = at_headers(&mut w, modern(&t, "tools/call", Some(b"=?base64?c8O4aw==?="), &[]), &mut h, &mut steps);
    let out = w.on_held_body(out.hold.take().unwrap(), Body::Complete(&tool_call(1, "søk")), &mut h);
    assert!(out.reply.is_none());
    assert_eq!(out.record.unwrap().tool.as_deref(), Some("søk"));
    let mut out = at_headers(&mut w, modern(&t, "tools/call", Some(b"=?base64?c8O4aw==?="), &[]), &mut h, &mut steps);
    let out = w.on_held_body(out.hold.take().unwrap(), Body::Complete(&tool_call(2, "sok")), &mut h);
    assert_eq!(rpc(&out).1["error"]["data"]["reasons"], json!(["mcp_header_mismatch", "name"]));
}

#[test]
fn a_body_that_never_comes_whole_is_refused_and_recorded() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    // No body at all on a request that declares an MCP method: refused before any step.
    let out = through_service(&mut w, modern(&t, "tools/call", Some(b"search"), &[]), Body::Absent, &mut h, &mut steps);
    assert_eq!(reply_reason(&out), (400, reply_reason(&out).1));
    assert_eq!(reply_reason(&out).1["reasons"], json!(["mcp_body_not_json"]));
    for (body, status, reason) in [(Body::Absent, 400, "mcp_body_incomplete"), (Body::TooLarge, 413, "mcp_body_too_large"), (Body::Complete(b"{"), 400, "mcp_body_not_json")] {
        let mut out = at_headers(&mut w, modern(&t, "tools/call", Some(b"search"), &[]), &mut h, &mut steps);
        let out = w.on_held_body(out.hold.take().unwrap(), body, &mut h);
        assert_eq!(out.reply.as_ref().map(|r| r.status), Some(status));
        assert_eq!(out.record.expect("recorded").reasons, vec![reason.to_string()]);
    }
}

#[test]
fn a_revoked_session_is_refused_on_the_headers() {
    let k = keys();
    let mut w = with_state(&k, "cached");
    let mut h = live_host();
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let (pending, _) = call(&mut w, req("/", &[("authorization", &t), ("x-session-id", b"run-1")]), &mut h);
    w.resume(pending, Ok(answer(1, true, "agent-7")), &mut h);
    w.apply_revocation("run-1", &mut h);
    let out = match w.on_request(modern(&t, "tools/call", Some(b"search"), &[]), Body::Coming, &mut h) {
        Step::Done(out) => out,
        Step::Call { .. } => panic!("a revoked session needs no call"),
    };
    assert!(out.hold.is_none());
    let (status, reply) = rpc(&out);
    assert_eq!((status, reply["error"]["data"]["reasons"].clone()), (403, json!(["session_revoked"])));
}

#[test]
fn shadow_mode_holds_and_never_refuses() {
    let k = keys();
    let mut w = with_state_config(&k, json!({"mode": "shadow"}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let mut out = at_headers(&mut w, modern(&t, "tools/call", Some(b"shell.exec"), &[]), &mut h, &mut steps);
    let out = w.on_held_body(out.hold.take().expect("shadow decides on the body only"), Body::Complete(&tool_call(1, "search")), &mut h);
    assert!(out.reply.is_none(), "shadow never blocks");
    assert!(out.metrics.contains(&"warden.shadow.deny".to_string()), "{:?}", out.metrics);
    assert!(!out.record.unwrap().enforced);
}

#[test]
fn handshake_era_requests_carry_their_version_and_client() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let headers = post("/mcp", &[("authorization", &t), ("mcp-session-id", b"s-9"), ("mcp-protocol-version", b"2025-11-25")]);
    assert!(!w.decides_at_headers(&headers), "no Mcp-Method: decided on the body, as before");
    let out = through_service(&mut w, headers, Body::Complete(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#), &mut h, &mut steps);
    let input = out.record.unwrap().input.unwrap().to_json().unwrap();
    assert_eq!((input["request"]["mcp"]["protocol_version"].clone(), input["request"]["mcp"]["phase"].clone()), (json!("2025-11-25"), json!("body")));
    schema_matches(&input);
}

#[test]
fn no_header_value_makes_it_panic() {
    let k = keys();
    let mut w = with_state_config(&k, json!({}));
    let (mut h, mut steps) = (live_host(), Default::default());
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let values: [&[u8]; 7] = [b"", b"\xff\xfe", b"=?base64?", b"=?base64??=", b"=?base64?====?=", &[b'a'; 9000], b"tools/call\x00"];
    for v in values {
        for name in ["mcp-method", "mcp-name", "mcp-protocol-version"] {
            let headers = modern(&t, "tools/call", Some(b"search"), &[(name, v)]);
            let mut out = through_service(&mut w, headers, Body::Coming, &mut h, &mut steps);
            if let Some(held) = out.hold.take() {
                let _ = w.on_held_body(held, Body::Complete(&tool_call(1, "search")), &mut h);
            }
        }
    }
}
