//! `warden-state migrate`: a SQLite store copied into Redis serves the same sessions, trails,
//! audit, revocation feed and search, and its log goes on from the same leaves: a checkpoint
//! signed on SQLite is consistent with one signed on Redis after more appends.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::RedisServer;
use tower::ServiceExt;
use warden_core::trail;
use warden_core::wire::StepRecord;
use warden_log::{KeyRing, LogSigner};
use warden_state::redis::RedisStore;
use warden_state::sqlite::SqliteStore;
use warden_state::store::Store;
use warden_state::{app, AppState};

const PROXY: &str = "proxy-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

struct Api(Arc<AppState>);

impl Api {
    fn new(store: impl Store, signer: &Arc<LogSigner>) -> Self {
        Self(Arc::new(AppState::new(Arc::new(store), PROXY, ADMIN).with_log(Some(signer.clone()), None)))
    }

    async fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
        let req = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {token}"));
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())).unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        let resp = app(self.0.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())))
    }

    async fn ok(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, token, body).await;
        assert_eq!(s, StatusCode::OK, "{method} {path}: {v}");
        v
    }

    async fn steps(&self, sid: &str, subject: &str, from: u64, n: u64, action: &str) {
        for step in from..from + n {
            self.ok("POST", "/v1/steps/begin", PROXY, Some(json!({"session_id": sid, "subject": subject, "credential": "sha256:shared", "workload": "spiffe://e.org/w"}))).await;
            let r = StepRecord {
                session_id: sid.into(),
                step,
                decision_id: format!("d{step}"),
                at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64,
                subject: subject.into(),
                credential: Some("sha256:shared".into()),
                workload: Some("spiffe://e.org/w".into()),
                action: action.into(),
                enforced: true,
                reasons: vec!["why".into()],
                risk: 0.25,
                ..Default::default()
            };
            self.ok("POST", "/v1/records", PROXY, Some(json!({"records": [r]}))).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_store_migrated_into_redis_serves_the_same_and_its_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let (skey, vkey) = warden_log::generate_log_key("warden.test/log").unwrap();
    let signer = Arc::new(LogSigner::from_keys(&[skey]).unwrap());
    let keys = KeyRing::new(&[vkey]).unwrap();
    let sessions = ["alpha", "beta", "gamma", "ended"];
    let old_checkpoint;
    let mut before = Vec::new();
    {
        let sqlite = Api::new(SqliteStore::open(&db).unwrap(), &signer);
        sqlite.steps("alpha", "alice", 1, 4, "allow").await;
        sqlite.steps("beta", "bob", 1, 2, "allow").await;
        sqlite.steps("gamma", "alice", 1, 1, "allow").await;
        sqlite.steps("ended", "carol", 1, 1, "terminate").await;
        sqlite.ok("POST", "/v1/steps/begin", PROXY, Some(json!({"session_id": "alpha", "subject": "mallory"}))).await;
        sqlite.ok("POST", "/v1/sessions/beta/revoke", ADMIN, Some(json!({"reason": "incident 7"}))).await;
        sqlite.ok("POST", "/v1/sessions/never-seen/revoke", ADMIN, None).await;
        old_checkpoint = sqlite.ok("POST", "/v1/log/checkpoint", ADMIN, None).await;
        for sid in sessions.iter().chain(&["never-seen"]) {
            before.push(sqlite.ok("GET", &format!("/v1/sessions/{sid}"), ADMIN, None).await);
        }
        before.push(sqlite.ok("GET", "/v1/revocations?after=0", PROXY, None).await);
        before.push(sqlite.ok("GET", "/v1/sessions?subject=alice", ADMIN, None).await);
        before.push(sqlite.ok("GET", "/v1/sessions?credential=sha256:shared&limit=10", ADMIN, None).await);
    }
    let old = keys.verify_checkpoint(old_checkpoint.as_str().unwrap()).unwrap();
    assert_eq!(old.size, 8);

    let server = RedisServer::start();
    let copied = warden_state::migrate::copy(&format!("sqlite:{}", db.display()), &server.url()).await.unwrap();
    assert_eq!((copied.sessions, copied.records, copied.revocations, copied.leaves, copied.checkpoints), (5, 8, 3, 8, 1));
    // Never into a Redis that holds data already.
    let again = warden_state::migrate::copy(&format!("sqlite:{}", db.display()), &server.url()).await.unwrap_err();
    assert!(again.contains("already holds Session Warden data"), "{again}");

    let redis = Api::new(RedisStore::connect(&server.url()).await.unwrap(), &signer);
    let mut after = Vec::new();
    for sid in sessions.iter().chain(&["never-seen"]) {
        after.push(redis.ok("GET", &format!("/v1/sessions/{sid}"), ADMIN, None).await);
    }
    after.push(redis.ok("GET", "/v1/revocations?after=0", PROXY, None).await);
    after.push(redis.ok("GET", "/v1/sessions?subject=alice", ADMIN, None).await);
    after.push(redis.ok("GET", "/v1/sessions?credential=sha256:shared&limit=10", ADMIN, None).await);
    assert_eq!(after, before, "the same sessions, trails, audit, feed and search");
    let (s, v) = redis.call("GET", "/v1/log/checkpoint", ADMIN, None).await;
    assert_eq!((s, v.as_str()), (StatusCode::OK, old_checkpoint.as_str()), "the latest checkpoint is the one signed on SQLite");

    // The stores go on: a revoked session stays refused, counting continues, the chain extends.
    assert_eq!(redis.ok("POST", "/v1/steps/begin", PROXY, Some(json!({"session_id": "beta", "subject": "bob"}))).await["outcome"], "revoked");
    redis.steps("alpha", "alice", 5, 2, "allow").await;
    let alpha = redis.ok("GET", "/v1/sessions/alpha", ADMIN, None).await;
    let alpha: warden_core::wire::SessionView = serde_json::from_value(alpha).unwrap();
    assert_eq!((alpha.timeline.len(), alpha.state.steps), (6, 6));
    trail::verify(&alpha.timeline).unwrap();
    // The log after extends the log before: consistency from the SQLite checkpoint.
    let new = redis.ok("POST", "/v1/log/checkpoint", ADMIN, None).await;
    let new = keys.verify_checkpoint(new.as_str().unwrap()).unwrap();
    assert_eq!(new.size, 10);
    let p = redis.ok("GET", "/v1/log/proof/consistency?from=8&to=10", ADMIN, None).await;
    let proof: Vec<String> = serde_json::from_value(p["proof"].clone()).unwrap();
    warden_log::check_consistency(&warden_log::decode(&proof).unwrap(), old.size, old.root, new.size, new.root).unwrap();
    // Every record, old and new, is proven in the new tree.
    let ev: warden_log::SessionEvidence = serde_json::from_value(redis.ok("GET", "/v1/log/proof/session/alpha", ADMIN, None).await).unwrap();
    let cp = keys.verify_checkpoint(&ev.checkpoint).unwrap();
    assert_eq!(ev.leaves.len(), 6);
    for (e, l) in alpha.timeline.iter().zip(&ev.leaves) {
        warden_log::check_inclusion(&warden_log::decode(&l.proof).unwrap(), l.leaf_index, cp.size, warden_log::leaf_hash("alpha", e.seq, &e.hash), cp.root).unwrap();
    }
}
