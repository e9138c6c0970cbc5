//! Cached mode's session snapshots in the host's shared data: every worker VM of one proxy
//! reads and writes the same snapshot of a session, so they count its steps, bind it and revoke
//! it alike. Every change is a read-modify-write with compare-and-swap, retried a few times
//! when another worker wrote in between; it lives in `edit` alone.

use super::{Pending, Warden};
use crate::config::StateMode;
use crate::decision::{Action, Decision};
use crate::host::Host;
use crate::session::{self, BeginError, SessionState};
use crate::wire::StepRecord;

const PREFIX: &str = "session-warden.session.";
/// Compare-and-swap attempts before a change is given up (a cached step then goes to the service).
const ATTEMPTS: usize = 4;
/// Sessions whose response bytes a VM holds for its next step before sharing them.
const UNSHARED_MAX: usize = 1024;

fn get(host: &dyn Host, id: &str) -> Option<(SessionState, u32)> {
    let (bytes, cas) = host.shared_get(&format!("{PREFIX}{id}"))?;
    serde_json::from_slice(&bytes).ok().map(|s| (s, cas))
}

/// Write a snapshot: with `cas`, only if nobody wrote since it was read; without, whatever is there.
pub(super) fn put(host: &mut dyn Host, id: &str, state: &SessionState, cas: Option<u32>) -> bool {
    match serde_json::to_vec(state) {
        Ok(bytes) => host.shared_set(&format!("{PREFIX}{id}"), &bytes, cas),
        Err(_) => false,
    }
}

/// What a change makes of the snapshot it read. Built and matched at once, never stored.
#[allow(clippy::large_enum_variant)]
enum Edit<R> {
    Write(SessionState, R),
    Leave(R),
}

/// Apply `f` to the session's snapshot (`None` when there is none) until the result is written
/// without a concurrent change in between. `None` when every attempt lost the race.
fn edit<R>(host: &mut dyn Host, id: &str, mut f: impl FnMut(Option<SessionState>) -> Edit<R>) -> Option<R> {
    for _ in 0..ATTEMPTS {
        let (state, cas) = match get(host, id) {
            Some((s, cas)) => (Some(s), Some(cas)),
            None => (None, None),
        };
        match f(state) {
            Edit::Leave(r) => return Some(r),
            Edit::Write(state, r) => {
                if put(host, id, &state, cas) {
                    return Some(r);
                }
            }
        }
    }
    None
}

/// A cached step: taken on the snapshot, refused by it, or left to the state service.
pub(super) enum Cached {
    /// The state before the step, and the step's number.
    Hit(Box<SessionState>, u64),
    Refused(BeginError),
    Miss,
}

impl Warden {
    fn cached(&self) -> bool {
        self.config.state.as_ref().is_some_and(|s| s.mode == StateMode::Cached)
    }

    /// Take the step on the shared snapshot under the one session-binding rule.
    pub(super) fn begin_cached(&mut self, ctx: &Pending, host: &mut dyn Host) -> Cached {
        let seen = ctx.seen();
        let pending = self.unshared_bytes.get(&ctx.session.id).copied().unwrap_or(0);
        let taken = edit(host, &ctx.session.id, |state| {
            let Some(mut state) = state else { return Edit::Leave(Cached::Miss) };
            // A snapshot with no subject only marks a revocation heard of before the session
            // was: its first step goes through the service, which binds it.
            if state.subject.is_empty() && !state.revoked {
                return Edit::Leave(Cached::Miss);
            }
            // The responses this VM sent since its last write join the snapshot with this step,
            // so the step decides on them.
            state.bytes_out = state.bytes_out.saturating_add(pending);
            match state.begin_step(&ctx.identity.subject, &seen, ctx.now_ms) {
                Ok(before) => {
                    let step = state.steps;
                    Edit::Write(state, Cached::Hit(Box::new(before), step))
                }
                Err(e) => Edit::Leave(Cached::Refused(e)),
            }
        });
        if matches!(taken, Some(Cached::Hit(..))) {
            self.unshared_bytes.remove(&ctx.session.id);
        }
        taken.unwrap_or(Cached::Miss)
    }

