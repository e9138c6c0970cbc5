//! What the service accepts. The API checks every request here before it reaches the store, so
//! no store has to (or can forget to): a request that fails changes nothing and gets a 400 with
//! the reason.

use warden_core::session::is_valid_session_id;
use warden_core::wire::{BeginStep, StepRecord};

const MAX_FIELD: usize = 1024;
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

fn short(name: &str, v: Option<&str>) -> Result<(), Invalid> {
    match v {
        Some(s) if s.len() > MAX_FIELD => Err(bad(format!("{name} is longer than {MAX_FIELD} bytes"))),
        _ => Ok(()),
    }
}

pub fn begin(r: &BeginStep) -> Result<(), Invalid> {
    session_id(&r.session_id)?;
    short("subject", Some(&r.subject))?;
    for (n, v) in [("credential", &r.credential), ("workload", &r.workload), ("region", &r.region), ("device", &r.device)] {
        short(n, v.as_deref())?;
    }
    if r.tools.len() > 64 || r.scopes.len() > 256 {
        return Err(bad("at most 64 tools and 256 scopes per step".into()));
    }
    Ok(())
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
    short("subject", Some(&r.subject))?;
    short("path", r.path.as_deref())?;
    if r.reasons.len() > 64 || r.signals.len() > 64 || r.flags.len() > 64 || r.delegation.len() > 16 {
        return Err(bad(format!("record for session {} step {}: too many reasons or delegation entries", r.session_id, r.step)));
    }
    Ok(())
}
