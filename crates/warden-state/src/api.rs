//! The HTTP API. `app(state)` builds the router, apart from `main`, so tests drive it in-process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use warden_core::hash::sha256;
use warden_core::wire::{AppendResult, BeginOutcome, BeginResponse, BeginStep, ErrorBody, RecordBatch, RevokeRequest, SessionList};

use crate::store::{Search, Store, StoreError};
use crate::validate::{self, Invalid};

/// Who may call what: proxies report steps; admins read trails and revoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Proxy,
    Admin,
}

#[derive(Default)]
pub struct Counters {
    pub steps_begun: AtomicU64,
    pub steps_refused: AtomicU64,
    pub records_appended: AtomicU64,
    pub records_duplicate: AtomicU64,
    pub revocations: AtomicU64,
    pub rejected_requests: AtomicU64,
    pub store_errors: AtomicU64,
}

pub struct AppState {
    pub store: Arc<dyn Store>,
    proxy_token: [u8; 32],
    admin_token: [u8; 32],
    pub counters: Counters,
}

impl AppState {
    /// Tokens are kept only as hashes.
    pub fn new(store: Arc<dyn Store>, proxy_token: &str, admin_token: &str) -> Self {
        Self { store, proxy_token: sha256(proxy_token.as_bytes()), admin_token: sha256(admin_token.as_bytes()), counters: Counters::default() }
    }

