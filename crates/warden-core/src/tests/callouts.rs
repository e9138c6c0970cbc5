//! The proxy's own calls, natively: attribution batches and their retries, the revocation feed,
//! JWKS fetches shared between VMs, answered by hand through `FakeHost`'s recorded calls.

use super::*;
use crate::callouts::jwks::JwksFetcher;
use crate::callouts::state::StateClient;
use crate::config::StateConfig;
use crate::host::FakeCall;

fn state_config(extra: serde_json::Value) -> StateConfig {
    let mut cfg = json!({"cluster": "warden-state", "token": "proxy-token-0123456789", "max_batch": 3, "flush_interval_ms": 100});
    if let (Some(base), Some(add)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in add {
            base.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(cfg).unwrap()
}

fn record(session: &str, step: u64) -> StepRecord {
    StepRecord { session_id: session.into(), step, decision_id: format!("dec_{step}"), action: "allow".into(), ..Default::default() }
}

fn sent_records(c: &FakeCall) -> Vec<u64> {
    let batch: crate::wire::RecordBatch = serde_json::from_slice(c.body.as_deref().unwrap()).unwrap();
    batch.records.iter().map(|r| r.step).collect()
}

fn ok_append(n: usize) -> crate::callouts::Answer {
    Some(("200".into(), format!(r#"{{"appended":{n},"duplicates":0}}"#).into_bytes()))
}

#[test]
fn records_go_in_batches_with_the_proxy_token_and_are_retried_until_accepted() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let mut client = StateClient::new(state_config(json!({})));
    let mut counts: Vec<String> = Vec::new();
    for step in 1..=5 {
        client.enqueue(record("s1", step), &mut counts);
    }
    client.on_tick(&mut h);
    // A full batch goes at once, then the rest.
    assert_eq!(h.calls.len(), 2);
    let (first, second) = (h.calls[0].clone(), h.calls[1].clone());
    assert_eq!((first.cluster.as_str(), first.header(":path"), first.header(":method")), ("warden-state", Some("/v1/records"), Some("POST")));
    assert_eq!(first.header("authorization"), Some("Bearer proxy-token-0123456789"));
    assert_eq!((sent_records(&first), sent_records(&second)), (vec![1, 2, 3], vec![4, 5]));
    assert!(client.on_response(first.token, ok_append(3), &mut w, &mut h, &mut counts));
    // The service is down for the second batch: it goes back in the queue, in order, and waits.
    assert!(client.on_response(second.token, Some(("503".into(), b"down".to_vec())), &mut w, &mut h, &mut counts));
    assert_eq!(client.queued(), 2);
    assert!(!client.on_response(99, None, &mut w, &mut h, &mut counts), "not our token");
    client.on_tick(&mut h);
    assert_eq!(h.calls.len(), 2, "backed off: nothing sent on the next tick");
    h.now_ms += 10_000;
    client.on_tick(&mut h);
    let retry = h.calls.last().unwrap().clone();
    assert_eq!(sent_records(&retry), vec![4, 5]);
    client.on_response(retry.token, ok_append(2), &mut w, &mut h, &mut counts);
    assert_eq!(client.queued(), 0);
    let n = |name: &str| counts.iter().filter(|c| c.as_str() == name).count();
    assert_eq!((n(metrics::RECORDS_SENT), n(metrics::RECORDS_RETRIED), n(metrics::RECORDS_DROPPED)), (5, 2, 0));
}

#[test]
fn a_call_that_cannot_start_keeps_the_records_and_a_full_queue_drops_the_oldest_counted() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    h.calls_fail = true;
    let mut client = StateClient::new(state_config(json!({"queue_limit": 4})));
    let mut counts: Vec<String> = Vec::new();
    for step in 1..=5 {
        client.enqueue(record("s1", step), &mut counts);
    }
    assert_eq!(counts, vec![metrics::RECORDS_DROPPED.to_string()]);
    client.on_tick(&mut h);
    assert_eq!(client.queued(), 4);
    h.calls_fail = false;
    h.now_ms += 10_000;
    client.on_tick(&mut h);
    assert_eq!(sent_records(&h.calls[0]), vec![2, 3, 4]);
    client.on_response(h.calls[0].token, ok_append(3), &mut w, &mut h, &mut counts);
}

#[test]
fn cached_mode_polls_the_revocation_feed_and_applies_it() {
    let k = keys();
    let mut w = with_state(&k, "cached");
    let mut h = live_host();
    let mut client = StateClient::new(state_config(json!({"mode": "cached", "revocation_poll_ms": 500})));
    let mut counts: Vec<String> = Vec::new();
    client.on_tick(&mut h);
    let poll = h.calls[0].clone();
    assert_eq!((poll.header(":method"), poll.header(":path")), (Some("GET"), Some("/v1/revocations?after=0")));
    let feed = json!({"revocations": [{"cursor": 7, "session_id": "wf-9", "at_ms": 1, "reason": "r"}], "cursor": 7});
    client.on_response(poll.token, Some(("200".into(), feed.to_string().into_bytes())), &mut w, &mut h, &mut counts);
    assert_eq!(counts, vec![metrics::REVOCATIONS_APPLIED.to_string()]);
    let t = bearer(&sign_es(&k, claims("agent-7")));
    let out = done(&mut w, req("/", &[("authorization", &t), ("x-session-id", b"wf-9")]), &mut h);
    assert_eq!(reply_reason(&out).1["reasons"], json!(["session_revoked"]));
    client.on_tick(&mut h);
    assert_eq!(h.calls.len(), 1, "the next poll waits for its interval");
    h.now_ms += 500;
    client.on_tick(&mut h);
    assert_eq!(h.calls[1].header(":path"), Some("/v1/revocations?after=7"), "the cursor moved on");
}

fn jwks_warden(k: &Keys) -> (Warden, String) {
    let mut cfg: serde_json::Value = serde_json::from_slice(&config(k, json!({}))).unwrap();
    let provider = &mut cfg["identity"]["jwt"]["providers"][0];
    let jwks = provider["jwks"].take().to_string();
    provider.as_object_mut().unwrap().remove("jwks");
    provider["jwks_uri"] = json!({"cluster": "idp", "path": "/jwks.json", "refresh_seconds": 60});
    (Warden::from_json(&serde_json::to_vec(&cfg).unwrap()).unwrap(), jwks)
}

#[test]
fn jwks_are_fetched_shared_with_other_vms_and_kept_when_a_fetch_fails() {
    let k = keys();
    let (mut w, jwks) = jwks_warden(&k);
    let mut h = live_host();
    let mut counts: Vec<String> = Vec::new();
    let mut fetcher = JwksFetcher::new(w.jwks_targets());
    fetcher.on_tick(&mut w, &mut h, &mut counts);
    let fetch = h.calls[0].clone();
    assert_eq!((fetch.cluster.as_str(), fetch.header(":path")), ("idp", Some("/jwks.json")));
    assert!(fetcher.on_response(fetch.token, Some(("200".into(), jwks.into_bytes())), &mut w, &mut h, &mut counts));
    let t = bearer(&sign_es(&k, claims("a")));
    assert!(done(&mut w, req("/", &[("authorization", &t)]), &mut h).reply.is_none());
    // Another VM of the proxy installs the published document without fetching.
    let (mut other, _) = jwks_warden(&k);
    let mut other_fetcher = JwksFetcher::new(other.jwks_targets());
    other_fetcher.on_tick(&mut other, &mut h, &mut counts);
    assert_eq!(h.calls.len(), 1, "no second fetch within the refresh interval");
    assert!(done(&mut other, req("/", &[("authorization", &t)]), &mut h).reply.is_none());
    // The refresh fails: the keys in use stay, the fetch backs off.
    h.now_ms += 61_000;
    fetcher.on_tick(&mut w, &mut h, &mut counts);
    let refresh = h.calls[1].clone();
    fetcher.on_response(refresh.token, Some(("500".into(), Vec::new())), &mut w, &mut h, &mut counts);
    assert!(done(&mut w, req("/", &[("authorization", &t)]), &mut h).reply.is_none());
    fetcher.on_tick(&mut w, &mut h, &mut counts);
    assert_eq!(h.calls.len(), 2, "backed off after a failure");
    let n = |name: &str| counts.iter().filter(|c| c.as_str() == name).count();
    assert_eq!((n(metrics::JWKS_FETCH_OK), n(metrics::JWKS_FETCH_FAILED)), (1, 1));
}

/// Answer every batch the client sends with `service` until nothing is queued or in flight.
fn serve(client: &mut StateClient, w: &mut Warden, h: &mut FakeHost, counts: &mut Vec<String>, service: impl Fn(&[StepRecord], usize) -> crate::callouts::Answer) {
    let mut answered = 0;
    for _ in 0..200 {
        client.on_tick(h);
        let calls: Vec<FakeCall> = h.calls[answered..].to_vec();
        answered = h.calls.len();
        for c in &calls {
            let body = c.body.as_deref().unwrap();
            let batch: crate::wire::RecordBatch = serde_json::from_slice(body).unwrap();
            assert!(client.on_response(c.token, service(&batch.records, body.len()), w, h, counts));
        }
        if calls.is_empty() && client.queued() == 0 {
            return;
        }
        h.now_ms += 1000;
    }
    panic!("the queue never drained: {} records left", client.queued());
}

fn refused_400(why: &str) -> crate::callouts::Answer {
    Some(("400".into(), format!(r#"{{"error":"bad_request","message":"{why}"}}"#).into_bytes()))
}

#[test]
fn a_batch_with_one_invalid_record_is_split_until_only_that_record_is_set_aside() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let mut client = StateClient::new(state_config(json!({"max_batch": 16})));
    let mut counts: Vec<String> = Vec::new();
    for step in 1..=40 {
        // Records of several sessions share batches; one of them the service will not take.
        client.enqueue(record(&format!("s{}", step % 5), step), &mut counts);
    }
    let mut accepted = Vec::new();
    let accepted_cell = std::cell::RefCell::new(&mut accepted);
    serve(&mut client, &mut w, &mut h, &mut counts, |records, _| {
        if records.iter().any(|r| r.step == 23) {
            return refused_400("record for session s3 step 23: unknown action");
        }
        accepted_cell.borrow_mut().extend(records.iter().map(|r| r.step));
        ok_append(records.len())
    });
    accepted.sort();
    assert_eq!(accepted, (1..=40).filter(|s| *s != 23).collect::<Vec<_>>(), "every valid record accepted, once");
    let n = |name: &str| counts.iter().filter(|c| c.as_str() == name).count();
    assert_eq!((n(metrics::RECORDS_SENT), n(metrics::RECORDS_REJECTED), n(metrics::RECORDS_DROPPED)), (39, 1, 0));
    let kept: Vec<_> = client.rejected().collect();
    assert_eq!(kept.len(), 1, "set aside, not dropped");
    assert_eq!((kept[0].record.session_id.as_str(), kept[0].record.step, kept[0].record.decision_id.as_str()), ("s3", 23, "dec_23"));
    assert_eq!(kept[0].reason, "HTTP 400: record for session s3 step 23: unknown action");
    let rec: StepRecord = serde_json::from_slice(kept[0].record.json()).unwrap();
    assert_eq!(rec.step, 23, "the whole record is kept");
}

#[test]
fn records_the_trail_refuses_are_set_aside_at_once_and_the_rest_counted_sent() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let mut client = StateClient::new(state_config(json!({"max_batch": 16})));
    let mut counts: Vec<String> = Vec::new();
    for step in 1..=10 {
        client.enqueue(record("s1", step), &mut counts);
    }
    let calls = std::cell::Cell::new(0);
    serve(&mut client, &mut w, &mut h, &mut counts, |records, _| {
        calls.set(calls.get() + 1);
        // The service appended all but steps 4 and 7, which contradict what it knows (409).
        let refused: Vec<_> = records
            .iter()
            .filter(|r| r.step == 4 || r.step == 7)
            .map(|r| json!({"session_id": r.session_id, "step": r.step, "decision_id": r.decision_id, "code": "step_already_recorded"}))
            .collect();
        let body = json!({"error": "records_refused", "message": "2 record(s) ...", "appended": records.len() - refused.len(), "duplicates": 0, "refused": refused});
        Some(("409".into(), body.to_string().into_bytes()))
    });
    assert_eq!(calls.get(), 1, "a 409 is not retried nor split: the service kept what it refused");
    let n = |name: &str| counts.iter().filter(|c| c.as_str() == name).count();
    assert_eq!((n(metrics::RECORDS_SENT), n(metrics::RECORDS_REJECTED), n(metrics::RECORDS_RETRIED)), (8, 2, 0));
    let kept: Vec<_> = client.rejected().map(|r| (r.record.step, r.reason.clone())).collect();
    assert_eq!(kept, vec![(4, "HTTP 409: step_already_recorded (kept in the session's audit events)".to_string()), (7, "HTTP 409: step_already_recorded (kept in the session's audit events)".to_string())]);
}

#[test]
fn a_409_that_lists_no_refusal_is_retried() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let mut client = StateClient::new(state_config(json!({})));
    let mut counts: Vec<String> = Vec::new();
    client.enqueue(record("s1", 1), &mut counts);
    let calls = std::cell::Cell::new(0);
    serve(&mut client, &mut w, &mut h, &mut counts, |records, _| {
        calls.set(calls.get() + 1);
        if calls.get() == 1 {
            return Some(("409".into(), b"{\"error\":\"conflict\",\"message\":\"another 409\"}".to_vec()));
        }
        ok_append(records.len())
    });
    assert_eq!(calls.get(), 2);
    assert_eq!(client.rejected().count(), 0);
}

#[test]
fn batches_are_bounded_in_bytes_and_a_record_larger_than_a_batch_goes_alone() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let mut client = StateClient::new(state_config(json!({"max_batch": 100, "max_batch_bytes": 4096})));
    let mut counts: Vec<String> = Vec::new();
    for step in 1..=30 {
        let mut r = record("s1", step);
        r.path = Some(format!("/{}", "p".repeat(900)));
        if step == 7 {
            r.input = crate::wire::RecordedInput::new(&json!({"big": "b".repeat(20_000)}));
        }
        client.enqueue(r, &mut counts);
    }
    let sizes = std::cell::RefCell::new(Vec::new());
    serve(&mut client, &mut w, &mut h, &mut counts, |records, bytes| {
        sizes.borrow_mut().push((records.len(), bytes));
        ok_append(records.len())
    });
    let sizes = sizes.into_inner();
    for (n, bytes) in &sizes {
        assert!(*bytes <= 4096 || *n == 1, "a batch of {n} records is {bytes} bytes");
    }
    assert!(sizes.iter().any(|(n, b)| *n == 1 && *b > 20_000), "the large record went alone: {sizes:?}");
    assert_eq!(sizes.iter().map(|(n, _)| n).sum::<usize>(), 30);
    assert!(sizes.len() >= 10, "{sizes:?}");
    assert_eq!(counts.iter().filter(|c| c.as_str() == metrics::RECORDS_SENT).count(), 30);
}

#[test]
fn a_413_is_split_like_a_400_and_nothing_is_set_aside() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let mut client = StateClient::new(state_config(json!({"max_batch": 8})));
    let mut counts: Vec<String> = Vec::new();
    for step in 1..=8 {
        client.enqueue(record("s1", step), &mut counts);
    }
    let too_large = Some(("413".into(), br#"{"error":"too_large","message":"the body is larger than 8388608 bytes"}"#.to_vec()));
    let sent = std::cell::RefCell::new(Vec::new());
    // The service (or a proxy in front of it) takes at most 3 records per body.
    serve(&mut client, &mut w, &mut h, &mut counts, |records, _| {
        if records.len() > 3 {
            return too_large.clone();
        }
        sent.borrow_mut().extend(records.iter().map(|r| r.step));
        ok_append(records.len())
    });
    let mut sent = sent.into_inner();
    sent.sort();
    assert_eq!(sent, (1..=8).collect::<Vec<_>>());
    let n = |name: &str| counts.iter().filter(|c| c.as_str() == name).count();
    assert_eq!((n(metrics::RECORDS_SENT), n(metrics::RECORDS_REJECTED), n(metrics::RECORDS_DROPPED)), (8, 0, 0));
    assert_eq!(client.rejected().count(), 0);
}

#[test]
fn records_are_bounded_when_queued() {
    let k = keys();
    let mut w = with_state(&k, "sync");
    let mut h = live_host();
    let mut client = StateClient::new(state_config(json!({})));
    let mut counts: Vec<String> = Vec::new();
    let mut r = record("s1", 1);
    r.mcp_method = Some("m".repeat(1_000_000));
    r.signals = vec!["sig".into(); 500];
    client.enqueue(r, &mut counts);
    client.on_tick(&mut h);
    let batch: crate::wire::RecordBatch = serde_json::from_slice(h.calls[0].body.as_deref().unwrap()).unwrap();
    let sent = &batch.records[0];
    assert!(sent.mcp_method.as_deref().unwrap().len() <= crate::wire::limits::MAX_TEXT_BYTES);
    assert_eq!(sent.signals.len(), crate::wire::limits::MAX_REASONS);
    assert!(h.calls[0].body.as_ref().unwrap().len() < 100_000);
    client.on_response(h.calls[0].token, ok_append(1), &mut w, &mut h, &mut counts);
}
