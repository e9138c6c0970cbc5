//! Nothing a client sends can make a step invalid at the service, and a refusal by the service
//! is never taken for its absence: the wire limits, the marks of what was cut, and what a 4xx
//! to a begin-step means.

use super::*;
use crate::callouts::state::begin_answer;
use crate::wire::limits::*;
use crate::wire::{bound_list, bound_text, CandidateOutcome, RecordedInput};
use crate::StateFailure;

fn is_marked(s: &str) -> bool {
    let Some(i) = s.rfind(CUT_MARK) else { return false };
    let hex = &s[i + CUT_MARK.len()..];
    hex.len() == 17 && hex.ends_with(']') && hex[..16].chars().all(|c| c.is_ascii_hexdigit())
}

#[test]
fn a_long_value_is_cut_at_a_char_boundary_and_marked_with_the_whole_values_hash() {
    let mut short = "agent-7".to_string();
    assert!(!bound_text(&mut short, MAX_TEXT_BYTES));
    assert_eq!(short, "agent-7");
    let mut exact = "x".repeat(MAX_TEXT_BYTES);
    assert!(!bound_text(&mut exact, MAX_TEXT_BYTES), "a value at its limit is kept whole");

    // Three-byte characters: the cut falls inside one unless it is moved back.
    let long = "é€".repeat(1000);
    let (mut a, mut b) = (long.clone() + "a", long.clone() + "b");
    assert!(bound_text(&mut a, MAX_TEXT_BYTES) && bound_text(&mut b, MAX_TEXT_BYTES));
    assert!(a.len() <= MAX_TEXT_BYTES && a.len() > MAX_TEXT_BYTES - 40, "{}", a.len());
    assert!(is_marked(&a), "{a}");
    assert_eq!(&a[..a.len() - 28], &b[..b.len() - 28], "same prefix kept");
    assert_ne!(a, b, "values that differ only past the cut stay distinct");
    let full_hash = hash::hex(&hash::sha256((long + "a").as_bytes()));
    assert!(a.ends_with(&format!("{CUT_MARK}{}]", &full_hash[..16])), "the mark is the hash of the whole value");
    let again = a.clone();
    assert!(!bound_text(&mut a, MAX_TEXT_BYTES), "bounding is idempotent: the service accepts what the filter sends");
    assert_eq!(a, again);
}

#[test]
fn a_long_list_keeps_its_first_items_and_ends_in_how_many_more() {
    let mut tools: Vec<String> = (0..100).map(|i| format!("tool-{i}")).collect();
    let mut other = tools.clone();
    other[99] = "another".into();
    assert!(bound_list(&mut tools, MAX_TOOLS) && bound_list(&mut other, MAX_TOOLS));
    assert_eq!(tools.len(), MAX_TOOLS);
    assert_eq!(tools[..MAX_TOOLS - 1], other[..MAX_TOOLS - 1]);
    assert!(tools[MAX_TOOLS - 1].starts_with(CUT_MARK) && tools[MAX_TOOLS - 1].ends_with("] +37 more"), "{}", tools[MAX_TOOLS - 1]);
    assert_ne!(tools.last(), other.last(), "the hash covers the whole list");
    assert!(!bound_list(&mut tools, MAX_TOOLS));
    let mut items = vec!["ok".to_string(), "y".repeat(5000)];
    assert!(bound_list(&mut items, MAX_REASONS));
    assert_eq!(items[0], "ok");
    assert!(is_marked(&items[1]) && items[1].len() <= MAX_TEXT_BYTES);
}

#[test]
fn every_value_of_a_begin_step_is_bounded() {
    let long = "v".repeat(3000);
    let mut b = BeginStep {
        session_id: "wf-1".into(),
        subject: long.clone(),
        credential: Some(long.clone()),
        workload: Some(long.clone()),
        region: Some(long.clone()),
        device: Some(long.clone()),
        authority: Some(long.clone()),
        tools: vec![long.clone(); 70],
        known_steps: Some(3),
        scopes: vec!["s".into(); 300],
    };
    assert_eq!(b.bound(), vec!["subject", "credential", "workload", "region", "device", "authority", "tools", "scopes"]);
    assert!(is_marked(&b.subject) && is_marked(b.region.as_deref().unwrap()));
    assert_eq!((b.tools.len(), b.scopes.len(), b.session_id.as_str(), b.known_steps), (MAX_TOOLS, MAX_SCOPES, "wf-1", Some(3)));
    assert!(b.bound().is_empty());
}

