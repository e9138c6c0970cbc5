//! The API in-process, on each store: every behavioural test runs on SQLite and on a real
//! redis-server (`support`), so both stores keep one contract. Tests of what only one store has
//! (SQLite's group commit, Redis replicas sharing one server) follow.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod contract;
mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::{RedisCluster, RedisServer};
use tower::ServiceExt;
use warden_core::trail;
use warden_core::wire::{BeginOutcome, BeginStep, Begun, SessionView, StepRecord};
use warden_state::redis::RedisStore;
use warden_state::sqlite::SqliteStore;
use warden_state::store::{Store, StoreError};
use warden_state::{app, AppState};

const PROXY: &str = "proxy-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";
const SSF_PUSH: &str = "ssf-push-token-0123456789";

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Redis,
    /// A local three-master Redis Cluster: every key a script touches must share a slot.
    Cluster,
}

/// `name::sqlite`, `name::redis` and `name::redis_cluster`: the test `async fn name(b: Backend)`
/// on each store.
macro_rules! on_each_store {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await
            }
            #[tokio::test]
            async fn redis() {
                super::$name(super::Backend::Redis).await
            }
            #[tokio::test]
            async fn redis_cluster() {
                super::$name(super::Backend::Cluster).await
            }
        }
    )*};
}

struct Api {
    state: Arc<AppState>,
    /// The Redis server of a Redis store, stopped when the test ends.
    redis: Option<Arc<RedisServer>>,
    #[allow(dead_code)]
    cluster: Option<Arc<RedisCluster>>,
}

impl Api {
    async fn new(b: Backend) -> Self {
        match b {
            Backend::Sqlite => Self::with(SqliteStore::in_memory().unwrap()),
            Backend::Redis => Self::on_redis(Arc::new(RedisServer::start())).await,
            Backend::Cluster => {
                let cluster = Arc::new(tokio::task::spawn_blocking(RedisCluster::start).await.unwrap());
                let store = RedisStore::connect(&cluster.url()).await.unwrap();
                Self { state: Arc::new(AppState::new(Arc::new(store), PROXY, ADMIN)), redis: None, cluster: Some(cluster) }
            }
        }
    }

    /// A replica on `server`: several `Api`s on one server are replicas sharing one store.
    async fn on_redis(server: Arc<RedisServer>) -> Self {
        let store = RedisStore::connect(&server.url()).await.unwrap();
        Self { state: Arc::new(AppState::new(Arc::new(store), PROXY, ADMIN)), redis: Some(server), cluster: None }
    }

    fn with(store: impl Store) -> Self {
        Self { state: Arc::new(AppState::new(Arc::new(store), PROXY, ADMIN)), redis: None, cluster: None }
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        self.call_raw(method, path, token, body.map(|b| b.to_string())).await
    }

    /// A JSON body as given, valid or not.
    async fn call_raw(&self, method: &str, path: &str, token: Option<&str>, body: Option<String>) -> (StatusCode, Value) {
        self.send(method, path, token, body.map(|b| ("application/json", b))).await
    }

