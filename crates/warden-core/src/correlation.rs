//! Correlation: ids the filter mints and the W3C `traceparent` it keeps or creates.

use crate::hash::hex;
use crate::host::Host;

/// Upstream headers the filter stamps (client copies are stripped first).
pub const SESSION_HEADER: &str = "x-warden-session";
pub const STEP_HEADER: &str = "x-warden-step";
pub const DECISION_HEADER: &str = "x-warden-decision";
pub const SUBJECT_HEADER: &str = "x-warden-subject";
pub const TRACEPARENT: &str = "traceparent";

fn random_hex(host: &mut dyn Host, n: usize) -> String {
    let mut buf = [0u8; 16];
    let n = n.min(buf.len());
    host.fill_random(&mut buf[..n]);
    hex(&buf[..n])
}

pub fn new_session_id(host: &mut dyn Host) -> String {
    format!("ses_{}", random_hex(host, 16))
}

pub fn new_decision_id(host: &mut dyn Host) -> String {
    format!("dec_{}", random_hex(host, 16))
}

/// `00-<trace-id>-<parent-id>-<flags>`: lower-case hex, neither id all zeros, version not `ff`.
pub fn is_valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    if parts.len() < 4 {
        return false;
    }
    let hexok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let (ver, trace, parent, flags) = (parts[0], parts[1], parts[2], parts[3]);
    if !hexok(ver, 2) || ver == "ff" || !hexok(trace, 32) || !hexok(parent, 16) || !hexok(flags, 2) {
        return false;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if ver == "00" && parts.len() != 4 {
        return false;
    }
    trace.bytes().any(|b| b != b'0') && parent.bytes().any(|b| b != b'0')
}

pub fn new_traceparent(host: &mut dyn Host) -> String {
    let trace = random_hex(host, 16);
    let parent = random_hex(host, 8);
    format!("00-{trace}-{parent}-01")
}

/// The trace id of a valid traceparent (used to correlate the trail with traces).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;

    #[test]
    fn traceparent_validation_follows_w3c() {
        assert!(is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));
        assert!(!is_valid_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"));
        assert!(is_valid_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"));
        assert!(!is_valid_traceparent("garbage"));
    }

    #[test]
    fn minted_ids_are_well_formed_and_distinct() {
        let mut h = FakeHost::at(0);
        let a = new_session_id(&mut h);
        let b = new_session_id(&mut h);
        assert!(a.starts_with("ses_") && a.len() == 36 && a != b);
        assert!(is_valid_traceparent(&new_traceparent(&mut h)));
        assert!(new_decision_id(&mut h).starts_with("dec_"));
    }
}