/// A record at every limit at once, each text value made of what JSON escapes the most.
fn worst_record() -> StepRecord {
    let long = "\u{1}".repeat(10_000);
    let list = |n: usize| vec![long.clone(); n];
    StepRecord {
        session_id: "wf-1".into(),
        step: 1,
        decision_id: "dec_1".into(),
        subject: long.clone(),
        identity_kind: long.clone(),
        issuer: Some(long.clone()),
        credential: Some(long.clone()),
        kid: Some(long.clone()),
        jti: Some(long.clone()),
        delegation: list(40),
        workload: Some(long.clone()),
        region: Some(long.clone()),
        device: Some(long.clone()),
        source_address: Some(long.clone()),
        method: Some(long.clone()),
        authority: Some(long.clone()),
        path: Some(long.clone()),
        tool: Some(long.clone()),
        mcp_method: Some(long.clone()),
        arguments_digest: Some(long.clone()),
        action: "allow".into(),
        reasons: list(100),
        signals: list(100),
        flags: list(100),
        policy_version: long.clone(),
        mode: long.clone(),
        trace_id: Some(long.clone()),
        input: RecordedInput::new(&json!({"request": {"mcp": {"method": "m".repeat(2 * MAX_INPUT_BYTES)}}})),
        candidate: Some(CandidateOutcome { policy_version: long.clone(), action: long.clone(), reasons: list(100), disagrees: true, error: Some(long.clone()) }),
        ..Default::default()
    }
}

#[test]
fn every_string_and_list_of_a_record_is_bounded_and_a_record_has_a_size_limit() {
    let mut r = worst_record();
    let cut = r.bound();
    for name in ["subject", "path", "mcp_method", "delegation", "reasons", "signals", "flags", "policy_version", "input", "candidate.reasons"] {
        assert!(cut.contains(&name), "{name} not bounded: {cut:?}");
    }
    assert_eq!(cut.len(), 28, "every text and list field but the action (valid here): {cut:?}");
    assert!(r.bound().is_empty(), "a bounded record is what the service accepts");
    assert_eq!((r.reasons.len(), r.delegation.len()), (MAX_REASONS, MAX_DELEGATION));
    assert!(is_marked(r.path.as_deref().unwrap()) && is_marked(&r.subject) && is_marked(r.mcp_method.as_deref().unwrap()));
    // However hostile its values, one record alone fits in a batch the service takes.
    let bytes = serde_json::to_vec(&r).unwrap().len();
    assert!(bytes < MAX_BODY_BYTES - MAX_BATCH_BYTES, "a worst-case record is {bytes} bytes");
}

#[test]
fn an_input_over_its_limit_is_replaced_by_its_size_and_hash() {
    let small = RecordedInput::new(&json!({"request": {"path": "/x"}})).unwrap();
    let mut kept = small.clone();
    assert!(!kept.bound() && !kept.is_cut() && kept == small);
    let big = json!({"request": {"headers": {"user-agent": "u".repeat(MAX_INPUT_BYTES)}}});
    let mut input = RecordedInput::new(&big).unwrap();
    let text = input.get().to_string();
    assert!(input.bound() && input.is_cut());
    let marker = input.to_json().unwrap();
    assert_eq!(marker[INPUT_CUT_KEY]["bytes"], json!(text.len()));
    assert_eq!(marker[INPUT_CUT_KEY]["sha256"], json!(hash::hex(&hash::sha256(text.as_bytes()))));
    assert!(!input.bound(), "the marker is within the limit");
}

#[test]
fn max_batch_bytes_is_declared_and_kept_below_the_service_body_limit() {
    let k = keys();
    let state = |extra: serde_json::Value| {
        let mut s = json!({"cluster": "warden-state", "token": "proxy-token-0123456789"});
        s.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        Warden::from_json(&config(&k, json!({"state": s})))
    };
    assert_eq!(state(json!({})).unwrap().config.state.unwrap().max_batch_bytes, 1024 * 1024);
    assert!(state(json!({"max_batch_bytes": 65536})).is_ok());
    for bad in [0, 100, MAX_BATCH_BYTES + 1, MAX_BODY_BYTES] {
        let e = state(json!({"max_batch_bytes": bad})).err().unwrap();
        assert_eq!(e.field, "state.max_batch_bytes", "{bad}");
    }
}

