//! The flow decides on the canonical path (`path.rs`) and refuses ambiguous ones, whatever the
//! proxy in front normalized or did not: the path tricks of issue 11 against the request flow.

use serde_json::json;

use super::*;

const PATH_POLICY: &str = r#"
package warden.session
import rego.v1

default decision := {"action": "allow", "reasons": []}

decision := {"action": "deny", "reasons": ["path_forbidden"]} if startswith(input.request.path, "/admin")
decision := {"action": "deny", "reasons": ["tool_forbidden"]} if input.request.mcp.tool == "shell.exec"
decision := {"action": "allow", "reasons": [], "headers": {"x-policy-path": input.request.path, "x-policy-raw-path": input.request.raw_path}} if {
	not startswith(input.request.path, "/admin")
	not input.request.mcp.tool == "shell.exec"
}
"#;

fn warden(k: &Keys, extra: serde_json::Value) -> Warden {
    let mut cfg: serde_json::Value = serde_json::from_slice(&config(k, extra)).unwrap();
    cfg["policy"] = json!({"modules": {"session.rego": PATH_POLICY}, "record_input": true});
    Warden::from_json(&serde_json::to_vec(&cfg).unwrap()).unwrap()
}

fn token(k: &Keys) -> Vec<u8> {
    bearer(&sign_es(k, claims("agent-7")))
}

#[test]
fn every_trick_reaches_the_policy_as_the_path_the_upstream_acts_on() {
    let k = keys();
    let mut w = warden(&k, json!({}));
    let t = token(&k);
    for raw in ["/admin/x", "//admin/x", "/%61dmin/x", "/./admin/x", "/x/../admin/x", "/%2e/admin/x", "/x/%2E%2e/admin/x", "/../admin/x", "/admin/x/", "/admin/x?y=1", "/ADMIN/../admin"] {
        let out = done(&mut w, req(raw, &[("authorization", &t)]), &mut live_host());
        let (status, body) = reply_reason(&out);
        assert_eq!((status, &body["reasons"]), (403, &json!(["path_forbidden"])), "{raw}");
    }
}

#[test]
fn the_policy_sees_canonical_and_raw_paths_and_the_upstream_gets_the_canonical_one() {
    let k = keys();
    let mut w = warden(&k, json!({}));
    let t = token(&k);
    let out = done(&mut w, req("//tickets/./%34%32/..//42?q=%2F..", &[("authorization", &t)]), &mut live_host());
    assert!(out.reply.is_none(), "{:?}", out.reply);
    assert_eq!(header(&out.set_headers, "x-policy-path"), Some("/tickets/42?q=%2F.."));
    assert_eq!(header(&out.set_headers, "x-policy-raw-path"), Some("//tickets/./%34%32/..//42?q=%2F.."));
    assert_eq!(header(&out.set_headers, ":path"), Some("/tickets/42?q=%2F.."), "the upstream acts on what was decided");

    // An already canonical path is left alone (no header rewrite).
    let out = done(&mut w, req("/tickets/42", &[("authorization", &t)]), &mut live_host());
    assert_eq!(header(&out.set_headers, ":path"), None);
    assert_eq!(header(&out.set_headers, "x-policy-path"), Some("/tickets/42"));
}

#[test]
fn ambiguous_paths_are_refused_first_with_a_stable_reason_and_counted() {
    let k = keys();
    let mut w = warden(&k, json!({}));
    let t = token(&k);
    for (raw, code) in [
        (&b"/admin%2fx"[..], "path_encoded_slash"),
        (b"/x/..%2Fadmin", "path_encoded_slash"),
        (b"/admin%5Cx", "path_encoded_backslash"),
        (b"/x\\..\\admin", "path_backslash"),
        (b"/admin%00", "path_nul"),
        (b"/admin%zz", "path_bad_escape"),
        (b"/adm\xc3\xafn", "path_bad_byte"),
        (b"admin", "path_not_origin_form"),
    ] {
        // Without a credential too: the path is judged before anything else.
        for extra in [vec![("authorization", &t[..])], vec![]] {
            let out = done(&mut w, req_bytes(raw, &extra), &mut live_host());
            let (status, body) = reply_reason(&out);
            assert_eq!((status, &body["reasons"]), (400, &json!(["path_ambiguous", code])), "{}", String::from_utf8_lossy(raw));
            assert_eq!(body["error"], json!("bad_request"));
            assert!(out.metrics.contains(&metrics::PATHS_REFUSED.to_string()));
            assert!(out.metrics.contains(&metrics::REQUESTS.to_string()));
            assert!(out.record.is_none() && out.set_headers.is_empty());
        }
    }
}

#[test]
fn shadow_mode_counts_a_refused_path_and_changes_nothing() {
    let k = keys();
    let mut w = warden(&k, json!({"mode": "shadow"}));
    let t = token(&k);
    let out = done(&mut w, req("/admin%2Fx", &[("authorization", &t)]), &mut live_host());
    assert!(out.reply.is_none());
    assert!(out.metrics.contains(&"warden.shadow.deny".to_string()) && out.metrics.contains(&metrics::PATHS_REFUSED.to_string()));
    let out = done(&mut w, req("//tickets", &[("authorization", &t)]), &mut live_host());
    assert_eq!(header(&out.set_headers, ":path"), None, "shadow mode never rewrites");
    assert_eq!(header(&out.set_headers, "x-policy-path"), Some("/tickets"));
}

fn req_bytes(path: &[u8], extra: &[(&str, &[u8])]) -> Headers {
    let mut v: Vec<(String, Vec<u8>)> = vec![(":method".into(), b"GET".to_vec()), (":path".into(), path.to_vec()), (":authority".into(), b"api.test".to_vec())];
    v.extend(extra.iter().map(|(k, val)| (k.to_string(), val.to_vec())));
    Headers::from_pairs(v)
}

