//! The decision contract: what a policy must return, and how each action is enforced.

use regorus::Value;

use crate::error::PolicyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    StepUp,
    Terminate,
    Throttle,
}

impl Action {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "allow" => Self::Allow,
            "deny" => Self::Deny,
            "step_up" => Self::StepUp,
            "terminate" => Self::Terminate,
            "throttle" => Self::Throttle,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::StepUp => "step_up",
            Self::Terminate => "terminate",
            Self::Throttle => "throttle",
        }
    }
}

/// A decision as the policy gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub reasons: Vec<String>,
    pub risk: f64,
    /// Extra upstream headers the policy asks for (allow only).
    pub headers: Vec<(String, String)>,
    /// Seconds for `Retry-After` (throttle).
    pub retry_after: Option<u32>,
    /// RFC 9470 hints for step_up.
    pub acr_values: Option<String>,
    pub max_age: Option<u64>,
    /// Signals that moved the risk (recorded in the trail).
    pub signals: Vec<String>,
    /// Signals that flag the session for review (kept in the session state).
    pub flags: Vec<String>,
    /// A stronger credential satisfied a step-up on this step: the session is cleared for a while.
    pub step_up_satisfied: bool,
}

impl Decision {
    /// A decision the filter makes itself (credential, session binding, policy errors).
    pub fn internal(action: Action, reason: &str) -> Self {
        Self {
            action,
            reasons: vec![reason.to_string()],
            risk: 0.0,
            headers: Vec::new(),
            retry_after: None,
            acr_values: None,
            max_age: None,
            signals: Vec::new(),
            flags: Vec::new(),
            step_up_satisfied: false,
        }
    }
}

fn strings(out: &Value, name: &str) -> Result<Vec<String>, PolicyError> {
    let mut v = Vec::new();
    if let Some(r) = field(out, name) {
        let items: Vec<Value> = match r {
            Value::Array(a) => a.iter().cloned().collect(),
            Value::Set(s) => s.iter().cloned().collect(),
            _ => return Err(shape(&format!("`{name}` must be an array or set of strings"))),
        };
        for item in items {
            let s = item.as_string().map_err(|_| shape(&format!("`{name}` must hold strings")))?;
            v.push(s.to_string());
        }
    }
    Ok(v)
}

fn field<'a>(obj: &'a Value, name: &str) -> Option<&'a Value> {
    match &obj[name] {
        Value::Undefined | Value::Null => None,
        v => Some(v),
    }
}

fn shape(msg: &str) -> PolicyError {
    PolicyError(format!("decision has the wrong shape: {msg}"))
}

/// Header names a policy may not set: the filter's own and anything hop-by-hop or pseudo.
fn header_allowed(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with("x-warden-")
        && !matches!(name, "host" | "authorization" | "cookie" | "traceparent" | "content-length" | "transfer-encoding" | "connection")
}

fn header_value_ok(v: &str) -> bool {
    v.len() <= 1024 && v.bytes().all(|b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b))
}

/// Read `{action, reasons, risk, headers, retry_after, acr_values, max_age}`.
pub fn parse_output(out: &Value) -> Result<Decision, PolicyError> {
    if !matches!(out, Value::Object(_)) {
        return Err(shape("the entrypoint must be an object with an `action`"));
    }
    let action = field(out, "action")
        .ok_or_else(|| shape("`action` is missing"))?
        .as_string()
        .map_err(|_| shape("`action` must be a string"))?;
    let action = Action::parse(action)
        .ok_or_else(|| shape(&format!("unknown action `{action}` (allow|deny|step_up|terminate|throttle)")))?;

    let reasons = strings(out, "reasons")?;
    let signals = strings(out, "signals")?;
    let flags = strings(out, "flags")?;
    let step_up_satisfied = match field(out, "step_up_satisfied") {
        Some(v) => *v.as_bool().map_err(|_| shape("`step_up_satisfied` must be a boolean"))?,
        None => false,
    };

    let risk = match field(out, "risk") {
        Some(v) => v.as_f64().map_err(|_| shape("`risk` must be a number"))?,
        None => 0.0,
    };

    let mut headers = Vec::new();
    if let Some(h) = field(out, "headers") {
        let obj = h.as_object().map_err(|_| shape("`headers` must be an object"))?;
        for (k, v) in obj.iter() {
            let name = k.as_string().map_err(|_| shape("header names must be strings"))?;
            let value = v.as_string().map_err(|_| shape("header values must be strings"))?;
            if !header_allowed(name) || !header_value_ok(value) {
                return Err(shape(&format!("header `{name}` may not be set by a policy")));
            }
            headers.push((name.to_string(), value.to_string()));
        }
    }

    let retry_after = match field(out, "retry_after") {
        Some(v) => Some(v.as_u32().map_err(|_| shape("`retry_after` must be a whole number of seconds"))?),
        None => None,
    };
    let acr_values = match field(out, "acr_values") {
        Some(v) => {
            let s = v.as_string().map_err(|_| shape("`acr_values` must be a string"))?;
            if !header_value_ok(s) || s.contains('"') {
                return Err(shape("`acr_values` has characters not allowed in a header"));
            }
            Some(s.to_string())
        }
        None => None,
    };
    let max_age = match field(out, "max_age") {
        Some(v) => Some(v.as_u64().map_err(|_| shape("`max_age` must be a whole number of seconds"))?),
        None => None,
    };
    if !risk.is_finite() {
        return Err(shape("`risk` must be a finite number"));
    }
    Ok(Decision { action, reasons, risk, headers, retry_after, acr_values, max_age, signals, flags, step_up_satisfied })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Decision, PolicyError> {
        parse_output(&Value::from_json_str(json).unwrap())
    }

    #[test]
    fn full_decision_parses() {
        let d = parse(r#"{"action":"throttle","reasons":["rate"],"risk":42,"retry_after":7,"headers":{"x-risk":"high"}}"#).unwrap();
        assert_eq!(d.action, Action::Throttle);
        assert_eq!(d.reasons, vec!["rate"]);
        assert_eq!(d.risk, 42.0);
        assert_eq!(d.retry_after, Some(7));
        assert_eq!(d.headers, vec![("x-risk".to_string(), "high".to_string())]);
    }

    #[test]
    fn wrong_shapes_are_errors_not_allows() {
        for bad in [
            r#""allow""#,
            r#"{}"#,
            r#"{"action":"permit"}"#,
            r#"{"action":1}"#,
            r#"{"action":"allow","reasons":"x"}"#,
            r#"{"action":"allow","risk":"high"}"#,
            r#"{"action":"allow","headers":{"x-warden-subject":"root"}}"#,
            r#"{"action":"allow","headers":{"authorization":"Bearer x"}}"#,
            r#"{"action":"allow","headers":{"x-ok":"bad\nvalue"}}"#,
            r#"{"action":"throttle","retry_after":-1}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