    /// A body of any content type. Every exchange is checked against openapi.yaml.
    async fn send(&self, method: &str, path: &str, token: Option<&str>, body: Option<(&str, String)>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match &body {
            Some((content_type, b)) => req.header("content-type", *content_type).body(Body::from(b.clone())).unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        let resp = app(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        contract::check(&contract::Exchange {
            method,
            uri: path,
            caller: caller(token),
            request: body.as_ref().map(|(content_type, b)| (*content_type, b.as_bytes())),
            status: status.as_u16(),
            content_type: content_type.as_deref(),
            body: &bytes,
        });
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v)
    }

    async fn begin(&self, sid: &str, subject: &str, cred: &str) -> Value {
        let (s, v) = self
            .call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": sid, "subject": subject, "credential": cred, "region": "eu"})))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    async fn view(&self, sid: &str) -> SessionView {
        let (s, v) = self.call("GET", &format!("/v1/sessions/{sid}"), Some(ADMIN), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }
}

on_each_store!(
    tokens_are_required_and_roles_enforced,
    every_endpoint_answers_only_its_roles,
    begin_step_counts_binds_and_audits,
    a_refused_step_answers_with_the_session_as_stored,
    records_chain_and_retries_are_idempotent,
    bad_requests_are_4xx_and_change_nothing,
    revocation_refuses_steps_and_feeds_proxies,
    search_by_subject_credential_workload_and_time,
    a_credential_shared_between_subjects_is_reported_and_scopes_are_kept,
    the_service_accepts_exactly_what_the_filter_bounds_to,
    an_oversized_body_is_413_with_the_error_shape_and_counted,
    impossible_history_is_refused_audited_and_changes_nothing,
    the_largest_batch_is_taken_whole,
    a_subject_s_profile_is_learned_from_its_records_handed_out_with_its_steps_and_reset,
);

/// The spec's name for a token's role.
fn caller(token: Option<&str>) -> contract::Caller {
    match token {
        None => contract::Caller::Anonymous,
        Some(PROXY) => contract::Caller::Role("proxy"),
        Some(ADMIN) => contract::Caller::Role("admin"),
        Some(SSF_PUSH) => contract::Caller::Role("ssf_push"),
        Some(_) => contract::Caller::Unknown,
    }
}

/// A minute ago, in ms: records of steps a proxy counted alone must be recent.
fn recently() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 - 60_000
}

/// The record of a step a proxy counted alone (cached mode): it may open and advance its session.
fn record(sid: &str, step: u64, action: &str) -> StepRecord {
    StepRecord {
        session_id: sid.into(),
        step,
        decision_id: format!("dec_{step}"),
        at_ms: recently() + step,
        begun: Begun::Cached,
        subject: "agent-7".into(),
        identity_kind: "jwt".into(),
        credential: Some("sha256:aaaa".into()),
        workload: Some("spiffe://example.org/w".into()),
        method: Some("GET".into()),
        path: Some(format!("/tickets/{step}")),
        action: action.into(),
        enforced: true,
        status: Some(200),
        ..Default::default()
    }
}

async fn tokens_are_required_and_roles_enforced(b: Backend) {
    let api = Api::new(b).await;
    let body = json!({"session_id": "s1", "subject": "a"});
    assert_eq!(api.call("POST", "/v1/steps/begin", None, Some(body.clone())).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(api.call("POST", "/v1/steps/begin", Some("wrong-token-xxxxxxxx"), Some(body.clone())).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(api.call("POST", "/v1/steps/begin", Some(ADMIN), Some(body)).await.0, StatusCode::FORBIDDEN);
    let (s, v) = api.call("GET", "/v1/sessions/s1", Some(PROXY), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["error"], "forbidden");
    assert_eq!(api.call("POST", "/v1/sessions/s1/revoke", Some(PROXY), None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.call("GET", "/healthz", None, None).await.0, StatusCode::OK);
}

async fn every_endpoint_answers_only_its_roles(b: Backend) {
    let api = Api::new(b).await;
    api.begin("r1", "agent-7", "sha256:a").await;
    let (ok, unauth, forbidden) = (StatusCode::OK, StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN);
    let begin = Some(json!({"session_id": "r1", "subject": "agent-7"}));
    // (method, path, body, without a token, with the proxy's, with the admin's)
    let matrix = [
        ("POST", "/v1/steps/begin", begin, unauth, ok, forbidden),
        ("POST", "/v1/records", Some(json!({"records": []})), unauth, ok, forbidden),
        ("GET", "/v1/revocations", None, unauth, ok, ok),
        ("GET", "/v1/sessions", None, unauth, forbidden, ok),
        ("GET", "/v1/sessions/r1", None, unauth, forbidden, ok),
        ("POST", "/v1/sessions/r2/revoke", None, unauth, forbidden, ok),
        ("GET", "/metrics", None, ok, ok, ok),
        ("GET", "/healthz", None, ok, ok, ok),
        ("GET", "/readyz", None, ok, ok, ok),
    ];
    for (method, path, body, none, proxy, admin) in matrix {
        for (token, expected) in [(None, none), (Some(PROXY), proxy), (Some(ADMIN), admin)] {
            let (s, v) = api.call(method, path, token, body.clone()).await;
            assert_eq!(s, expected, "{method} {path} with {token:?}: {v}");
        }
    }
}

async fn begin_step_counts_binds_and_audits(b: Backend) {
    let api = Api::new(b).await;
    let v = api.begin("s1", "agent-7", "sha256:a").await;
    assert_eq!((v["outcome"].as_str(), v["step"].as_u64(), v["new"].as_bool()), (Some("ok"), Some(1), Some(true)));
    let v = api.begin("s1", "agent-7", "sha256:b").await;
    assert_eq!((v["step"].as_u64(), v["new"].as_bool()), (Some(2), Some(false)));
    assert_eq!(v["session"]["credentials"], json!(["sha256:a"]), "the snapshot is the state before this step");
    let v = api.begin("s1", "intruder", "sha256:x").await;
    assert_eq!((v["outcome"].as_str(), v["step"].as_u64()), (Some("subject_mismatch"), Some(0)));
    let view = api.view("s1").await;
    assert_eq!(view.state.steps, 2);
    assert_eq!(view.state.credentials, vec!["sha256:a", "sha256:b"]);
    assert_eq!(view.audit.len(), 1);
    assert_eq!(view.audit[0].kind, "subject_mismatch");
    assert_eq!(view.audit[0].subject, "intruder");
}

async fn a_refused_step_answers_with_the_session_as_stored(b: Backend) {
    let api = Api::new(b).await;
    api.begin("k1", "agent-7", "sha256:a").await;
    let (s, v) = api
        .call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": "k1", "subject": "intruder", "known_steps": 50})))
        .await;
    assert_eq!((s, v["outcome"].as_str()), (StatusCode::OK, Some("subject_mismatch")));
    assert_eq!(v["session"]["steps"], 1, "a proxy's step count is not taken into a refused step");
    assert_eq!(api.view("k1").await.state.steps, 1);
}

async fn records_chain_and_retries_are_idempotent(b: Backend) {
    let api = Api::new(b).await;
    let batch = json!({"records": (1..=5).map(|i| record("s2", i, "allow")).collect::<Vec<_>>()});
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(batch.clone())).await;
    assert_eq!((s, v["appended"].as_u64()), (StatusCode::OK, Some(5)));
    let (_, v) = api.call("POST", "/v1/records", Some(PROXY), Some(batch)).await;
    assert_eq!((v["appended"].as_u64(), v["duplicates"].as_u64()), (Some(0), Some(5)));
    let view = api.view("s2").await;
    assert_eq!(view.timeline.len(), 5);
    assert_eq!(view.timeline.iter().map(|e| e.record.step).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(view.state.steps, 5, "records alone create and advance a session (cached mode)");
    assert_eq!(trail::verify(&view.timeline), Ok(()));
    // Secrets never: only the fingerprint is stored.
    assert!(view.timeline[0].body.contains("sha256:aaaa"));
}

async fn bad_requests_are_4xx_and_change_nothing(b: Backend) {
    let api = Api::new(b).await;
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": "nope"}))).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
    // One bad record in a batch: nothing of the batch is stored.
    let mut bad = record("s3", 2, "explode");
    bad.decision_id = "d".into();
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [record("s3", 1, "allow"), bad]}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().contains("unknown action"), "{v}");
    assert_eq!(api.call("GET", "/v1/sessions/s3", Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);
    for body in [json!({"session_id": "has space", "subject": "a"}), json!({"subject": "a"}), json!([1, 2])] {
        let (s, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    }
    let (s, _) = api.call("GET", "/v1/revocations?after=minus-one", Some(PROXY), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(api.call("GET", "/nope", Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);
}

async fn revocation_refuses_steps_and_feeds_proxies(b: Backend) {
    let api = Api::new(b).await;
    api.begin("s4", "agent-7", "sha256:a").await;
    let (s, v) = api.call("POST", "/v1/sessions/s4/revoke", Some(ADMIN), Some(json!({"reason": "incident 42"}))).await;
    assert_eq!((s, v["changed"].as_bool()), (StatusCode::OK, Some(true)));
    let v = api.begin("s4", "agent-7", "sha256:a").await;
    assert_eq!(v["outcome"], "revoked");
    // Revoking a session nobody has used yet makes sure it never starts.
    api.call("POST", "/v1/sessions/future/revoke", Some(ADMIN), None).await;
    assert_eq!(api.begin("future", "agent-7", "sha256:a").await["outcome"], "revoked");
    let (_, feed) = api.call("GET", "/v1/revocations?after=0", Some(PROXY), None).await;
    let ids: Vec<&str> = feed["revocations"].as_array().unwrap().iter().map(|r| r["session_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["s4", "future"]);
    let cursor = feed["cursor"].as_u64().unwrap();
    let (_, feed) = api.call("GET", &format!("/v1/revocations?after={cursor}"), Some(PROXY), None).await;
    assert_eq!(feed["revocations"], json!([]));
    // A terminate decision in the trail revokes the session too.
    api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [record("s5", 1, "terminate")]}))).await;
    let view = api.view("s5").await;
    assert!(view.state.revoked);
    assert!(view.revoke_reason.unwrap().starts_with("terminated by policy"));
}

async fn search_by_subject_credential_workload_and_time(b: Backend) {
    let api = Api::new(b).await;
    api.begin("a1", "alice", "sha256:1").await;
    api.begin("b1", "bob", "sha256:2").await;
    api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [record("c1", 1, "allow")]}))).await;
    let ids = |v: Value| v["sessions"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(ids(api.call("GET", "/v1/sessions?subject=alice", Some(ADMIN), None).await.1), vec!["a1"]);
    assert_eq!(ids(api.call("GET", "/v1/sessions?credential=sha256:aaaa", Some(ADMIN), None).await.1), vec!["c1"]);
    assert_eq!(ids(api.call("GET", "/v1/sessions?workload=spiffe://example.org/w", Some(ADMIN), None).await.1), vec!["c1"]);
    assert_eq!(ids(api.call("GET", "/v1/sessions?since_ms=99999999999999", Some(ADMIN), None).await.1), Vec::<String>::new());
    assert_eq!(ids(api.call("GET", "/v1/sessions?subject=alice&until_ms=99999999999999&since_ms=1", Some(ADMIN), None).await.1), vec!["a1"]);
    assert_eq!(ids(api.call("GET", "/v1/sessions?subject=alice&credential=sha256:aaaa", Some(ADMIN), None).await.1), Vec::<String>::new());
    assert_eq!(ids(api.call("GET", "/v1/sessions?limit=2", Some(ADMIN), None).await.1).len(), 2);
}

#[tokio::test]
async fn sqlite_survives_a_restart_and_metrics_count() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    {
        let api = Api::with(SqliteStore::open(&db).unwrap());
        api.begin("p1", "agent-7", "sha256:a").await;
        api.begin("p1", "agent-7", "sha256:a").await;
        let (_, m) = api.call("GET", "/metrics", None, None).await;
        assert!(m.as_str().unwrap().contains("warden_state_steps_begun_total 2"), "{m}");
    }
    let api = Api::with(SqliteStore::open(&db).unwrap());
    assert_eq!(api.begin("p1", "agent-7", "sha256:a").await["step"], 3);
}

