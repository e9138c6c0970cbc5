//! What the request flow hands back to the proxy: the outcome of a request (headers to strip
//! and stamp, or a local reply, plus counters, a log line and the step's record), and the
//! request waiting for the state service between the two halves of the flow.

use super::decide::Counted;
use crate::decision::Decision;
use crate::host::Headers;
use crate::identity::Identity;
use crate::mcp::declared::{Declared, Disagreement};
use crate::mcp::McpRequest;
use crate::path::CanonicalPath;
use crate::session::{Seen, SessionRef, SessionState};
use crate::wire::StepRecord;

/// A local reply in place of the upstream's response.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What the proxy does with one request.
#[derive(Debug, Default)]
pub struct RequestOutcome {
    /// Client-sent copies of stamped headers, to remove before anything is forwarded.
    pub remove_headers: Vec<String>,
    /// Headers to set on the request that goes upstream.
    pub set_headers: Vec<(String, String)>,
    /// Refuse the request with this reply instead of forwarding it.
    pub reply: Option<LocalReply>,
    /// Headers for the client on the upstream's response.
    pub response_headers: Vec<(String, String)>,
    /// Counters to increment (names are documented in README).
    pub metrics: Vec<String>,
    /// The decision taken (enforced or, in shadow mode, the one that would have been).
    pub decision: Option<Decision>,
    pub decision_id: String,
    pub session_id: Option<String>,
    /// One line for the proxy's log when something noteworthy happened.
    pub log: Option<String>,
    /// The step's attribution record; the proxy adds status and duration and queues it.
    pub record: Option<StepRecord>,
    /// An MCP `initialize` without a session: the session id the MCP server assigns in its
    /// response (`mcp-session-id`) becomes the governed session (see `Warden::adopt_session`).
    pub adopt_session: bool,
    /// A 2026-07-28 MCP request allowed on what its headers declare: the headers go on (stamped)
    /// and the body, once whole, is held to them and decided by `Warden::on_held_body`.
    pub hold: Option<Box<Held>>,
}

/// A step taken on a request's headers, waiting for its body.
pub struct Held {
    pub(super) pending: Pending,
    pub(super) declared: Declared,
    pub(super) before: SessionState,
    pub(super) step: u64,
    pub(super) counted: Counted,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("session", &self.pending.session.id).field("step", &self.step).finish()
    }
}

/// What the headers phase of an MCP request fixed before the body is read: proxy-wasm hosts
/// only deliver a body once the headers have gone on, so these are stamped upstream first and
/// the body phase decides under the same ids.
#[derive(Debug, Clone)]
pub struct Early {
    pub decision_id: String,
    pub traceparent: String,
    pub minted_session: Option<String>,
}

/// The request body, for requests whose body the filter reads (MCP).
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    Absent,
    Complete(&'a [u8]),
    TooLarge,
    /// Still to come, on a request that declares its MCP method in headers (2026-07-28): decide
    /// on the headers, and hold the body to them when it comes.
    Coming,
}

/// The result of the first half of the request flow. Returned once per request and matched at
/// once, so the size difference between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// Decided: apply the outcome.
    Done(RequestOutcome),
    /// Sync mode (or a cache miss): send `call` to the state service, then `Warden::resume`.
    Call { pending: Box<Pending>, call: StateCall },
}

/// A POST to the state service (the proxy adds method, authority, token and content type).
#[derive(Debug, Clone)]
pub struct StateCall {
    pub path: &'static str,
    pub body: Vec<u8>,
}

/// Why a begin-step call did not give an answer to decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateFailure {
    /// No answer, a timeout, a 5xx or an unreadable answer: the policy decides, degraded.
    Unavailable(String),
    /// A 4xx: the service looked at the step and refused it. Never degraded mode, or a client
    /// that can make the call invalid could switch session binding off.
    Refused(String),
}

impl From<String> for StateFailure {
    fn from(why: String) -> Self {
        Self::Unavailable(why)
    }
}

impl From<&str> for StateFailure {
    fn from(why: &str) -> Self {
        Self::Unavailable(why.to_string())
    }
}

/// A request waiting for the state service.
pub struct Pending {
    pub(super) out: RequestOutcome,
    pub(super) headers: Headers,
    pub(super) identity: Identity,
    pub(super) session: SessionRef,
    pub(super) traceparent: String,
    pub(super) now_ms: u64,
    pub(super) mcp: Option<McpRequest>,
    /// MCP tools this request calls.
    pub(super) tools: Vec<String>,
    pub(super) context: Context,
    /// The canonical `:path` (`path.rs`) the policy decides on; `None` without a `:path`.
    pub(super) path: Option<CanonicalPath>,
    /// Deciding on what the headers declare (`Body::Coming`): the declaration, or why it cannot
    /// be believed.
    pub(super) declared: Option<Result<Declared, Disagreement>>,
}

/// Where the request comes from: the direct peer, and the region and device a trusted source
/// said (`context.trusted_sources`).
#[derive(Debug, Default)]
pub struct Context {
    pub source_address: Option<String>,
    pub region: Option<String>,
    pub device: Option<String>,
    /// `:authority`, bounded (`wire::limits`).
    pub authority: Option<String>,
}

impl Pending {
    pub(super) fn seen(&self) -> Seen<'_> {
        Seen {
            credential: self.identity.fingerprint.as_deref(),
            workload: self.identity.workload.as_deref(),
            region: self.context.region.as_deref(),
            device: self.context.device.as_deref(),
            authority: self.context.authority.as_deref(),
            tools: &self.tools,
            scopes: &self.identity.scopes,
        }
    }
}
