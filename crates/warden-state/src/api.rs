//! The HTTP API. `app(state)` builds the router, apart from `main`, so tests drive it in-process.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use warden_core::hash::sha256;
use warden_core::profile::Profile;
use warden_core::wire::limits;
use warden_core::wire::{
    AppendResult, BeginOutcome, BeginResponse, BeginStep, ErrorBody, RecordBatch, RevocationFeed, RevokeRequest, SessionList, SessionView,
};

use warden_log::{ConsistencyProof, InclusionProof, LogSigner, SessionEvidence, SessionHead};

use crate::store::{Search, Store, StoreError};
use crate::validate::{self, Invalid};

/// Who may call what: proxies report steps; admins read trails and revoke; log readers (a
/// witness) read checkpoints and consistency proofs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Proxy,
    Admin,
    LogReader,
}

#[derive(Default)]
pub struct Counters {
    pub steps_begun: AtomicU64,
    pub steps_refused: AtomicU64,
    pub records_appended: AtomicU64,
    pub records_duplicate: AtomicU64,
    pub records_refused: AtomicU64,
    pub revocations: AtomicU64,
    pub rejected_requests: AtomicU64,
    pub store_errors: AtomicU64,
}

pub struct AppState {
    pub store: Arc<dyn Store>,
    proxy_token: [u8; 32],
    admin_token: [u8; 32],
    pub counters: Counters,
    /// The log's signing keys; without them the log is kept but no checkpoint is signed.
    log: Option<Arc<LogSigner>>,
    log_token: Option<[u8; 32]>,
    /// Shared Signals: the receiver's trust (SETs pushed to `/v1/ssf/events`), the token a
    /// transmitter pushes with, and the transmitter's public keys (`/v1/ssf/jwks`).
    ssf_receiver: Option<Arc<warden_core::ssf::Receiver>>,
    ssf_push_token: Option<[u8; 32]>,
    ssf_jwks: Option<serde_json::Value>,
}

impl AppState {
    /// Tokens are kept only as hashes.
    pub fn new(store: Arc<dyn Store>, proxy_token: &str, admin_token: &str) -> Self {
        Self {
            store,
            proxy_token: sha256(proxy_token.as_bytes()),
            admin_token: sha256(admin_token.as_bytes()),
            counters: Counters::default(),
            log: None,
            log_token: None,
            ssf_receiver: None,
            ssf_push_token: None,
            ssf_jwks: None,
        }
    }

    /// Receive SETs (with `push_token`, a transmitter must also present it) and publish the
    /// transmitter's keys.
    pub fn with_ssf(mut self, receiver: Option<Arc<warden_core::ssf::Receiver>>, push_token: Option<&str>, jwks: Option<serde_json::Value>) -> Self {
        self.ssf_receiver = receiver;
        self.ssf_push_token = push_token.map(|t| sha256(t.as_bytes()));
        self.ssf_jwks = jwks;
        self
    }

    /// Sign checkpoints and session heads with `signer`; let `log_token` (a witness's) read
    /// checkpoints and consistency proofs.
    pub fn with_log(mut self, signer: Option<Arc<LogSigner>>, log_token: Option<&str>) -> Self {
        self.log = signer;
        self.log_token = log_token.map(|t| sha256(t.as_bytes()));
        self
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
        } else if self.log_token.as_ref().is_some_and(|t| ct_eq(&h, t)) {
            Some(Role::LogReader)
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
    /// The body is larger than the service takes (`wire::limits::MAX_BODY_BYTES`).
    TooLarge,
    NotFound(String),
    /// The service is not configured for this (no log key).
    Unavailable(String),
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let failure = if matches!(self, Self::Internal) { Failure::Store } else { Failure::Rejected };
        let (status, code, message) = match self {
            Self::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated", "send Authorization: Bearer <token> with the proxy or admin token".to_string()),
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "this token may not call this endpoint".to_string()),
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            Self::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is larger than {} bytes; send fewer records per batch", limits::MAX_BODY_BYTES),
            ),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m),
            Self::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "the store failed; see the service log".to_string()),
        };
        let mut response = (status, Json(ErrorBody { error: code.into(), message })).into_response();
        response.extensions_mut().insert(failure);
        response
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
        // axum reports the body limit through the extractor (its own status says so): a proxy
        // must know a batch was too large, to split it, rather than invalid.
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::TooLarge;
        }
        Self::BadRequest(format!("body: {}", e.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::BadRequest(format!("query: {}", e.body_text()))
    }
}

/// Which counter an `ApiError` response goes to. The error leaves it on its response and
/// `count_failures` counts it, so no handler or extractor has to remember to.
#[derive(Debug, Clone, Copy)]
enum Failure {
    Rejected,
    Store,
}

