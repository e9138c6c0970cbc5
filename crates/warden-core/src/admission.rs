//! What a store accepts of an attribution record: the trail's invariants, in one place, for
//! every store. Whoever holds the proxy token can post records; these rules keep what they post
//! from contradicting what the store itself saw, so a trail cannot be given impossible history:
//! a second decision for a step, a step by another subject than the session's, a step the
//! service never counted, a session nobody began, a step from 1970 or from next week.
//!
//! What the store cannot check, it is told and keeps: a step the proxy counted alone (cached
//! mode, degraded mode, an MCP `initialize`) says so in `StepRecord::begun`, and only such a
//! record can advance the session's count or open a session (degraded first steps and MCP
//! sessions are first heard of through their records).

use crate::session::SessionState;
use crate::wire::{Begun, StepRecord};

/// How far ahead of the store's clock a record's time may be.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// How old a step counted by the proxy alone may be when its record arrives: a proxy keeps
/// records while the service is away, not for weeks.
pub const MAX_PROXY_RECORD_AGE_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// What the store does with an admitted record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// Stored already (same session, step and decision id): a retry, nothing changes.
    Duplicate,
    /// Append it; the session (opened by this record when `opened`) has been updated.
    /// `seen_credential`: remember that the session's subject presented the record's credential
    /// (only for a step the proxy counted alone: a service-counted step's begin did it).
    Append { opened: bool, seen_credential: bool },
}

/// Why a record is refused (409); the store writes it to the session's audit events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The store has no such session and the record does not say a proxy began it.
    SessionNotBegun,
    /// The record's subject is not the session's.
    SubjectMismatch { bound: String },
    /// Another decision is already recorded for this step.
    StepAlreadyRecorded { decision_id: String },
    /// The record says the service counted the step, and the service counted fewer steps.
    StepNotBegun { counted: u64 },
    /// The record's time is impossible: ahead of the store's clock, before its session began,
    /// or too old for a step a proxy kept.
    TimeImplausible(&'static str),
}

impl Refusal {
    /// The refusal's code: in the append answer, and the audit event's kind.
    pub fn code(&self) -> &'static str {
        match self {
            Self::SessionNotBegun => "session_not_begun",
            Self::SubjectMismatch { .. } => "record_subject_mismatch",
            Self::StepAlreadyRecorded { .. } => "step_already_recorded",
            Self::StepNotBegun { .. } => "step_not_begun",
            Self::TimeImplausible(_) => "record_time_implausible",
        }
    }

    /// The audit event's detail: what the record claimed against what the store knows.
    pub fn detail(&self, r: &StepRecord) -> String {
        let what = format!("record of step {} (decision {}, begun by {})", r.step, r.decision_id, r.begun.as_str());
        match self {
            Self::SessionNotBegun => format!("{what}: no step of this session was begun and the record does not say a proxy began it"),
            Self::SubjectMismatch { bound } => format!("{what} is by {:?}; the session is bound to {bound:?}", r.subject),
            Self::StepAlreadyRecorded { decision_id } => format!("{what}: step {} is already recorded with decision {decision_id}", r.step),
            Self::StepNotBegun { counted } => format!("{what}: the service counted {counted} step(s) of this session"),
            Self::TimeImplausible(why) => format!("{what} at {} ms: {why}", r.at_ms),
        }
    }
}