#[test]
fn a_long_subject_reaches_the_service_cut_and_the_session_stays_bound() {
    // (An over-long region or device is refused at its source: `context_header_invalid`.)
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let subject = "s".repeat(2000);
    let t = bearer(&sign_es(&k, claims(&subject)));
    let headers = || req("/tickets", &[("authorization", &t), ("x-session-id", b"wf-long"), ("x-client-region", b"eu-west")]);
    let (pending, begin) = call(&mut w, headers(), &mut h);
    assert!(begin.subject.len() <= MAX_TEXT_BYTES && is_marked(&begin.subject), "{}", begin.subject.len());
    assert_eq!(begin.region.as_deref(), Some("eu-west"));
    let out = w.resume(pending, Ok(answer(1, true, &begin.subject)), &mut h);
    assert!(out.reply.is_none(), "{:?}", out.reply);
    assert_eq!(header(&out.set_headers, "x-warden-subject"), Some(begin.subject.as_str()), "one subject everywhere");
    let rec = out.record.unwrap();
    assert_eq!(rec.subject, begin.subject);
    assert_eq!(rec.region.as_deref(), Some("eu-west"));
    // The proxy's own table holds the same subject: with the service gone the owner goes on
    // (the test policy denies degraded steps by its own rule, not as another subject).
    let (pending, _) = call(&mut w, headers(), &mut h);
    let out = w.resume(pending, Err("timeout".into()), &mut h);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["state_unavailable"]));
    assert!(!out.metrics.contains(&metrics::SESSION_BINDING_VIOLATIONS.to_string()));
    // Another long subject with the same first 2000 characters is another subject, also for
    // the proxy's own table.
    let intruder = bearer(&sign_es(&k, claims(&(subject.clone() + "x"))));
    let (pending, begin) = call(&mut w, req("/", &[("authorization", &intruder), ("x-session-id", b"wf-long")]), &mut h);
    assert!(is_marked(&begin.subject));
    let out = w.resume(pending, Err("timeout".into()), &mut h);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["session_bound_to_other_subject"]));
}

#[test]
fn only_no_answer_a_timeout_a_5xx_or_garbage_is_unavailable_a_4xx_is_a_refusal() {
    let ok = serde_json::to_vec(&answer(2, false, "agent-7")).unwrap();
    assert!(begin_answer(Some(("200".into(), ok))).is_ok());
    let unavailable = |a: crate::callouts::Answer| matches!(begin_answer(a), Err(StateFailure::Unavailable(_)));
    let refused = |a: crate::callouts::Answer| matches!(begin_answer(a), Err(StateFailure::Refused(_)));
    assert!(unavailable(None));
    assert!(unavailable(Some(("200".into(), b"<html>".to_vec()))));
    for s in ["500", "502", "503", "504"] {
        assert!(unavailable(Some((s.into(), b"down".to_vec()))), "{s}");
    }
    for s in ["400", "401", "403", "404", "413", "429"] {
        assert!(refused(Some((s.into(), br#"{"error":"bad_request","message":"subject over its limits"}"#.to_vec()))), "{s}");
    }
    match begin_answer(Some(("400".into(), br#"{"error":"bad_request","message":"begin-step: over its limits: region"}"#.to_vec()))) {
        Err(StateFailure::Refused(why)) => assert_eq!(why, "HTTP 400: bad_request: begin-step: over its limits: region"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_4xx_to_a_begin_step_fails_closed_even_where_the_policy_allows_degraded_mode() {
    let k = keys();
    // A policy that allows everything, degraded steps included.
    let allow_all = "package warden.session\nimport rego.v1\ndefault decision := {\"action\": \"allow\", \"reasons\": [], \"risk\": 0}\n";
    let cfg = json!({
        "policy": {"modules": {"session.rego": allow_all}},
        "state": {"cluster": "warden-state", "mode": "sync", "token": "proxy-token-0123456789"}
    });
    let mut w = Warden::from_json(&config(&k, cfg)).unwrap();
    let mut h = live_host();
    let t = bearer(&sign_es(&k, claims("intruder")));
    let headers = || req("/", &[("authorization", &t), ("x-session-id", b"wf-owned")]);
    let (pending, _) = call(&mut w, headers(), &mut h);
    let refusal = Some(("400".into(), br#"{"error":"bad_request","message":"begin-step: over its limits: region"}"#.to_vec()));
    let out = w.resume(pending, begin_answer(refusal), &mut h);
    let (status, body) = reply_reason(&out);
    assert_eq!((status, body["reasons"].clone()), (403, json!(["session_state_refused"])));
    assert!(out.metrics.contains(&metrics::STATE_REFUSED.to_string()));
    assert!(!out.metrics.contains(&metrics::STATE_UNAVAILABLE.to_string()));
    assert!(out.log.as_deref().unwrap().contains("over its limits: region"), "{:?}", out.log);
    assert!(out.record.is_none(), "no step was counted");
    // Unavailable is degraded mode, which this policy allows: the difference is the point.
    let (pending, _) = call(&mut w, headers(), &mut h);
    let out = w.resume(pending, begin_answer(Some(("503".into(), Vec::new()))), &mut h);
    assert!(out.reply.is_none());
    assert!(out.record.unwrap().degraded);
}