async fn count_failures(State(st): Shared, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let counter = match response.extensions().get::<Failure>() {
        Some(Failure::Rejected) => &st.counters.rejected_requests,
        Some(Failure::Store) => &st.counters.store_errors,
        None => return response,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    response
}

type Shared = State<Arc<AppState>>;

/// The roles that may call an endpoint: the parameter of its `Caller`.
trait Allowed {
    const ROLES: &'static [Role];
}

/// Proxies report steps and records.
struct Proxies;
/// Admins read sessions and revoke them.
struct Admins;
/// The revocation feed: proxies follow it, admins may read it.
struct ProxiesOrAdmins;

impl Allowed for Proxies {
    const ROLES: &'static [Role] = &[Role::Proxy];
}
impl Allowed for Admins {
    const ROLES: &'static [Role] = &[Role::Admin];
}
impl Allowed for ProxiesOrAdmins {
    const ROLES: &'static [Role] = &[Role::Proxy, Role::Admin];
}
/// Checkpoints and consistency proofs: hashes only, no session data; a witness reads them with
/// the log token, never with the proxy token (which can append) or the admin token (which reads
/// every trail).
struct LogReaders;
impl Allowed for LogReaders {
    const ROLES: &'static [Role] = &[Role::Admin, Role::LogReader];
}

/// A caller whose bearer token has one of `R`'s roles. A handler that takes one is closed to
/// everyone else: 401 without a known token, 403 with a token of another role.
struct Caller<R>(PhantomData<fn() -> R>);

impl<R: Allowed> FromRequestParts<Arc<AppState>> for Caller<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<AppState>) -> Result<Self, ApiError> {
        st.require(&parts.headers, R::ROLES)?;
        Ok(Self(PhantomData))
    }
}

/// A JSON body; one that does not parse is a 400 with an `ErrorBody`, like every refusal.
struct Body<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(Self(v))
    }
}

/// A query string; one that does not parse is a 400 with an `ErrorBody`, like every refusal.
struct Params<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(v) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(v))
    }
}

async fn begin_step(_: Caller<Proxies>, State(st): Shared, Body(req): Body<BeginStep>) -> Result<Json<BeginResponse>, ApiError> {
    validate::begin(&req)?;
    let resp = st.store.begin_step(req, now_ms()).await?;
    let c = if resp.outcome == BeginOutcome::Ok { &st.counters.steps_begun } else { &st.counters.steps_refused };
    c.fetch_add(1, Ordering::Relaxed);
    Ok(Json(resp))
}

/// 409's body: the error shape and what happened to the batch's records.
#[derive(Serialize)]
struct RecordsRefused {
    error: &'static str,
    message: String,
    #[serde(flatten)]
    result: AppendResult,
}