    fn role_of(&self, headers: &HeaderMap) -> Option<Role> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let h = sha256(token.trim().as_bytes());
        if ct_eq(&h, &self.admin_token) {
            Some(Role::Admin)
        } else if ct_eq(&h, &self.proxy_token) {
            Some(Role::Proxy)
        } else {
            None
        }
    }

    fn require(&self, headers: &HeaderMap, allowed: &[Role]) -> Result<(), ApiError> {
        match self.role_of(headers) {
            None => Err(ApiError::Unauthenticated),
            Some(r) if allowed.contains(&r) => Ok(()),
            Some(_) => Err(ApiError::Forbidden),
        }
    }
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Every failure the API answers with. Internals stay in the log.
#[derive(Debug)]
pub enum ApiError {
    Unauthenticated,
    Forbidden,
    BadRequest(String),
    NotFound(String),
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            Self::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated", "send Authorization: Bearer <token> with the proxy or admin token".to_string()),
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "this token may not call this endpoint".to_string()),
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "the store failed; see the service log".to_string()),
        };
        (status, Json(ErrorBody { error: code.into(), message })).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Backend(m) => {
                log::error!("store failure: {m}");
                Self::Internal
            }
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(Invalid(m): Invalid) -> Self {
        Self::BadRequest(m)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self::BadRequest(format!("body: {}", e.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::BadRequest(format!("query: {}", e.body_text()))
    }
}

type Shared = State<Arc<AppState>>;

/// Count rejected requests and store failures on the way out.
fn counted<T>(st: &AppState, r: Result<T, ApiError>) -> Result<T, ApiError> {
    match &r {
        Err(ApiError::Internal) => {
            st.counters.store_errors.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            st.counters.rejected_requests.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {}
    }
    r
}

async fn begin_step(State(st): Shared, headers: HeaderMap, body: Result<Json<BeginStep>, JsonRejection>) -> Result<Json<BeginResponse>, ApiError> {
    let r = async {
        st.require(&headers, &[Role::Proxy])?;
        let Json(req) = body?;
        validate::begin(&req)?;
        let resp = st.store.begin_step(req, now_ms()).await?;
        let c = if resp.outcome == BeginOutcome::Ok { &st.counters.steps_begun } else { &st.counters.steps_refused };
        c.fetch_add(1, Ordering::Relaxed);
        Ok(Json(resp))
    }
    .await;
    counted(&st, r)
}

async fn append_records(State(st): Shared, headers: HeaderMap, body: Result<Json<RecordBatch>, JsonRejection>) -> Result<Json<AppendResult>, ApiError> {
    let r = async {
        st.require(&headers, &[Role::Proxy])?;
        let Json(batch) = body?;
        validate::batch(&batch.records)?;
        let res = st.store.append(batch.records, now_ms()).await?;
        st.counters.records_appended.fetch_add(res.appended, Ordering::Relaxed);
        st.counters.records_duplicate.fetch_add(res.duplicates, Ordering::Relaxed);
        Ok(Json(res))
    }
    .await;
    counted(&st, r)
}

#[derive(Deserialize)]
struct FeedQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_feed_limit")]
    limit: usize,
}

fn default_feed_limit() -> usize {
    500
}

async fn revocations(State(st): Shared, headers: HeaderMap, q: Result<Query<FeedQuery>, QueryRejection>) -> Result<impl IntoResponse, ApiError> {
    let r = async {
        st.require(&headers, &[Role::Proxy, Role::Admin])?;
        let Query(q) = q?;
        Ok(Json(st.store.revocations(q.after, q.limit.clamp(1, 5000)).await?))
    }
    .await;
    counted(&st, r)
}

#[derive(Deserialize)]
struct SearchQuery {
    subject: Option<String>,
    credential: Option<String>,
    workload: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    limit: Option<usize>,
}

async fn search(State(st): Shared, headers: HeaderMap, q: Result<Query<SearchQuery>, QueryRejection>) -> Result<Json<SessionList>, ApiError> {
    let r = async {
        st.require(&headers, &[Role::Admin])?;
        let Query(q) = q?;
        let s = Search {
            subject: q.subject,
            credential: q.credential,
            workload: q.workload,
            since_ms: q.since_ms,
            until_ms: q.until_ms,
            limit: q.limit.unwrap_or(100).clamp(1, 10_000),
        };
        Ok(Json(SessionList { sessions: st.store.search(s).await? }))
    }
    .await;
    counted(&st, r)
}

async fn session(State(st): Shared, headers: HeaderMap, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let r = async {
        st.require(&headers, &[Role::Admin])?;
        match st.store.session(id.clone()).await? {
            Some(v) => Ok(Json(v)),
            None => Err(ApiError::NotFound(format!("no session {id}"))),
        }
    }
    .await;
    counted(&st, r)
}

async fn revoke(State(st): Shared, headers: HeaderMap, Path(id): Path<String>, body: Option<Json<RevokeRequest>>) -> Result<impl IntoResponse, ApiError> {
    let r = async {
        st.require(&headers, &[Role::Admin])?;
        let reason = body.and_then(|Json(b)| b.reason).unwrap_or_else(|| "revoked by an administrator".into());
        if reason.len() > 1024 {
            return Err(ApiError::BadRequest("reason is longer than 1024 bytes".into()));
        }
        validate::session_id(&id)?;
        let changed = st.store.revoke(id.clone(), reason, now_ms()).await?;
        if changed {
            st.counters.revocations.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Json(serde_json::json!({"session_id": id, "revoked": true, "changed": changed})))
    }
    .await;
    counted(&st, r)
}

async fn metrics(State(st): Shared) -> impl IntoResponse {
    let c = &st.counters;
    let lines = [
        ("warden_state_steps_begun_total", "Steps counted", &c.steps_begun),
        ("warden_state_steps_refused_total", "Steps refused (subject mismatch or revoked session)", &c.steps_refused),
        ("warden_state_records_appended_total", "Attribution records appended", &c.records_appended),
        ("warden_state_records_duplicate_total", "Attribution records already stored (retries)", &c.records_duplicate),
        ("warden_state_revocations_total", "Sessions revoked", &c.revocations),
        ("warden_state_rejected_requests_total", "Requests refused with a 4xx", &c.rejected_requests),
        ("warden_state_store_errors_total", "Requests that failed in the store", &c.store_errors),
    ];
    let mut out = String::new();
    let lines = lines.into_iter().map(|(name, help, v)| (name, help, v.load(Ordering::Relaxed))).chain(st.store.counters());
    for (name, help, v) in lines {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

async fn health() -> &'static str {
    "ok\n"
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; see crates/warden-state/openapi.yaml".into())
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/steps/begin", post(begin_step))
        .route("/v1/records", post(append_records))
        .route("/v1/revocations", get(revocations))
        .route("/v1/sessions", get(search))
        .route("/v1/sessions/{id}", get(session))
        .route("/v1/sessions/{id}/revoke", post(revoke))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(8 * 1024 * 1024))
        .with_state(state)
}
