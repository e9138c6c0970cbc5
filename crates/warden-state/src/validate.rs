//! What the service accepts. The API checks every request here before it reaches the store, so
//! no store has to (or can forget to): a request that fails changes nothing and gets a 400 with
//! the reason. Sizes follow `warden_core::wire::limits`, the rule the filter bounds with: a
//! value is acceptable when bounding it changes nothing.

use warden_core::session::is_valid_session_id;
use warden_core::wire::{limits, BeginStep, StepRecord};

pub const MAX_BATCH: usize = 1000;

/// Why a request is not acceptable; the message is for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

fn bad(msg: String) -> Invalid {
    Invalid(msg)
}

pub fn session_id(id: &str) -> Result<(), Invalid> {
    if is_valid_session_id(id) {
        Ok(())
    } else {
        Err(bad("session_id must be 1-256 visible ASCII characters".into()))
    }
}

/// A subject named in a path (profiles): at most one text value's length, not empty.
pub fn subject(s: &str) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > limits::MAX_TEXT_BYTES {
        return Err(bad(format!("subject must be 1-{} bytes", limits::MAX_TEXT_BYTES)));
    }
    Ok(())
}

/// Refused if the filter's bounding would cut anything; names the fields it would cut.
fn within_limits(what: &str, cut: Vec<&'static str>) -> Result<(), Invalid> {
    if cut.is_empty() {
        return Ok(());
    }
    Err(bad(format!(
        "{what}: over its limits: {} (values at most {} bytes, {} tools, {} scopes, {} reasons/signals/flags, {} delegation entries, input at most {} bytes)",
        cut.join(", "),
        limits::MAX_TEXT_BYTES,
        limits::MAX_TOOLS,
        limits::MAX_SCOPES,
        limits::MAX_REASONS,
        limits::MAX_DELEGATION,
        limits::MAX_INPUT_BYTES
    )))
}

pub fn begin(r: &BeginStep) -> Result<(), Invalid> {
    session_id(&r.session_id)?;
    within_limits("begin-step", r.clone().bound())
}

/// A batch of records: bounded, and every record acceptable (one bad record refuses the batch).
pub fn batch(records: &[StepRecord]) -> Result<(), Invalid> {
    if records.len() > MAX_BATCH {
        return Err(bad(format!("at most {MAX_BATCH} records per batch")));
    }
    records.iter().try_for_each(record)
}

pub fn record(r: &StepRecord) -> Result<(), Invalid> {
    session_id(&r.session_id)?;
    if r.step == 0 {
        return Err(bad(format!("record for session {}: step must be at least 1", r.session_id)));
    }
    if r.decision_id.is_empty() || r.decision_id.len() > 128 {
        return Err(bad(format!("record for session {} step {}: decision_id must be 1-128 bytes", r.session_id, r.step)));
    }
    if !matches!(r.action.as_str(), "allow" | "deny" | "step_up" | "terminate" | "throttle") {
        return Err(bad(format!("record for session {} step {}: unknown action {:?}", r.session_id, r.step, r.action)));
    }
    if !r.risk.is_finite() || !r.risk_before.is_finite() {
        return Err(bad(format!("record for session {} step {}: risk must be a finite number", r.session_id, r.step)));
    }
    within_limits(&format!("record for session {} step {}", r.session_id, r.step), r.clone().bound())
}