#[tokio::test]
async fn metrics_count_refusals_and_store_failures_of_the_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let api = Api::with(SqliteStore::open(&db).unwrap());
    api.begin("m1", "agent-7", "sha256:a").await;
    // Counted as rejected: no token, the other role's token, a body or query that does not
    // parse, a request that fails validation, an unknown session.
    let begin = json!({"session_id": "m1", "subject": "agent-7"});
    assert_eq!(api.call("POST", "/v1/steps/begin", None, Some(begin.clone())).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(api.call("POST", "/v1/steps/begin", Some(ADMIN), Some(begin)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.call("GET", "/v1/sessions?subject=a", Some(PROXY), None).await.0, StatusCode::FORBIDDEN);
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": "nope"}))).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
    assert!(v["message"].as_str().unwrap().starts_with("body: "), "{v}");
    let (s, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": "has space", "subject": "a"}))).await;
    assert_eq!((s, v["message"].as_str()), (StatusCode::BAD_REQUEST, Some("session_id must be 1-256 visible ASCII characters")));
    let (s, v) = api.call("POST", "/v1/sessions/has%20space/revoke", Some(ADMIN), None).await;
    assert_eq!((s, v["message"].as_str()), (StatusCode::BAD_REQUEST, Some("session_id must be 1-256 visible ASCII characters")));
    let too_many = json!({"records": (1..=1001).map(|i| record("m2", i, "allow")).collect::<Vec<_>>()});
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(too_many)).await;
    assert_eq!((s, v["message"].as_str()), (StatusCode::BAD_REQUEST, Some("at most 1000 records per batch")));
    let (s, v) = api.call("GET", "/v1/revocations?after=minus-one", Some(PROXY), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().starts_with("query: "), "{v}");
    let (s, v) = api.call("GET", "/v1/sessions/unknown", Some(ADMIN), None).await;
    assert_eq!((s, v["message"].as_str()), (StatusCode::NOT_FOUND, Some("no session unknown")));
    // Not counted: an unknown endpoint, and what axum refuses before the token is looked at (a
    // session id that does not decode, a revocation's body that does not parse).
    assert_eq!(api.call("GET", "/nope", Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);
    for token in [Some(ADMIN), None] {
        for (method, path, body) in [("GET", "/v1/sessions/%FF", None), ("POST", "/v1/sessions/%FF/revoke", None), ("POST", "/v1/sessions/m1/revoke", Some("{"))] {
            let (s, v) = api.call_raw(method, path, token, body.map(String::from)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {path}");
            assert!(v.is_string(), "axum's own rejection, not an API error body: {v}");
        }
    }
    // A store failure: a session whose stored state no longer parses.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute("UPDATE sessions SET state = 'not json' WHERE id = 'm1'", []).unwrap();
    let (s, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": "m1", "subject": "agent-7"}))).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("internal")));

    let (s, m) = api.call("GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let expected = "\
# HELP warden_state_steps_begun_total Steps counted
# TYPE warden_state_steps_begun_total counter
warden_state_steps_begun_total 1
# HELP warden_state_steps_refused_total Steps refused (subject mismatch or revoked session)
# TYPE warden_state_steps_refused_total counter
warden_state_steps_refused_total 0
# HELP warden_state_records_appended_total Attribution records appended
# TYPE warden_state_records_appended_total counter
warden_state_records_appended_total 0
# HELP warden_state_records_duplicate_total Attribution records already stored (retries)
# TYPE warden_state_records_duplicate_total counter
warden_state_records_duplicate_total 0
# HELP warden_state_records_refused_total Attribution records refused by the trail's invariants (kept in audit events)
# TYPE warden_state_records_refused_total counter
warden_state_records_refused_total 0
# HELP warden_state_revocations_total Sessions revoked
# TYPE warden_state_revocations_total counter
warden_state_revocations_total 0
# HELP warden_state_rejected_requests_total Requests refused with a 4xx
# TYPE warden_state_rejected_requests_total counter
warden_state_rejected_requests_total 9
# HELP warden_state_store_errors_total Requests that failed in the store
# TYPE warden_state_store_errors_total counter
warden_state_store_errors_total 1
# HELP warden_state_store_commits_total SQLite write transactions committed (each carries a group of writes)
# TYPE warden_state_store_commits_total counter
warden_state_store_commits_total 2
# HELP warden_state_store_writes_total Writes (begin-steps, record batches, revocations) committed in those transactions
# TYPE warden_state_store_writes_total counter
warden_state_store_writes_total 2
# HELP warden_state_store_failed_transactions_total Write transactions that failed as a whole (their writes got a store error)
# TYPE warden_state_store_failed_transactions_total counter
warden_state_store_failed_transactions_total 0
";
    assert_eq!(m.as_str().unwrap(), expected);
}

async fn a_credential_shared_between_subjects_is_reported_and_scopes_are_kept(b: Backend) {
    let api = Api::new(b).await;
    let (_, v) = api
        .call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": "x1", "subject": "alice", "credential": "sha256:same", "scopes": ["read"]})))
        .await;
    assert_eq!(v["session"]["credential_subjects"], json!(["alice"]));
    let (_, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": "x2", "subject": "bob", "credential": "sha256:same"}))).await;
    assert_eq!(v["session"]["credential_subjects"], json!(["alice", "bob"]));
    let (_, v) = api
        .call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": "x1", "subject": "alice", "credential": "sha256:same", "scopes": ["read", "admin"]})))
        .await;
    assert_eq!(v["session"]["scopes"], json!(["read"]), "a session keeps the scopes it started with");
}

// ---------------------------------------------------------------- the trail's invariants

/// The record of a step the service counted (`begun: service`), by `subject`, now.
fn counted(sid: &str, step: u64, decision: &str, subject: &str) -> StepRecord {
    StepRecord { subject: subject.into(), decision_id: decision.into(), begun: Begun::Service, at_ms: recently() + 60_000, ..record(sid, step, "allow") }
}

async fn impossible_history_is_refused_audited_and_changes_nothing(b: Backend) {
    let api = Api::new(b).await;
    api.begin("h1", "alice", "sha256:alice").await;
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [counted("h1", 1, "d1", "alice")]}))).await;
    assert_eq!((s, v["appended"].as_u64()), (StatusCode::OK, Some(1)), "{v}");
    let before = api.view("h1").await;

    let forged = [
        (counted("h1", 1, "other", "alice"), "step_already_recorded"),
        (counted("h1", 5, "d5", "alice"), "step_not_begun"),
        (counted("h1", 1, "d1-by-mallory", "mallory"), "step_already_recorded"),
        // Another subject on a step the proxy says it counted alone, with alice's credential.
        (StepRecord { credential: Some("sha256:alice".into()), begun: Begun::Cached, ..counted("h1", 2, "d2", "mallory") }, "record_subject_mismatch"),
        (StepRecord { at_ms: recently() + 3_600_000, ..counted("h1", 1, "d1", "alice") }, "duplicate"),
    ];
    for (r, code) in &forged {
        let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [r]}))).await;
        if *code == "duplicate" {
            // Same session, step and decision id: a retry, whatever else it says.
            assert_eq!((s, v["duplicates"].as_u64()), (StatusCode::OK, Some(1)), "{v}");
            continue;
        }
        assert_eq!(s, StatusCode::CONFLICT, "{code}: {v}");
        assert_eq!((v["error"].as_str(), v["refused"][0]["code"].as_str(), v["appended"].as_u64()), (Some("records_refused"), Some(*code), Some(0)), "{v}");
    }
    let after = api.view("h1").await;
    assert_eq!((after.state, after.timeline, after.head), (before.state, before.timeline, before.head), "a refused record changes nothing");
    let kinds: Vec<&str> = after.audit.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, vec!["step_already_recorded", "step_not_begun", "step_already_recorded", "record_subject_mismatch"]);
    // Refused is not lost: each audit event keeps the whole record.
    let kept: StepRecord = serde_json::from_str(after.audit[0].record.as_deref().unwrap()).unwrap();
    assert_eq!((kept.step, kept.decision_id.as_str()), (1, "other"));
    assert!(after.audit[1].detail.contains("the service counted 1 step(s)"), "{}", after.audit[1].detail);

    // Alice's credential did not become shared through the forged record by mallory.
    let v = api.begin("h1", "alice", "sha256:alice").await;
    assert_eq!(v["session"]["credential_subjects"], json!(["alice"]));

    // Sessions nobody began: not through a service-counted record, nor one from 1970.
    let opened_1970 = StepRecord { at_ms: 0, begun: Begun::Proxy, ..counted("h2", 1, "d1", "alice") };
    for (r, code) in [(counted("h2", 1, "d1", "alice"), "session_not_begun"), (opened_1970, "record_time_implausible")] {
        let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [r]}))).await;
        assert_eq!((s, v["refused"][0]["code"].as_str()), (StatusCode::CONFLICT, Some(code)), "{v}");
    }
    assert_eq!(api.call("GET", "/v1/sessions/h2", Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);

    // A batch mixing both: the valid records are appended, the refused one is named.
    let (s, v) = api
        .call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [counted("h1", 2, "d2", "alice"), counted("h1", 9, "d9", "alice"), record("h3", 1, "allow")]})))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!((v["appended"].as_u64(), v["refused"].as_array().map(Vec::len), v["refused"][0]["step"].as_u64()), (Some(2), Some(1), Some(9)), "{v}");
    let (_, m) = api.call("GET", "/metrics", None, None).await;
    assert_eq!(store_counter(&m, "warden_state_records_refused_total"), 7);
}