    /// The state after a step the service counted: this VM's table, and the shared snapshot.
    pub(super) fn remember_step(&mut self, id: &str, mut after: SessionState, host: &mut dyn Host) {
        if self.cached() {
            put(host, id, &after, None);
        }
        // The profile travels in the shared snapshot (cached steps decide on it); this VM's
        // table does not keep a copy per session.
        after.profile = None;
        self.sessions.put(id, after);
    }

    /// A revocation from the service's feed (cached mode) or a terminate decision.
    pub fn apply_revocation(&mut self, session_id: &str, host: &mut dyn Host) {
        self.sessions.revoke(session_id);
        if self.cached() {
            edit(host, session_id, |state| {
                let mut state = state.unwrap_or_default();
                state.revoked = true;
                Edit::Write(state, ())
            });
        }
    }

    /// Keep what a decision leaves behind (risk, flags, a satisfied step-up) for the session's
    /// next step: in this VM's table and, in cached mode, in the shared snapshot.
    ///
    /// `before` is the state the step was decided on: a decision that leaves nothing it did not
    /// already hold (the ordinary step) costs no second shared-data write. Another worker's
    /// write in between is then simply the later one, as it would be had this one come first.
    pub(super) fn after_decision(&mut self, id: &str, d: &Decision, before: &SessionState, now_ms: u64, host: &mut dyn Host) {
        let stepped = d.step_up_satisfied.then_some(now_ms);
        let refused = matches!(d.action, Action::Deny | Action::StepUp).then_some(now_ms);
        if let Some(mine) = self.sessions.get_mut(id) {
            mine.after_decision(d.risk, &d.flags, stepped, refused);
        }
        let unchanged = stepped.is_none() && refused.is_none() && d.risk == before.risk && d.flags.iter().all(|f| before.flags.contains(f));
        if self.cached() && !unchanged {
            edit(host, id, |state| match state {
                Some(mut state) => {
                    state.after_decision(d.risk, &d.flags, stepped, refused);
                    Edit::Write(state, ())
                }
                None => Edit::Leave(()),
            });
        }
    }

    /// The response of a step went out with `bytes` of body: the session's data volume, for its
    /// next step, before the record reaches the service.
    ///
    /// In cached mode the bytes join the shared snapshot with this VM's next step of the session
    /// (`begin_cached`), or at the latest on the next tick (`share_response_bytes`): a shared-data
    /// cycle per response would cost every request as much as its step does.
    pub fn after_response(&mut self, id: &str, bytes: u64, host: &mut dyn Host) {
        if bytes == 0 {
            return;
        }
        if let Some(mine) = self.sessions.get_mut(id) {
            mine.bytes_out = mine.bytes_out.saturating_add(bytes);
        }
        if self.cached() {
            // Bounded as the VM's session table is: past it, the bytes are shared now.
            if self.unshared_bytes.len() >= UNSHARED_MAX && !self.unshared_bytes.contains_key(id) {
                self.share_response_bytes(host);
            }
            let pending = self.unshared_bytes.entry(id.to_string()).or_default();
            *pending = pending.saturating_add(bytes);
        }
    }

    /// The tick: response bytes no step of this VM has carried into the snapshot yet, shared
    /// now, so the other workers' steps see them within a tick.
    pub fn share_response_bytes(&mut self, host: &mut dyn Host) {
        for (id, bytes) in std::mem::take(&mut self.unshared_bytes) {
            edit(host, &id, |state| match state {
                Some(mut state) => {
                    state.bytes_out = state.bytes_out.saturating_add(bytes);
                    Edit::Write(state, ())
                }
                None => Edit::Leave(()),
            });
        }
    }

    /// The MCP server named the session of an `initialize` (its `mcp-session-id`): the step
    /// moves under that id, and the session continues under it.
    pub fn adopt_session(&mut self, minted: &str, assigned: &str, record: Option<&mut StepRecord>, host: &mut dyn Host) -> bool {
        if !session::is_valid_session_id(assigned) || minted == assigned {
            return false;
        }
        if let Some(state) = self.sessions.get(minted).cloned() {
            if self.cached() {
                put(host, assigned, &state, None);
            }
            self.sessions.put(assigned, state);
        }
        if let Some(r) = record {
            r.session_id = assigned.to_string();
        }
        true
    }
}
