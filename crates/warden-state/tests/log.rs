//! The append-only log through the API, on a real SQLite file: checkpoints and proofs verify
//! with only the public key; a store whose log was rolled back or rewritten gets no new
//! checkpoint; a session rewritten in the file is named by its evidence.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod contract;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use warden_core::trail;
use warden_core::wire::{SessionView, StepRecord};
use warden_log::{ConsistencyProof, InclusionProof, KeyRing, LogSigner, SessionEvidence};
use warden_state::sqlite::SqliteStore;
use warden_state::{app, AppState};

const PROXY: &str = "proxy-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";
const LOG: &str = "log-token-0123456789ab";

struct Api {
    state: Arc<AppState>,
    keys: KeyRing,
}

impl Api {
    fn open(db: &std::path::Path, skey: &str, vkey: &str) -> Self {
        let signer = Arc::new(LogSigner::from_keys(&[skey.to_string()]).unwrap());
        let store = SqliteStore::open(db).unwrap();
        Self {
            state: Arc::new(AppState::new(Arc::new(store), PROXY, ADMIN).with_log(Some(signer), Some(LOG))),
            keys: KeyRing::new(&[vkey.to_string()]).unwrap(),
        }
    }

    /// Every exchange is checked against openapi.yaml.
    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, String) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = body.map(|b| b.to_string());
        let req = match &body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.clone())).unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        let resp = app(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let caller = match token {
            None => contract::Caller::Anonymous,
            Some(PROXY) => contract::Caller::Role("proxy"),
            Some(ADMIN) => contract::Caller::Role("admin"),
            Some(LOG) => contract::Caller::Role("log"),
            Some(_) => contract::Caller::Unknown,
        };
        contract::check(&contract::Exchange {
            method,
            uri: path,
            caller,
            request: body.as_deref().map(|b| ("application/json", b.as_bytes())),
            status: status.as_u16(),
            content_type: content_type.as_deref(),
            body: &bytes,
        });
        (status, String::from_utf8_lossy(&bytes).into())
    }

    async fn ok<T: serde::de::DeserializeOwned>(&self, method: &str, path: &str, token: &str) -> T {
        let (s, text) = self.call(method, path, Some(token), None).await;
        assert_eq!(s, StatusCode::OK, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn checkpoint(&self, method: &str) -> (StatusCode, String) {
        self.call(method, "/v1/log/checkpoint", Some(if method == "GET" { LOG } else { ADMIN }), None).await
    }

    /// `n` begun and recorded steps of a session.
    async fn steps(&self, sid: &str, from: u64, n: u64) {
        for step in from..from + n {
            let (s, t) = self.call("POST", "/v1/steps/begin", Some(PROXY), Some(json!({"session_id": sid, "subject": "agent-7"}))).await;
            assert_eq!(s, StatusCode::OK, "{t}");
            let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
            let r = StepRecord { session_id: sid.into(), step, decision_id: format!("d{step}"), at_ms, subject: "agent-7".into(), action: "allow".into(), risk: 0.5, ..Default::default() };
            let (s, t) = self.call("POST", "/v1/records", Some(PROXY), Some(json!({"records": [r]}))).await;
            assert_eq!(s, StatusCode::OK, "{t}");
        }
    }
}

fn keys() -> (String, String) {
    warden_log::generate_log_key("warden.test/log").unwrap()
}

#[tokio::test]
async fn checkpoints_and_proofs_verify_with_only_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let (skey, vkey) = keys();
    let api = Api::open(&dir.path().join("s.db"), &skey, &vkey);
    api.steps("a", 1, 3).await;
    api.steps("b", 1, 2).await;
    let (s, first) = api.checkpoint("GET").await;
    assert_eq!(s, StatusCode::OK, "{first}");
    let first = api.keys.verify_checkpoint(&first).unwrap();
    assert_eq!(first.size, 5);
    api.steps("a", 4, 2).await;
    // The period has not come: GET answers the last; POST signs one now.
    assert_eq!(api.keys.verify_checkpoint(&api.checkpoint("GET").await.1).unwrap().size, 5);
    let second = api.keys.verify_checkpoint(&api.checkpoint("POST").await.1).unwrap();
    assert_eq!(second.size, 7);

    let p: ConsistencyProof = api.ok("GET", "/v1/log/proof/consistency?from=5&to=7", LOG).await;
    warden_log::check_consistency(&warden_log::decode(&p.proof).unwrap(), 5, first.root, 7, second.root).unwrap();

    let view: SessionView = api.ok("GET", "/v1/sessions/a", ADMIN).await;
    assert!(view.timeline.iter().all(|e| e.hash_version == trail::HASH_V2));
    trail::verify(&view.timeline).unwrap();
    let p: InclusionProof = api.ok("GET", "/v1/log/proof/inclusion?session_id=a&seq=4&tree_size=7", ADMIN).await;
    assert_eq!((p.leaf_index, p.hash.as_str()), (5, view.timeline[3].hash.as_str()));
    let leaf = warden_log::leaf_hash("a", 4, &view.timeline[3].hash);
    warden_log::check_inclusion(&warden_log::decode(&p.proof).unwrap(), 5, 7, leaf, second.root).unwrap();

    let ev: SessionEvidence = api.ok("GET", "/v1/log/proof/session/a", ADMIN).await;
    let cp = api.keys.verify_checkpoint(&ev.checkpoint).unwrap();
    let head = api.keys.verify_head(&ev.head).unwrap();
    assert_eq!((head.records, head.tree_size, head.hash.as_str()), (5, cp.size, view.timeline[4].hash.as_str()));
    for (e, l) in view.timeline.iter().zip(&ev.leaves) {
        let leaf = warden_log::leaf_hash("a", e.seq, &e.hash);
        warden_log::check_inclusion(&warden_log::decode(&l.proof).unwrap(), l.leaf_index, cp.size, leaf, cp.root).unwrap();
    }
    assert_eq!(api.call("GET", "/v1/log/proof/session/nobody", Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.call("GET", "/v1/log/proof/inclusion?session_id=a&seq=9&tree_size=7", Some(ADMIN), None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.call("GET", "/v1/log/proof/inclusion?session_id=has%20space&seq=1&tree_size=7", Some(ADMIN), None).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(api.call("GET", "/v1/log/proof/session/%FF", Some(ADMIN), None).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(api.call("GET", "/v1/log/proof/consistency?from=7&to=5", Some(LOG), None).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(api.call("GET", "/v1/log/proof/consistency?from=5&to=99", Some(LOG), None).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_log_endpoints_answer_only_their_roles_and_need_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let (skey, vkey) = keys();
    let api = Api::open(&dir.path().join("s.db"), &skey, &vkey);
    api.steps("a", 1, 1).await;
    let (ok, unauth, forbidden) = (StatusCode::OK, StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN);
    // (method, path, without a token, proxy, admin, log token)
    for (m, p, none, proxy, admin, log) in [
        ("GET", "/v1/log/checkpoint", unauth, forbidden, ok, ok),
        ("POST", "/v1/log/checkpoint", unauth, forbidden, ok, forbidden),
        ("GET", "/v1/log/proof/consistency?from=0&to=1", unauth, forbidden, ok, ok),
        ("GET", "/v1/log/proof/inclusion?session_id=a&seq=1&tree_size=1", unauth, forbidden, ok, forbidden),
        ("GET", "/v1/log/proof/session/a", unauth, forbidden, ok, forbidden),
        ("GET", "/v1/sessions/a", unauth, forbidden, ok, forbidden),
        ("GET", "/v1/revocations", unauth, ok, ok, forbidden),
        ("POST", "/v1/steps/begin", unauth, StatusCode::UNPROCESSABLE_ENTITY, forbidden, forbidden),
    ] {
        for (token, want) in [(None, none), (Some(PROXY), proxy), (Some(ADMIN), admin), (Some(LOG), log)] {
            let got = api.call(m, p, token, None).await.0;
            let got = if want == StatusCode::UNPROCESSABLE_ENTITY && got.is_client_error() && got != forbidden && got != unauth { want } else { got };
            assert_eq!(got, want, "{m} {p} with {token:?}");
        }
    }
    // Without a log key the log is kept, but nothing is signed.
    let unsigned = AppState::new(Arc::new(SqliteStore::in_memory().unwrap()), PROXY, ADMIN);
    let api = Api { state: Arc::new(unsigned), keys: KeyRing::new(&[vkey]).unwrap() };
    assert_eq!(api.call("GET", "/v1/log/checkpoint", Some(ADMIN), None).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[derive(Default)]
struct Mem(std::cell::RefCell<std::collections::HashMap<u64, warden_log::Hash>>);

impl warden_log::HashReader for Mem {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<warden_log::Hash>, warden_log::TreeError> {
        Ok(indexes.iter().map(|i| self.0.borrow()[i]).collect())
    }
}

/// Apply `edit` to the log's leaves, then recompute every stored tree hash from them.
fn rebuild_tree(db: &std::path::Path, edit: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(edit).unwrap();
    let leaves: Vec<(String, i64, String)> =
        conn.prepare("SELECT session_id, seq, hash FROM log_leaves ORDER BY idx").unwrap().query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().collect::<Result<_, _>>().unwrap();
    let mem = Mem::default();
    for (n, (sid, seq, hash)) in leaves.iter().enumerate() {
        let new = warden_log::hashes_to_store(n as u64, warden_log::leaf_hash(sid, *seq as u64, hash), &mem).unwrap();
        mem.0.borrow_mut().extend(new);
    }
    conn.execute("DELETE FROM log_hashes", []).unwrap();
    for (idx, h) in mem.0.borrow().iter() {
        conn.execute("INSERT INTO log_hashes (idx, hash) VALUES (?1, ?2)", rusqlite::params![*idx as i64, h.0.as_slice()]).unwrap();
    }
}

fn sql(db: &std::path::Path, statements: &str) {
    rusqlite::Connection::open(db).unwrap().execute_batch(statements).unwrap();
}

#[tokio::test]
async fn a_rolled_back_or_rewritten_log_gets_no_new_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let (skey, vkey) = keys();
    {
        let api = Api::open(&db, &skey, &vkey);
        api.steps("a", 1, 4).await;
        assert_eq!(api.checkpoint("POST").await.0, StatusCode::OK);
    }
    // Rolled back: the last two leaves (and their tree hashes) removed from the file.
    let copy = dir.path().join("copy.db");
    std::fs::copy(&db, &copy).unwrap();
    for ext in ["db-wal", "db-shm"] {
        if db.with_extension(ext).exists() {
            std::fs::copy(db.with_extension(ext), copy.with_extension(ext)).unwrap();
        }
    }
    sql(&copy, "SELECT 1");
    sql(&copy, "DELETE FROM log_leaves WHERE idx >= 2; DELETE FROM log_hashes WHERE idx >= 3;");
    let api = Api::open(&copy, &skey, &vkey);
    assert_eq!(api.checkpoint("POST").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    drop(api);
    // Rewritten: a leaf replaced and the whole tree rebuilt over it, as whoever holds the file would.
    rebuild_tree(&db, "UPDATE log_leaves SET hash = 'forged' WHERE idx = 1");
    let api = Api::open(&db, &skey, &vkey);
    api.steps("a", 5, 1).await;
    assert_eq!(api.checkpoint("POST").await.0, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn a_session_rewritten_in_the_file_with_recomputed_hashes_is_named_by_its_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let (skey, vkey) = keys();
    {
        let api = Api::open(&db, &skey, &vkey);
        api.steps("a", 1, 3).await;
    }
    // Whoever holds the file rewrites record 2 and re-chains the session.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let rows: Vec<(i64, String)> = conn.prepare("SELECT seq, body FROM records WHERE session_id = 'a' ORDER BY seq").unwrap().query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap();
        let mut prev = trail::GENESIS.to_string();
        for (seq, body) in rows {
            let body = if seq == 2 { body.replace("\"allow\"", "\"deny\"") } else { body };
            let hash = trail::chain_hash(&prev, &body);
            conn.execute("UPDATE records SET body = ?1, prev_hash = ?2, hash = ?3 WHERE session_id = 'a' AND seq = ?4", rusqlite::params![body, prev, hash, seq]).unwrap();
            prev = hash;
        }
        conn.execute("UPDATE sessions SET head_hash = ?1 WHERE id = 'a'", [prev]).unwrap();
    }
    let api = Api::open(&db, &skey, &vkey);
    let view: SessionView = api.ok("GET", "/v1/sessions/a", ADMIN).await;
    assert_eq!(view.timeline[1].record.action, "deny");
    trail::verify(&view.timeline).unwrap(); // the chain alone is fooled
    let ev: SessionEvidence = api.ok("GET", "/v1/log/proof/session/a", ADMIN).await;
    let head = api.keys.verify_head(&ev.head).unwrap();
    assert_ne!(head.hash, view.timeline[2].hash, "the log still holds the original");
    assert_eq!(ev.leaves[0].hash, view.timeline[0].hash);
    assert_ne!(ev.leaves[1].hash, view.timeline[1].hash);
}

/// openapi.yaml cannot drift the other way either: every operation of the log got a documented
/// 2xx from the tests above, each exchange checked as it was made.
#[test]
fn every_log_operation_of_the_spec_is_exercised() {
    contract::assert_exercised("every_log_operation_of_the_spec_is_exercised", |path| path.starts_with("/v1/log/"), &[]);
}