#[tokio::test]
async fn a_session_s_head_names_a_removed_tail() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let api = Api::with(SqliteStore::open(&db).unwrap());
    let batch = json!({"records": (1..=4).map(|i| record("t1", i, "allow")).collect::<Vec<_>>()});
    assert_eq!(api.call("POST", "/v1/records", Some(PROXY), Some(batch)).await.0, StatusCode::OK);
    let view = api.view("t1").await;
    let head = view.head.clone().unwrap();
    assert_eq!((head.records, head.hash.as_str()), (4, view.timeline[3].hash.as_str()));
    assert_eq!(trail::verify_head(&view.timeline, &head, "the session's head"), Ok(()));
    // Someone with the database file deletes the last two records: the chain still verifies,
    // the head does not.
    rusqlite::Connection::open(&db).unwrap().execute("DELETE FROM records WHERE session_id = 't1' AND seq > 2", []).unwrap();
    let cut = api.view("t1").await;
    assert_eq!(trail::verify(&cut.timeline), Ok(()));
    let why = trail::verify_head(&cut.timeline, cut.head.as_ref().unwrap(), "the session's head").unwrap_err();
    assert!(why.starts_with("the last 2 record(s) are missing"), "{why}");
}

// ---------------------------------------------------------------- behavioural profiles