async fn append_records(_: Caller<Proxies>, State(st): Shared, Body(batch): Body<RecordBatch>) -> Result<Response, ApiError> {
    validate::batch(&batch.records)?;
    let res = st.store.append(batch.records, now_ms()).await?;
    st.counters.records_appended.fetch_add(res.appended, Ordering::Relaxed);
    st.counters.records_duplicate.fetch_add(res.duplicates, Ordering::Relaxed);
    if res.refused.is_empty() {
        return Ok(Json(res).into_response());
    }
    st.counters.records_refused.fetch_add(res.refused.len() as u64, Ordering::Relaxed);
    let message = format!(
        "{} record(s) contradict what the service knows of their sessions and were refused (kept in their sessions' audit events); the others were appended",
        res.refused.len()
    );
    Ok((StatusCode::CONFLICT, Json(RecordsRefused { error: "records_refused", message, result: res })).into_response())
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

async fn revocations(_: Caller<ProxiesOrAdmins>, State(st): Shared, Params(q): Params<FeedQuery>) -> Result<Json<RevocationFeed>, ApiError> {
    Ok(Json(st.store.revocations(q.after, q.limit.clamp(1, 5000)).await?))
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

async fn search(_: Caller<Admins>, State(st): Shared, Params(q): Params<SearchQuery>) -> Result<Json<SessionList>, ApiError> {
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

// Extractors run in the order of the arguments: the session id is decoded (or refused by axum)
// before the token is looked at.
async fn session(Path(id): Path<String>, _: Caller<Admins>, State(st): Shared) -> Result<Json<SessionView>, ApiError> {
    match st.store.session(id.clone()).await? {
        Some(v) => Ok(Json(v)),
        None => Err(ApiError::NotFound(format!("no session {id}"))),
    }
}

// The optional body is read before the token is looked at (axum refuses one that does not
// parse, with its own 400), so the token's refusal is taken here, after it.
async fn revoke(
    Path(id): Path<String>,
    caller: Result<Caller<Admins>, ApiError>,
    State(st): Shared,
    body: Option<Json<RevokeRequest>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller?;
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

/// RFC 8935 push: a Security Event Token in the body (`application/secevent+jwt`); 202 once the
/// sessions it names are revoked, 400 with RFC 8935's `{"err","description"}` if it is refused.
async fn ssf_events(State(st): Shared, headers: HeaderMap, body: String) -> Result<Response, ApiError> {
    let Some(receiver) = st.ssf_receiver.clone() else {
        return Err(ApiError::NotFound("this service receives no Shared Signals (start it with --ssf-receiver-issuer, --ssf-receiver-audience and --ssf-receiver-jwks)".into()));
    };
    if let Some(want) = &st.ssf_push_token {
        let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(|t| sha256(t.trim().as_bytes()));
        if !presented.is_some_and(|p| ct_eq(&p, want)) {
            return Err(ApiError::Unauthenticated);
        }
    }
    let (jti, events) = match receiver.verify(body.trim(), now_ms() / 1000) {
        Ok(v) => v,
        Err(r) => {
            log::warn!("ssf: a SET was refused: {} ({})", r.err, r.description);
            let mut resp = (StatusCode::BAD_REQUEST, Json(crate::ssf::error_body(&r))).into_response();
            resp.extensions_mut().insert(Failure::Rejected);
            return Ok(resp);
        }
    };
    let n = crate::ssf::act(st.store.as_ref(), &events).await.map_err(|e| {
        log::error!("ssf: SET {jti}: {e}");
        ApiError::Internal
    })?;
    st.counters.revocations.fetch_add(n as u64, Ordering::Relaxed);
    log::info!("ssf: SET {jti}: {} event(s), {n} session(s) revoked", events.len());
    Ok(StatusCode::ACCEPTED.into_response())
}

/// The transmitter's public keys, for receivers to verify the SETs this service sends.
async fn ssf_jwks(State(st): Shared) -> Result<Json<serde_json::Value>, ApiError> {
    st.ssf_jwks.clone().map(Json).ok_or_else(|| ApiError::NotFound("this service transmits no Shared Signals (no --ssf-transmitter-key)".into()))
}

/// A subject's behavioural profile (admin): what its steps habitually look like.
async fn profile(Path(subject): Path<String>, _: Caller<Admins>, State(st): Shared) -> Result<Json<Profile>, ApiError> {
    validate::subject(&subject)?;
    match st.store.profile(subject.clone()).await? {
        Some(p) => Ok(Json(p)),
        None => Err(ApiError::NotFound(format!("no profile of {subject:?}: none of its steps was recorded yet, or it was reset"))),
    }
}

/// Forget a subject's profile (admin): it is learned again from its next steps.
async fn reset_profile(Path(subject): Path<String>, _: Caller<Admins>, State(st): Shared) -> Result<Json<serde_json::Value>, ApiError> {
    validate::subject(&subject)?;
    let reset = st.store.reset_profile(subject.clone()).await?;
    Ok(Json(serde_json::json!({"subject": subject, "reset": reset})))
}

fn log_signer(st: &AppState) -> Result<Arc<LogSigner>, ApiError> {
    st.log.clone().ok_or_else(|| ApiError::Unavailable("no log key is configured (--log-key): checkpoints are not signed".into()))
}

fn note(text: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// The latest checkpoint (one is signed first if there is none yet).
async fn log_checkpoint(_: Caller<LogReaders>, State(st): Shared) -> Result<Response, ApiError> {
    let signer = log_signer(&st)?;
    match st.store.log_latest().await? {
        Some((_, n)) => Ok(note(n)),
        None => Ok(note(st.store.log_checkpoint(signer, now_ms()).await?.1)),
    }
}

/// On demand: a checkpoint of the log as it is now.
async fn log_checkpoint_now(_: Caller<Admins>, State(st): Shared) -> Result<Response, ApiError> {
    let signer = log_signer(&st)?;
    Ok(note(st.store.log_checkpoint(signer, now_ms()).await?.1))
}

#[derive(Deserialize)]
struct ConsistencyQuery {
    from: u64,
    to: u64,
}

async fn log_consistency(_: Caller<LogReaders>, State(st): Shared, Params(q): Params<ConsistencyQuery>) -> Result<Json<ConsistencyProof>, ApiError> {
    match st.store.log_consistency(q.from, q.to).await? {
        Some(proof) => Ok(Json(ConsistencyProof { from: q.from, to: q.to, proof })),
        None => Err(ApiError::BadRequest(format!("no consistency proof from {} to {}: from must not exceed to, nor to the log's size", q.from, q.to))),
    }
}

#[derive(Deserialize)]
struct InclusionQuery {
    session_id: String,
    seq: u64,
    tree_size: u64,
}

async fn log_inclusion(_: Caller<Admins>, State(st): Shared, Params(q): Params<InclusionQuery>) -> Result<Json<InclusionProof>, ApiError> {
    validate::session_id(&q.session_id)?;
    match st.store.log_inclusion(q.session_id.clone(), q.seq, q.tree_size).await? {
        Some(p) => Ok(Json(p)),
        None => Err(ApiError::NotFound(format!("record {} of session {} is not among the log's first {} leaves", q.seq, q.session_id, q.tree_size))),
    }
}

/// A session's evidence: a checkpoint signed now, each of its records' inclusion proofs against
/// it and its signed head, read from the log.
async fn log_session(Path(id): Path<String>, _: Caller<Admins>, State(st): Shared) -> Result<Json<SessionEvidence>, ApiError> {
    let signer = log_signer(&st)?;
    let (size, checkpoint) = st.store.log_checkpoint(signer.clone(), now_ms()).await?;
    let leaves = st.store.log_session(id.clone(), size).await?;
    if leaves.is_empty() && st.store.session(id.clone()).await?.is_none() {
        return Err(ApiError::NotFound(format!("no session {id}")));
    }
    let head = SessionHead {
        origin: signer.origin().to_string(),
        session_id: id.clone(),
        tree_size: size,
        records: leaves.last().map(|l| l.seq).unwrap_or(0),
        hash: leaves.last().map(|l| l.hash.clone()).unwrap_or_else(|| warden_core::trail::GENESIS.to_string()),
    };
    let head = signer.session_head(&head).map_err(|e| {
        log::error!("cannot sign a session head: {e}");
        ApiError::Internal
    })?;
    Ok(Json(SessionEvidence { session_id: id, checkpoint, head, leaves }))
}

async fn metrics(State(st): Shared) -> impl IntoResponse {
    let c = &st.counters;
    let lines = [
        ("warden_state_steps_begun_total", "Steps counted", &c.steps_begun),
        ("warden_state_steps_refused_total", "Steps refused (subject mismatch or revoked session)", &c.steps_refused),
        ("warden_state_records_appended_total", "Attribution records appended", &c.records_appended),
        ("warden_state_records_duplicate_total", "Attribution records already stored (retries)", &c.records_duplicate),
        ("warden_state_records_refused_total", "Attribution records refused by the trail's invariants (kept in audit events)", &c.records_refused),
        ("warden_state_revocations_total", "Sessions revoked", &c.revocations),
        ("warden_state_rejected_requests_total", "Requests refused with a 4xx", &c.rejected_requests),
        ("warden_state_store_errors_total", "Requests that failed in the store", &c.store_errors),
    ];
    let mut out = String::new();
    let lines = lines.into_iter().map(|(name, help, v)| (name, help, v.load(Ordering::Relaxed))).chain(st.store.counters());
    for (name, help, v) in lines {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"));
    }
    out.push_str(&st.store.metrics_text());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

async fn health() -> &'static str {
    "ok\n"
}

/// Ready only when the store answers: a load balancer (an Envoy cluster's health check) sends
/// proxies to the replicas that can serve them.
async fn ready(State(st): Shared) -> Response {
    match st.store.ready().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => {
            log::warn!("not ready: {e}");
            (StatusCode::SERVICE_UNAVAILABLE, "the store does not answer\n").into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; see crates/warden-state/openapi.yaml".into())
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/steps/begin", post(begin_step))
        .route("/v1/records", post(append_records))
        .route("/v1/revocations", get(revocations))
        .route("/v1/sessions", get(search))
        .route("/v1/sessions/{id}", get(session))
        .route("/v1/sessions/{id}/revoke", post(revoke))
        .route("/v1/profiles/{subject}", get(profile).delete(reset_profile))
        .route("/v1/ssf/events", post(ssf_events))
        .route("/v1/ssf/jwks", get(ssf_jwks))
        .route("/v1/log/checkpoint", get(log_checkpoint).post(log_checkpoint_now))
        .route("/v1/log/proof/consistency", get(log_consistency))
        .route("/v1/log/proof/inclusion", get(log_inclusion))
        .route("/v1/log/proof/session/{id}", get(log_session))
        // Only the endpoints' refusals count: an unknown endpoint is not a refused request.
        .route_layer(middleware::from_fn_with_state(state.clone(), count_failures))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limits::MAX_BODY_BYTES))
        .with_state(state)
}