/// Decide on one record and, when it is appended, update its session: `session` is the
/// session as stored (`None` if the store has none; a record that opens it leaves it `Some`),
/// `recorded` the decision id the store already holds for this step (the record's own first,
/// if any). The store then appends, counts a duplicate, or audits the refusal; it decides
/// nothing itself.
pub fn admit(session: &mut Option<SessionState>, recorded: Option<&str>, r: &StepRecord, now_ms: u64) -> Result<Admitted, Refusal> {
    match recorded {
        Some(d) if d == r.decision_id => return Ok(Admitted::Duplicate),
        Some(d) => return Err(Refusal::StepAlreadyRecorded { decision_id: d.to_string() }),
        None => {}
    }
    if r.at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(Refusal::TimeImplausible("ahead of the service's clock"));
    }
    let by_proxy = r.begun != Begun::Service;
    if by_proxy && r.at_ms.saturating_add(MAX_PROXY_RECORD_AGE_MS) < now_ms {
        return Err(Refusal::TimeImplausible("older than a proxy keeps the records of the steps it counts"));
    }
    let opened = session.is_none();
    let s = match session {
        Some(s) => s,
        None if by_proxy => session.insert(SessionState::open(&r.subject, &[], r.at_ms)),
        None => return Err(Refusal::SessionNotBegun),
    };
    if s.subject.is_empty() {
        // Revoked by an admin before any step was begun: begin-step refuses it, so only a
        // proxy that had not heard of the revocation yet can have taken a step.
        if !by_proxy {
            return Err(Refusal::SessionNotBegun);
        }
        s.subject = r.subject.clone();
        s.subjects = vec![r.subject.clone()];
    }
    if s.subject != r.subject {
        return Err(Refusal::SubjectMismatch { bound: s.subject.clone() });
    }
    if !by_proxy {
        if r.step > s.steps {
            return Err(Refusal::StepNotBegun { counted: s.steps });
        }
        if r.at_ms.saturating_add(MAX_CLOCK_SKEW_MS) < s.started_at_ms {
            return Err(Refusal::TimeImplausible("before its session began"));
        }
    }
    s.apply_record(r, by_proxy);
    Ok(Admitted::Append { opened, seen_credential: by_proxy && r.credential.is_some() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn rec(step: u64, decision: &str, subject: &str, begun: Begun) -> StepRecord {
        StepRecord {
            session_id: "s1".into(),
            step,
            decision_id: decision.into(),
            at_ms: NOW - 1000,
            subject: subject.into(),
            credential: Some("fp-alice".into()),
            begun,
            ..Default::default()
        }
    }

    /// A session the service began with two steps.
    fn begun_twice() -> Option<SessionState> {
        let mut s = SessionState::open("alice", &[], NOW - 10_000);
        s.steps = 2;
        Some(s)
    }

    #[test]
    fn a_service_counted_step_is_appended_once_and_adds_nothing_seen() {
        let mut s = begun_twice();
        let r = rec(2, "d2", "alice", Begun::Service);
        assert_eq!(admit(&mut s, None, &r, NOW), Ok(Admitted::Append { opened: false, seen_credential: false }));
        assert!(s.as_ref().unwrap().credentials.is_empty());
        assert_eq!(admit(&mut s, Some("d2"), &r, NOW), Ok(Admitted::Duplicate));
    }

    #[test]
    fn impossible_history_is_refused_and_changes_nothing() {
        let cases: Vec<(Option<SessionState>, Option<&str>, StepRecord, &str)> = vec![
            (begun_twice(), Some("d1"), rec(1, "forged", "alice", Begun::Service), "step_already_recorded"),
            (begun_twice(), Some("d1"), rec(1, "forged", "alice", Begun::Cached), "step_already_recorded"),
            (begun_twice(), None, rec(3, "d3", "alice", Begun::Service), "step_not_begun"),
            (begun_twice(), None, rec(50, "d50", "alice", Begun::Service), "step_not_begun"),
            (begun_twice(), None, rec(2, "d2", "mallory", Begun::Service), "record_subject_mismatch"),
            (begun_twice(), None, rec(3, "d3", "mallory", Begun::Cached), "record_subject_mismatch"),
            (None, None, rec(1, "d1", "alice", Begun::Service), "session_not_begun"),
            (None, None, StepRecord { at_ms: 0, ..rec(1, "d1", "alice", Begun::Proxy) }, "record_time_implausible"),
            (begun_twice(), None, StepRecord { at_ms: NOW + MAX_CLOCK_SKEW_MS + 1, ..rec(2, "d2", "alice", Begun::Service) }, "record_time_implausible"),
            (begun_twice(), None, StepRecord { at_ms: 5, ..rec(2, "d2", "alice", Begun::Service) }, "record_time_implausible"),
            // Revoked by an admin before any step: only a proxy could have counted one.
            (Some(SessionState { revoked: true, ..Default::default() }), None, rec(1, "d1", "alice", Begun::Service), "session_not_begun"),
        ];
        for (mut session, recorded, r, code) in cases {
            let before = session.clone();
            let refusal = admit(&mut session, recorded, &r, NOW).unwrap_err();
            assert_eq!(refusal.code(), code, "{r:?}");
            assert!(refusal.detail(&r).contains(&format!("decision {}", r.decision_id)));
            assert_eq!(session, before, "a refused record changes nothing: {code}");
        }
    }

    #[test]
    fn steps_a_proxy_counted_alone_open_and_advance_the_session() {
        // Degraded first steps, or an MCP initialize: the record is the first the store hears.
        let mut s = None;
        let r = rec(1, "d1", "alice", Begun::Proxy);
        assert_eq!(admit(&mut s, None, &r, NOW), Ok(Admitted::Append { opened: true, seen_credential: true }));
        let st = s.clone().unwrap();
        assert_eq!((st.subject.as_str(), st.steps, st.started_at_ms, st.credentials.clone()), ("alice", 1, NOW - 1000, vec!["fp-alice".to_string()]));
        // Cached steps beyond the service's count, by the bound subject.
        let mut s = begun_twice();
        assert!(admit(&mut s, None, &rec(5, "d5", "alice", Begun::Cached), NOW).is_ok());
        assert_eq!(s.unwrap().steps, 5);
        // A proxy that had not heard of an admin's revocation binds the session it counted.
        let mut s = Some(SessionState { revoked: true, ..Default::default() });
        assert!(admit(&mut s, None, &rec(1, "d1", "alice", Begun::Proxy), NOW).is_ok());
        assert_eq!((s.as_ref().unwrap().subject.as_str(), s.as_ref().unwrap().revoked), ("alice", true));
    }
}