async fn a_subject_s_profile_is_learned_from_its_records_handed_out_with_its_steps_and_reset(b: Backend) {
    let api = Api::new(b).await;
    let subject = "spiffe://example.org/ns/ops/sa/report-bot";
    let path = format!("/v1/profiles/{}", subject.replace('/', "%2F").replace(':', "%3A"));
    assert_eq!(api.call("GET", &path, Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);
    for (i, sid) in ["p1", "p2"].iter().enumerate() {
        for step in 1..=3u64 {
            let (s, v) = api
                .call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": sid, "subject": subject, "region": "eu", "authority": "t1.example"})))
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let r = StepRecord {
                region: Some("eu".into()),
                authority: Some("t1.example".into()),
                tool: Some("report.build".into()),
                response_bytes: Some(1000 * (i as u64 + 1)),
                action: if step == 3 { "deny".into() } else { "allow".into() },
                ..counted(sid, step, &format!("d{step}"), subject)
            };
            let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [r]}))).await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
    }
    let (s, p) = api.call("GET", &path, Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert!((p["steps"].as_f64().unwrap() - 6.0).abs() < 1e-3, "{p}");
    assert!((p["regions"]["eu"]["count"].as_f64().unwrap() - 6.0).abs() < 1e-3, "{p}");
    assert!(p["authorities"]["t1.example"]["count"].as_f64().unwrap() > 5.9 && p["tools"]["report.build"]["count"].as_f64().unwrap() > 5.9, "{p}");
    assert!(p["bytes_per_step"].as_f64().unwrap() > 1000.0, "{p}");
    // The session keeps its data volume and its refusals; the next step carries the profile.
    let view = api.view("p2").await;
    assert_eq!((view.state.bytes_out, view.state.refusals.len(), view.state.authorities.clone()), (6000, 1, vec!["t1.example".to_string()]));
    let (_, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": "p3", "subject": subject}))).await;
    assert!((v["session"]["profile"]["steps"].as_f64().unwrap() - 6.0).abs() < 1e-3, "{v}");
    assert!(api.view("p3").await.state.profile.is_none(), "the profile is handed out, never stored with a session");
    // Admins only; a reset forgets it until the next records.
    assert_eq!(api.call("GET", &path, Some(PROXY), None).await.0, StatusCode::FORBIDDEN);
    let (s, v) = api.call("DELETE", &path, Some(ADMIN), None).await;
    assert_eq!((s, v["reset"].as_bool()), (StatusCode::OK, Some(true)), "{v}");
    assert_eq!(api.call("GET", &path, Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.call("DELETE", &path, Some(ADMIN), None).await.1["reset"], json!(false));
    let (s, v) = api.call("GET", &format!("/v1/profiles/{}", "x".repeat(1025)), Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

// ---------------------------------------------------------------- shared signals

/// A transmitter's key and a SET it signs (`typ: secevent+jwt`).
fn signed_set(kp: &jwt_simple::prelude::ES256KeyPair, aud: &str, events: Value) -> String {
    use jwt_simple::prelude::*;
    let claims = JWTClaims {
        issued_at: Some(Duration::from_secs(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())),
        expires_at: None,
        invalid_before: None,
        issuer: Some("https://idp.test".into()),
        subject: None,
        audiences: Some(Audiences::AsString(aud.into())),
        jwt_id: Some("set-1".into()),
        nonce: None,
        custom: json!({"events": events}),
    };
    let opts = HeaderOptions { signature_type: Some("secevent+jwt".into()), ..Default::default() };
    kp.sign_with_options(claims, &opts).unwrap()
}

#[tokio::test]
async fn shared_signals_revoke_the_sessions_a_verified_set_names() {
    use jwt_simple::prelude::*;
    let kp = ES256KeyPair::generate();
    let tx = warden_state::ssf::Transmitter::from_pem("https://idp.test", &kp.to_pem().unwrap()).unwrap();
    let (keys, _) = warden_core::identity::jwks::parse_jwks(&tx.jwks(), &["ES256".to_string()]).unwrap();
    let receiver = warden_core::ssf::Receiver { issuer: "https://idp.test".into(), audience: "https://warden.test".into(), keys, max_age_seconds: 300 };
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let state = AppState::new(store, PROXY, ADMIN).with_ssf(Some(Arc::new(receiver)), Some(SSF_PUSH), Some(tx.jwks()));
    let api = Api { state: Arc::new(state), redis: None, cluster: None };
    for sid in ["a1", "a2"] {
        api.begin(sid, "alice", "sha256:alice").await;
    }
    api.begin("b1", "bob", "sha256:bob").await;
    let push = |set: String, token: Option<&'static str>| {
        let api = &api;
        async move { api.send("POST", "/v1/ssf/events", token, Some(("application/secevent+jwt", set))).await }
    };
    let revoked = |e: Value| json!({"https://schemas.openid.net/secevent/caep/event-type/session-revoked": e});
    // Refused: nothing changes.
    let (s, v) = push(signed_set(&ES256KeyPair::generate(), "https://warden.test", revoked(json!({"subject": {"format": "opaque", "id": "a1"}}))), Some(SSF_PUSH)).await;
    assert_eq!((s, v["err"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_key")), "{v}");
    let (s, v) = push(signed_set(&kp, "https://other.test", revoked(json!({"subject": {"format": "opaque", "id": "a1"}}))), Some(SSF_PUSH)).await;
    assert_eq!((s, v["err"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_audience")), "{v}");
    assert_eq!(push(signed_set(&kp, "https://warden.test", revoked(json!({"subject": {"format": "opaque", "id": "a1"}}))), None).await.0, StatusCode::UNAUTHORIZED);
    assert!(api.view("a1").await.revoked_at_ms.is_none());
    // One session, then every session of a subject.
    let (s, v) = push(signed_set(&kp, "https://warden.test", revoked(json!({"subject": {"format": "opaque", "id": "a1"}, "reason_admin": {"en": "lost device"}}))), Some(SSF_PUSH)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let a1 = api.view("a1").await;
    assert!(a1.revoke_reason.unwrap().contains("lost device") && api.view("a2").await.revoked_at_ms.is_none());
    let (s, _) = push(signed_set(&kp, "https://warden.test", revoked(json!({"subject": {"format": "iss_sub", "iss": "https://idp.test", "sub": "alice"}}))), Some(SSF_PUSH)).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert!(api.view("a2").await.revoked_at_ms.is_some() && api.view("b1").await.revoked_at_ms.is_none());
    // The revocations reach the proxies' feed like any other.
    let (_, feed) = api.call("GET", "/v1/revocations?after=0", Some(PROXY), None).await;
    let ids: Vec<&str> = feed["revocations"].as_array().unwrap().iter().map(|r| r["session_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["a1", "a2"]);
    // The transmitter's public key is published, with no token.
    let (s, jwks) = api.call("GET", "/v1/ssf/jwks", None, None).await;
    assert_eq!((s, jwks["keys"][0]["kty"].as_str()), (StatusCode::OK, Some("EC")));
    // Without a receiver or a transmitter configured: 404.
    let plain = Api::new(Backend::Sqlite).await;
    assert_eq!(plain.send("POST", "/v1/ssf/events", Some(SSF_PUSH), Some(("application/secevent+jwt", "x".into()))).await.0, StatusCode::NOT_FOUND);
    assert_eq!(plain.call("GET", "/v1/ssf/jwks", None, None).await.0, StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------- group commit

fn store_counter(metrics: &Value, name: &str) -> u64 {
    let text = metrics.as_str().unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap().trim().parse().unwrap()
}

fn begin_req(sid: &str, subject: &str) -> BeginStep {
    BeginStep {
        session_id: sid.into(),
        subject: subject.into(),
        credential: Some("sha256:c".into()),
        workload: None,
        region: None,
        device: None,
        authority: None,
        tools: Vec::new(),
        known_steps: None,
        scopes: Vec::new(),
        proof: None,
    }
}

/// Hold the database's write lock from another connection: the store's writer waits for it,
/// so everything queued meanwhile is committed together in the group after.
fn lock_writes(db: &std::path::Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_begin_steps_get_unique_consecutive_numbers_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let api = Arc::new(Api::with(SqliteStore::open(&db).unwrap()));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let api = api.clone();
        // Half on one shared session, half each on a session of its own.
        let sid = if i % 2 == 0 { "shared".to_string() } else { format!("own-{i}") };
        tasks.push(tokio::spawn(async move { (sid.clone(), api.begin(&sid, "agent-7", "sha256:a").await) }));
    }
    let mut shared_steps = Vec::new();
    for t in tasks {
        let (sid, v) = t.await.unwrap();
        assert_eq!(v["outcome"], "ok");
        if sid == "shared" {
            shared_steps.push(v["step"].as_u64().unwrap());
        } else {
            assert_eq!((v["step"].as_u64(), v["new"].as_bool()), (Some(1), Some(true)), "{sid}");
        }
    }
    shared_steps.sort_unstable();
    assert_eq!(shared_steps, (1..=100).collect::<Vec<_>>(), "every step number once, none lost");
    let (_, m) = api.call("GET", "/metrics", None, None).await;
    let (commits, writes) = (store_counter(&m, "warden_state_store_commits_total"), store_counter(&m, "warden_state_store_writes_total"));
    assert_eq!(writes, 200);
    assert!(commits >= 1 && commits <= writes, "{commits} commits for {writes} writes");
    assert_eq!(api.view("shared").await.state.steps, 100);
    let (_, list) = api.call("GET", "/v1/sessions?subject=agent-7&limit=1000", Some(ADMIN), None).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 101);
    drop(list);

    // Reopen the same file: everything is there and counting goes on.
    drop(Arc::try_unwrap(api).ok().unwrap());
    let api = Api::with(SqliteStore::open(&db).unwrap());
    assert_eq!(api.view("shared").await.state.steps, 100);
    assert_eq!(api.view("own-199").await.state.steps, 1);
    assert_eq!(api.begin("shared", "agent-7", "sha256:a").await["step"], 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_record_batches_keep_a_verifiable_chain() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let api = Arc::new(Api::with(SqliteStore::open(&db).unwrap()));
    let mut tasks = Vec::new();
    // 40 batches of 5 records of one session, plus begin-steps of that session, all at once.
    for b in 0..40u64 {
        let a = api.clone();
        tasks.push(tokio::spawn(async move {
            let batch = json!({"records": (1..=5).map(|i| record("chain", b * 5 + i, "allow")).collect::<Vec<_>>()});
            let (s, v) = a.call("POST", "/v1/records", Some(PROXY), Some(batch)).await;
            assert_eq!((s, v["appended"].as_u64()), (StatusCode::OK, Some(5)), "{v}");
        }));
        let a = api.clone();
        tasks.push(tokio::spawn(async move {
            a.begin("chain", "agent-7", "sha256:aaaa").await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let view = api.view("chain").await;
    assert_eq!(view.timeline.len(), 200);
    assert_eq!(trail::verify(&view.timeline), Ok(()));
    let mut steps: Vec<u64> = view.timeline.iter().map(|e| e.record.step).collect();
    steps.sort_unstable();
    assert_eq!(steps, (1..=200).collect::<Vec<_>>());
    drop(Arc::try_unwrap(api).ok().unwrap());
    let api = Api::with(SqliteStore::open(&db).unwrap());
    let again = api.view("chain").await;
    assert_eq!(trail::verify(&again.timeline), Ok(()));
    assert_eq!(again.timeline, view.timeline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_operation_does_not_affect_the_others_in_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let api = Api::with(SqliteStore::open(&db).unwrap());
    api.begin("bound", "alice", "sha256:a").await;
    api.begin("revoked", "alice", "sha256:a").await;
    api.call("POST", "/v1/sessions/revoked/revoke", Some(ADMIN), None).await;
    api.begin("broken", "alice", "sha256:a").await;
    api.begin("good", "alice", "sha256:a").await;
    let (_, m) = api.call("GET", "/metrics", None, None).await;
    let (commits0, writes0) = (store_counter(&m, "warden_state_store_commits_total"), store_counter(&m, "warden_state_store_writes_total"));

    let now = recently() + 60_000;
    let locker = lock_writes(&db);
    // A session whose stored state no longer parses: appending to it fails in the store.
    locker.execute("UPDATE sessions SET state = 'not json' WHERE id = 'broken'", []).unwrap();
    let store = api.state.store.clone();
    // Queued in this order while the writer waits for the lock.
    let ok1 = store.begin_step(begin_req("good", "alice"), now);
    let mismatch = store.begin_step(begin_req("bound", "mallory"), now);
    let revoked = store.begin_step(begin_req("revoked", "alice"), now);
    // The batch's first record (session "fresh") is written, then "broken" fails: all of it goes.
    let failing = store.append(vec![record("fresh", 1, "allow"), record("broken", 1, "allow")], now);
    // An invalid batch is refused at the API edge: answered while the writer still waits, it
    // never reaches the store.
    let mut invalid = record("good", 1, "explode");
    invalid.decision_id = "bad".into();
    let refused = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [record("good", 2, "allow"), invalid]})));
    let (s, v) = tokio::time::timeout(std::time::Duration::from_secs(5), refused).await.expect("answered without the writer");
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains("unknown action"), "{v}");
    let alice = |sid: &str| StepRecord { subject: "alice".into(), ..record(sid, 1, "allow") };
    let batch = store.append(vec![alice("good"), record("other", 1, "allow")], now);
    let mut ok2 = store.begin_step(begin_req("good", "alice"), now);
    // Nothing is answered before its transaction has committed.
    assert!(tokio::time::timeout(std::time::Duration::from_millis(100), &mut ok2).await.is_err());
    // Reads are not queued behind the writer: they see the last commit.
    assert_eq!(api.view("good").await.state.steps, 1);
    locker.execute_batch("COMMIT").unwrap();

    let ok1 = ok1.await.unwrap();
    assert_eq!((ok1.outcome, ok1.step), (BeginOutcome::Ok, 2));
    assert_eq!(mismatch.await.unwrap().outcome, BeginOutcome::SubjectMismatch);
    assert_eq!(revoked.await.unwrap().outcome, BeginOutcome::Revoked);
    assert!(matches!(failing.await, Err(StoreError::Backend(_))));
    let batch = batch.await.unwrap();
    assert_eq!((batch.appended, batch.duplicates), (2, 0));
    assert_eq!(ok2.await.unwrap().step, 3);

    let (_, m) = api.call("GET", "/metrics", None, None).await;
    let (commits, writes) = (store_counter(&m, "warden_state_store_commits_total"), store_counter(&m, "warden_state_store_writes_total"));
    // The invalid batch never reached the writer; the other six went in at most two transactions.
    assert_eq!(writes - writes0, 6);
    assert!(commits - commits0 <= 2, "{} commits", commits - commits0);
    assert_eq!(store_counter(&m, "warden_state_store_failed_transactions_total"), 0);

    // The failed batch left nothing, not even its first record's new session.
    assert_eq!(api.call("GET", "/v1/sessions/fresh", Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);
    // The refusals were audited and changed nothing else.
    let bound = api.view("bound").await;
    assert_eq!((bound.state.steps, bound.audit.len(), bound.audit[0].kind.as_str()), (1, 1, "subject_mismatch"));
    let rv = api.view("revoked").await;
    assert_eq!((rv.state.steps, rv.audit[0].kind.as_str()), (1, "revoked_session_used"));
    // The good session has its steps and its one record (the invalid batch's record 2 is not there).
    let good = api.view("good").await;
    assert_eq!(good.state.steps, 3);
    assert_eq!(good.timeline.iter().map(|e| e.record.step).collect::<Vec<_>>(), vec![1]);
    assert_eq!(trail::verify(&good.timeline), Ok(()));
    assert_eq!(api.view("other").await.timeline.len(), 1);
}

async fn the_service_accepts_exactly_what_the_filter_bounds_to(b: Backend) {
    use warden_core::wire::limits;
    let api = Api::new(b).await;
    // Over a limit: refused, naming the field; the same values bounded by the filter's rule: taken.
    let mut r = record("lim1", 1, "allow");
    r.mcp_method = Some("m".repeat(limits::MAX_TEXT_BYTES + 1));
    r.signals = vec!["s".into(); limits::MAX_REASONS + 1];
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [r.clone()]}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.starts_with("record for session lim1 step 1: over its limits: mcp_method, signals"), "{msg}");
    r.bound();
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [r]}))).await;
    assert_eq!((s, v["appended"].as_u64()), (StatusCode::OK, Some(1)), "{v}");

    let mut b = begin_req("lim2", &"a".repeat(2000));
    b.region = Some("r".repeat(5000));
    let (s, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(serde_json::to_value(&b).unwrap())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().starts_with("begin-step: over its limits: subject, region"), "{v}");
    b.bound();
    let (s, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(serde_json::to_value(&b).unwrap())).await;
    assert_eq!((s, v["outcome"].as_str()), (StatusCode::OK, Some("ok")), "{v}");
}

async fn an_oversized_body_is_413_with_the_error_shape_and_counted(b: Backend) {
    use warden_core::wire::limits;
    let api = Api::new(b).await;
    let big = "x".repeat(limits::MAX_BODY_BYTES);
    let body = format!(r#"{{"records":[{{"session_id":"big","step":1,"decision_id":"d","action":"allow","path":"{big}"}}]}}"#);
    let (s, v) = api.call_raw("POST", "/v1/records", Some(PROXY), Some(body)).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("8388608"), "{v}");
    let body = format!(r#"{{"session_id":"big","subject":"{big}"}}"#);
    assert_eq!(api.call_raw("POST", "/v1/steps/begin", Some(PROXY), Some(body)).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(api.call("GET", "/v1/sessions/big", Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);
    let (_, m) = api.call("GET", "/metrics", None, None).await;
    // The two 413s and the 404 of the session that was never stored.
    assert!(m.as_str().unwrap().contains("warden_state_rejected_requests_total 3"), "{m}");
}

// ---------------------------------------------------------------- Redis: replicas sharing one server

/// `n` replicas (stores, each its own connection) on one Redis, with the log's signing key.
async fn replicas(server: &Arc<RedisServer>, n: usize) -> (Vec<Arc<Api>>, warden_log::KeyRing) {
    replicas_at(&server.url(), n).await
}

async fn replicas_at(url: &str, n: usize) -> (Vec<Arc<Api>>, warden_log::KeyRing) {
    let (skey, vkey) = warden_log::generate_log_key("warden.test/log").unwrap();
    let signer = Arc::new(warden_log::LogSigner::from_keys(&[skey]).unwrap());
    let mut apis = Vec::new();
    for _ in 0..n {
        let store = RedisStore::connect(url).await.unwrap();
        let state = AppState::new(Arc::new(store), PROXY, ADMIN).with_log(Some(signer.clone()), None);
        apis.push(Arc::new(Api { state: Arc::new(state), redis: None, cluster: None }));
    }
    (apis, warden_log::KeyRing::new(&[vkey]).unwrap())
}

/// The log as the service proves it: a checkpoint signed now, and every record of `sids` in it
/// by its inclusion proof (each record once: as many leaves as records).
async fn assert_logged(api: &Api, keys: &warden_log::KeyRing, sids: &[&str]) -> u64 {
    let (s, note) = api.call("POST", "/v1/log/checkpoint", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK, "{note}");
    let cp = keys.verify_checkpoint(note.as_str().unwrap()).unwrap();
    let mut total = 0;
    for sid in sids {
        let view = api.view(sid).await;
        trail::verify(&view.timeline).unwrap();
        let (s, ev) = api.call("GET", &format!("/v1/log/proof/session/{sid}"), Some(ADMIN), None).await;
        assert_eq!(s, StatusCode::OK, "{ev}");
        let ev: warden_log::SessionEvidence = serde_json::from_value(ev).unwrap();
        let cp_now = keys.verify_checkpoint(&ev.checkpoint).unwrap();
        assert_eq!(ev.leaves.len(), view.timeline.len(), "{sid}: one leaf per record");
        for (e, l) in view.timeline.iter().zip(&ev.leaves) {
            assert_eq!((l.seq, &l.hash), (e.seq, &e.hash));
            let leaf = warden_log::leaf_hash(sid, e.seq, &e.hash);
            warden_log::check_inclusion(&warden_log::decode(&l.proof).unwrap(), l.leaf_index, cp_now.size, leaf, cp_now.root).unwrap();
        }
        total += view.timeline.len() as u64;
    }
    assert_eq!(cp.size, total, "the log holds every record once");
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_replicas_hand_out_unique_consecutive_steps() {
    let server = RedisServer::start();
    replicas_hand_out_unique_consecutive_steps(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_replicas_hand_out_unique_consecutive_steps() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start).await.unwrap();
    replicas_hand_out_unique_consecutive_steps(&cluster.url()).await;
}

async fn replicas_hand_out_unique_consecutive_steps(url: &str) {
    let (apis, _) = replicas_at(url, 2).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let api = apis[i % 2].clone();
        // Half on one shared session (through both replicas), half each on a session of its own.
        let sid = if i % 2 == 0 || i % 3 == 0 { "shared".to_string() } else { format!("own-{i}") };
        tasks.push(tokio::spawn(async move { (sid.clone(), api.begin(&sid, "agent-7", "sha256:a").await) }));
    }
    let mut shared = Vec::new();
    let mut own = 0;
    for t in tasks {
        let (sid, v) = t.await.unwrap();
        assert_eq!(v["outcome"], "ok");
        if sid == "shared" {
            shared.push(v["step"].as_u64().unwrap());
        } else {
            own += 1;
            assert_eq!((v["step"].as_u64(), v["new"].as_bool()), (Some(1), Some(true)), "{sid}");
        }
    }
    shared.sort_unstable();
    assert_eq!(shared, (1..=shared.len() as u64).collect::<Vec<_>>(), "every step number once, none lost");
    assert_eq!(apis[1].view("shared").await.state.steps, shared.len() as u64);
    let (_, list) = apis[0].call("GET", "/v1/sessions?subject=agent-7&limit=1000", Some(ADMIN), None).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), own + 1);
    // A replica started later (or restarted) goes on counting.
    let later = &replicas_at(url, 1).await.0[0];
    assert_eq!(later.begin("shared", "agent-7", "sha256:a").await["step"], shared.len() as u64 + 1);
    let (_, m) = apis[0].call("GET", "/metrics", None, None).await;
    let m = m.as_str().unwrap();
    assert!(m.contains("warden_state_redis_op_seconds_count{op=\"begin_step\"} 100"), "{m}");
    assert!(m.contains("# TYPE warden_state_redis_in_flight gauge"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_replicas_append_concurrent_batches_into_one_chain_and_one_log() {
    let server = RedisServer::start();
    replicas_append_concurrent_batches_into_one_chain_and_one_log(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_replicas_append_concurrent_batches_into_one_chain_and_one_log() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start).await.unwrap();
    replicas_append_concurrent_batches_into_one_chain_and_one_log(&cluster.url()).await;
}

async fn replicas_append_concurrent_batches_into_one_chain_and_one_log(url: &str) {
    let (apis, keys) = replicas_at(url, 2).await;
    let mut tasks = Vec::new();
    // 40 batches of 5 records of one session and 40 of another, with begin-steps, through both replicas.
    for b in 0..40u64 {
        for (k, sid) in ["chain", "other"].into_iter().enumerate() {
            let a = apis[(b as usize + k) % 2].clone();
            tasks.push(tokio::spawn(async move {
                let batch = json!({"records": (1..=5).map(|i| record(sid, b * 5 + i, "allow")).collect::<Vec<_>>()});
                let (s, v) = a.call("POST", "/v1/records", Some(PROXY), Some(batch)).await;
                // (the first batch of "chain" may come after one of its retries below)
                assert_eq!((s, v["appended"].as_u64().unwrap() + v["duplicates"].as_u64().unwrap()), (StatusCode::OK, 5), "{v}");
            }));
        }
        let a = apis[b as usize % 2].clone();
        tasks.push(tokio::spawn(async move {
            a.begin("chain", "agent-7", "sha256:aaaa").await;
        }));
    }
    // Retries of a batch through the other replica at the same time are duplicates.
    for _ in 0..4 {
        let a = apis[1].clone();
        tasks.push(tokio::spawn(async move {
            let batch = json!({"records": (1..=5).map(|i| record("chain", i, "allow")).collect::<Vec<_>>()});
            let (s, v) = a.call("POST", "/v1/records", Some(PROXY), Some(batch)).await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let view = apis[0].view("chain").await;
    assert_eq!(view.timeline.len(), 200);
    let mut steps: Vec<u64> = view.timeline.iter().map(|e| e.record.step).collect();
    steps.sort_unstable();
    assert_eq!(steps, (1..=200).collect::<Vec<_>>());
    assert_eq!(assert_logged(&apis[1], &keys, &["chain", "other"]).await, 400);
    // The subject's profile learned every appended record once, whichever replica appended it
    // and however its learners' compare-and-swaps raced (duplicates teach nothing).
    let (s, p) = apis[1].call("GET", "/v1/profiles/agent-7", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert!((p["steps"].as_f64().unwrap() - 400.0).abs() < 0.01, "{p}");
    // Consistency between two checkpoints signed by different replicas.
    let (_, first) = apis[0].call("GET", "/v1/log/checkpoint", Some(ADMIN), None).await;
    let first = keys.verify_checkpoint(first.as_str().unwrap()).unwrap();
    let (s, v) = apis[1].call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [record("late", 1, "allow")]}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, second) = apis[1].call("POST", "/v1/log/checkpoint", Some(ADMIN), None).await;
    let second = keys.verify_checkpoint(second.as_str().unwrap()).unwrap();
    assert_eq!((first.size, second.size), (400, 401));
    let (_, p) = apis[0].call("GET", "/v1/log/proof/consistency?from=400&to=401", Some(ADMIN), None).await;
    let proof: Vec<String> = serde_json::from_value(p["proof"].clone()).unwrap();
    warden_log::check_consistency(&warden_log::decode(&proof).unwrap(), 400, first.root, 401, second.root).unwrap();
}

#[tokio::test]
async fn redis_a_record_whose_leaf_was_not_written_is_logged_when_its_batch_is_retried() {
    let server = Arc::new(RedisServer::start());
    let (apis, keys) = replicas(&server, 1).await;
    let api = &apis[0];
    let batch = json!({"records": (1..=3).map(|i| record("torn", i, "allow")).collect::<Vec<_>>()});
    assert_eq!(api.call("POST", "/v1/records", Some(PROXY), Some(batch.clone())).await.0, StatusCode::OK);
    // The log's keys made unwritable: the next batch reaches its session but not the log, as
    // when a replica dies between the two writes. The proxy is not answered 200.
    assert_eq!(server.cmd(&["RENAME", "warden:{log}:m", "warden:{log}:m-aside"]).unwrap(), "OK");
    assert_eq!(server.cmd(&["SET", "warden:{log}:m", "not a hash"]).unwrap(), "OK");
    let batch2 = json!({"records": (4..=6).map(|i| record("torn", i, "allow")).collect::<Vec<_>>()});
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(batch2.clone())).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("internal")));
    assert_eq!(api.view("torn").await.timeline.len(), 6, "the session's write went through");
    assert_eq!(server.cmd(&["RENAME", "warden:{log}:m-aside", "warden:{log}:m"]).unwrap(), "OK");
    // The proxy retries: the records are duplicates, and their leaves are entered now, once.
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(batch2)).await;
    assert_eq!((s, v["appended"].as_u64(), v["duplicates"].as_u64()), (StatusCode::OK, Some(0), Some(3)), "{v}");
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(batch)).await;
    assert_eq!((s, v["duplicates"].as_u64()), (StatusCode::OK, Some(3)), "{v}");
    assert_eq!(assert_logged(api, &keys, &["torn"]).await, 6);
}

#[tokio::test]
async fn redis_gone_is_a_store_error_and_not_ready_and_an_aof_restart_keeps_every_answered_step() {
    let server = RedisServer::start_durable();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut server = server;
    let api = Api::with(store);
    assert_eq!(api.call("GET", "/readyz", None, None).await.0, StatusCode::OK);
    for _ in 0..5 {
        api.begin("d1", "agent-7", "sha256:a").await;
    }
    let (s, _) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [record("d1", 1, "allow"), record("d1", 2, "allow")]}))).await;
    assert_eq!(s, StatusCode::OK);
    // Killed (no shutdown save): what was answered is in the AOF, fsynced before the answer.
    server.kill();
    let (s, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": "d1", "subject": "agent-7"}))).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("internal")), "{v}");
    let (s, body) = api.call("GET", "/readyz", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(api.call("GET", "/healthz", None, None).await.0, StatusCode::OK, "alive, only not ready");
    server.restart();
    // The connection comes back by itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while api.call("GET", "/readyz", None, None).await.0 != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "not ready again after Redis came back");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(api.begin("d1", "agent-7", "sha256:a").await["step"], 6);
    let view = api.view("d1").await;
    assert_eq!(view.timeline.len(), 2);
    trail::verify(&view.timeline).unwrap();
    let (_, m) = api.call("GET", "/metrics", None, None).await;
    let m = m.as_str().unwrap();
    assert!(m.contains("warden_state_store_errors_total 1"), "{m}");
    assert!(m.contains("warden_state_redis_op_errors_total{op=\"begin_step\"} 1"), "{m}");
    assert!(m.contains("warden_state_redis_op_errors_total{op=\"ready\"} 1"), "{m}");
}

#[tokio::test]
async fn redis_a_session_state_that_does_not_parse_is_a_store_error_not_a_panic() {
    let api = Api::new(Backend::Redis).await;
    api.begin("m1", "agent-7", "sha256:a").await;
    let server = api.redis.clone().unwrap();
    assert_eq!(server.cmd(&["HSET", "warden:{s:m1}:s", "state", "not json"]).unwrap(), "0");
    // A change the replica did not make moves the version (its compare-and-swap then reads it).
    assert_eq!(server.cmd(&["HINCRBY", "warden:{s:m1}:s", "ver", "1"]).unwrap(), "2");
    let (s, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": "m1", "subject": "agent-7"}))).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("internal")));
    let (s, _) = api.call("GET", "/v1/sessions/m1", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn redis_a_session_s_head_names_a_removed_tail() {
    let api = Api::new(Backend::Redis).await;
    let batch = json!({"records": (1..=4).map(|i| record("t1", i, "allow")).collect::<Vec<_>>()});
    assert_eq!(api.call("POST", "/v1/records", Some(PROXY), Some(batch)).await.0, StatusCode::OK);
    let view = api.view("t1").await;
    let head = view.head.clone().unwrap();
    assert_eq!((head.records, head.hash.as_str()), (4, view.timeline[3].hash.as_str()));
    assert_eq!(trail::verify_head(&view.timeline, &head, "the session's head"), Ok(()));
    // Someone with access to Redis cuts the last two records: the chain verifies, the head does not.
    assert_eq!(api.redis.as_ref().unwrap().cmd(&["LTRIM", "warden:{s:t1}:r", "0", "1"]).unwrap(), "OK");
    let cut = api.view("t1").await;
    assert_eq!(trail::verify(&cut.timeline), Ok(()));
    let why = trail::verify_head(&cut.timeline, cut.head.as_ref().unwrap(), "the session's head").unwrap_err();
    assert!(why.starts_with("the last 2 record(s) are missing"), "{why}");
}

/// The largest batch the service takes (1000 records) in one write: within what one Redis
/// script takes in (Lua unpacks at most 8000 values).
async fn the_largest_batch_is_taken_whole(b: Backend) {
    let api = Api::new(b).await;
    let batch = json!({"records": (1..=1000).map(|i| record("big1", i, "allow")).collect::<Vec<_>>()});
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(batch.clone())).await;
    assert_eq!((s, v["appended"].as_u64()), (StatusCode::OK, Some(1000)), "{v}");
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(batch)).await;
    assert_eq!((s, v["duplicates"].as_u64()), (StatusCode::OK, Some(1000)), "{v}");
    let view = api.view("big1").await;
    assert_eq!(view.timeline.len(), 1000);
    trail::verify(&view.timeline).unwrap();
}

#[tokio::test]
async fn a_revocation_body_that_does_not_parse_is_refused_before_the_token_as_text() {
    use warden_core::wire::limits;
    let api = Api::new(Backend::Sqlite).await;
    let big = format!(r#"{{"reason":"{}"}}"#, "x".repeat(limits::MAX_BODY_BYTES));
    for token in [Some(ADMIN), None] {
        for (content_type, body, status) in [
            ("text/plain", "incident 42".to_string(), StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ("application/json", r#"{"reason": 42}"#.to_string(), StatusCode::UNPROCESSABLE_ENTITY),
            ("application/json", big.clone(), StatusCode::PAYLOAD_TOO_LARGE),
        ] {
            let (s, v) = api.send("POST", "/v1/sessions/t1/revoke", token, Some((content_type, body))).await;
            assert_eq!(s, status, "{content_type} with {token:?}: {v}");
            assert!(v.is_string(), "axum's own rejection, not an API error body: {v}");
        }
    }
    let (s, v) = api.call("POST", "/v1/sessions/t1/revoke", Some(ADMIN), Some(json!({"reason": "r".repeat(1025)}))).await;
    assert_eq!((s, v["message"].as_str()), (StatusCode::BAD_REQUEST, Some("reason is longer than 1024 bytes")));
    let (s, v) = api.call("GET", "/v1/sessions?limit=many", Some(ADMIN), None).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
    assert_eq!(api.call("GET", "/v1/sessions/t1", Some(ADMIN), None).await.0, StatusCode::NOT_FOUND, "nothing was revoked");
}

/// openapi.yaml cannot drift the other way either: every operation (but the log's, exercised by
/// tests/log.rs) got a documented 2xx from the tests above, each exchange checked as it was made.
#[test]
fn every_operation_of_the_spec_is_exercised() {
    contract::assert_exercised("every_operation_of_the_spec_is_exercised", |path| !path.starts_with("/v1/log/"), &[]);
}

on_each_store!(a_dpop_proof_is_taken_once_across_sessions_and_proxies_and_expired_uses_are_pruned);
async fn a_dpop_proof_is_taken_once_across_sessions_and_proxies_and_expired_uses_are_pruned(b: Backend) {
    let api = Api::new(b).await;
    let begin = |sid: &'static str, id: &'static str, expires_at_ms: u64| {
        let api = &api;
        async move {
            let body = json!({"session_id": sid, "subject": "agent-7", "credential": "sha256:a", "proof": {"id": id, "expires_at_ms": expires_at_ms}});
            let (s, v) = api.call("POST", "/v1/steps/begin", Some(PROXY), Some(body)).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            (v["outcome"].as_str().unwrap_or_default().to_string(), v["step"].as_u64())
        }
    };
    let later = recently() + 180_000;
    let p1 = "1111111111111111111111111111111111111111111111111111111111111111";
    assert_eq!(begin("dp1", p1, later).await, ("ok".to_string(), Some(1)));
    // The same proof again, in the same session or another (another proxy): refused, uncounted.
    assert_eq!(begin("dp1", p1, later).await, ("proof_replayed".to_string(), Some(0)));
    assert_eq!(begin("dp2", p1, later).await, ("proof_replayed".to_string(), Some(0)));
    let view = api.view("dp1").await;
    assert_eq!(view.state.steps, 1);
    assert!(view.audit.iter().any(|e| e.kind == "dpop_replayed"), "{:?}", view.audit);
    let (s, _) = api.call("GET", "/v1/sessions/dp2", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a replay opens no session");
    // Another proof is fine; a use past its expiry is pruned (no proxy accepts that proof).
    assert_eq!(begin("dp1", "22", later).await, ("ok".to_string(), Some(2)));
    assert_eq!(begin("dp3", "33", 1).await.0, "ok");
    assert_eq!(begin("dp3", "33", 1).await.0, "ok");
    // The step's record says the binding held; the trail shows it.
    let rec = StepRecord {
        begun: Begun::Service,
        binding: Some(warden_core::wire::BindingRecord { kind: "dpop".into(), held: true }),
        at_ms: recently() + 60_000,
        ..record("dp1", 1, "allow")
    };
    let (s, v) = api.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [rec]}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let view = api.view("dp1").await;
    assert_eq!(view.timeline[0].record.binding.as_ref().map(|b| (b.kind.as_str(), b.held)), Some(("dpop", true)));
}