#[test]
fn mcp_is_detected_by_what_the_request_is_not_by_a_raw_prefix() {
    let k = keys();
    let w = warden(&k, json!({}));
    let json_ct: &[u8] = b"application/json; charset=utf-8";
    for raw in ["/mcp", "/%6dcp", "//mcp", "/x/../mcp/", "/%6D%63%70?x"] {
        assert!(w.wants_body(&post(raw, &[])), "{raw}");
    }
    assert!(w.wants_body(&post("/rpc", &[("content-type", json_ct)])), "a JSON POST may be JSON-RPC");
    assert!(w.wants_body(&post("/rpc", &[("content-type", b"application/vnd.api+json")])));
    assert!(w.wants_body(&post("/rpc", &[("mcp-method", b"tools/call")])));
    assert!(w.wants_body(&post("/rpc", &[("mcp-session-id", b"m-1")])));
    assert!(!w.wants_body(&post("/upload", &[("content-type", b"text/plain")])));
    assert!(!w.wants_body(&req("/%6dcp", &[("content-type", json_ct)])), "GET streams are not read");
    assert!(!w.wants_body(&post("/%2fmcp", &[("content-type", json_ct)])), "a refused path is refused on headers alone");
}

#[test]
fn a_json_post_is_governed_as_mcp_when_its_body_is_jsonrpc() {
    let k = keys();
    let mut w = warden(&k, json!({}));
    let t = token(&k);
    let ct: &[u8] = b"application/json";
    let shell = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"shell.exec"}}"#;
    for raw in ["/%6dcp", "/rpc", "/anything/else"] {
        let out = mcp_done(&mut w, post(raw, &[("authorization", &t), ("content-type", ct)]), Body::Complete(shell), &mut live_host());
        let r = out.reply.as_ref().unwrap_or_else(|| panic!("{raw}: a forbidden tool passed"));
        assert_eq!(r.status, 403, "{raw}");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["data"]["reasons"], json!(["tool_forbidden"]), "{raw}");
    }
    // Other JSON is REST traffic, decided on method and path.
    let out = mcp_done(&mut w, post("/tickets", &[("authorization", &t), ("content-type", ct)]), Body::Complete(br#"{"title":"x"}"#), &mut live_host());
    assert!(out.reply.is_none(), "{:?}", out.reply);
    let out = mcp_done(&mut w, post("/tickets", &[("authorization", &t), ("content-type", ct)]), Body::Complete(b"not json"), &mut live_host());
    assert!(out.reply.is_none(), "{:?}", out.reply);
    // Something a lenient upstream could still read as JSON-RPC is not passed as REST.
    let out = mcp_done(&mut w, post("/tickets", &[("authorization", &t), ("content-type", ct)]), Body::Complete(br#"{"jsonrpc":"2.0","method":"tools/call"}x"#), &mut live_host());
    assert_eq!(reply_reason(&out).0, 400);
    let out = mcp_done(&mut w, post("/tickets", &[("authorization", &t), ("content-type", ct)]), Body::TooLarge, &mut live_host());
    assert_eq!(reply_reason(&out).0, 413);
    // On a configured MCP path (canonically) the body must be JSON-RPC.
    let out = mcp_done(&mut w, post("/%6dcp", &[("authorization", &t)]), Body::Complete(br#"{"title":"x"}"#), &mut live_host());
    assert_eq!(reply_reason(&out).1["reasons"], json!(["mcp_body_not_jsonrpc"]));
}

#[test]
fn the_headers_phase_of_a_body_request_refuses_a_bad_path_and_sends_the_canonical_one() {
    let k = keys();
    let mut w = warden(&k, json!({}));
    let t = token(&k);
    let ct: &[u8] = b"application/json";
    let refused = w.on_body_request_headers(&post("/mcp%2F..", &[("authorization", &t), ("content-type", ct)]), &mut live_host());
    let Err(out) = refused else { panic!("a bad path must be refused on headers") };
    assert_eq!(reply_reason(&out), (400, reply_reason(&out).1.clone()));
    assert_eq!(reply_reason(&out).1["reasons"], json!(["path_ambiguous", "path_encoded_slash"]));
    let Ok((_, stamps)) = w.on_body_request_headers(&post("/%6dcp", &[("authorization", &t)]), &mut live_host()) else { panic!("accepted") };
    assert_eq!(header(&stamps.set_headers, ":path"), Some("/mcp"));
}

#[test]
fn the_record_holds_the_canonical_path_and_the_input_both() {
    let k = keys();
    let mut w = {
        let mut cfg: serde_json::Value = serde_json::from_slice(&config(&k, json!({}))).unwrap();
        cfg["policy"] = json!({"modules": {"session.rego": PATH_POLICY}, "record_input": true});
        cfg["state"] = json!({"cluster": "warden-state", "mode": "sync", "token": "proxy-token-0123456789"});
        Warden::from_json(&serde_json::to_vec(&cfg).unwrap()).unwrap()
    };
    let t = token(&k);
    let out = through_service(&mut w, req("/a/./b//c?d", &[("authorization", &t)]), Body::Absent, &mut live_host(), &mut Default::default());
    let rec = out.record.expect("a record");
    assert_eq!(rec.path.as_deref(), Some("/a/b/c?d"));
    let input = rec.input.expect("recorded input").to_json().unwrap();
    assert_eq!((input["request"]["path"].as_str(), input["request"]["raw_path"].as_str()), (Some("/a/b/c?d"), Some("/a/./b//c?d")));
    schema_matches(&input);
}
