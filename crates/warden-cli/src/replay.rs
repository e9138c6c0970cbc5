//! `warden replay`: re-decide recorded sessions with a candidate policy, step by step, from the
//! exact input each step was decided on (session state as it was at that step included), and
//! say what would change before the candidate is rolled out.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use warden_core::decision::parse_output;
use warden_core::policy::dir::PolicyDir;
use warden_core::policy::{Policy, DEFAULT_ENTRYPOINT};
use warden_core::wire::SessionView;

use crate::client::{self, Client};
use crate::session::{search, Selection};

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// Directory of the candidate policy (`*.rego` and `data.json`).
    #[arg(long)]
    policy: PathBuf,
    #[arg(long, default_value = DEFAULT_ENTRYPOINT)]
    entrypoint: String,
    /// Sessions exported with `warden session export` (else they are read from the service).
    #[arg(long)]
    file: Option<PathBuf>,
    /// A session to replay (repeatable); without it, the selection flags choose them.
    #[arg(long = "session")]
    sessions: Vec<String>,
    #[command(flatten)]
    select: Selection,
    /// Exit 1 when any step would be decided differently (for CI).
    #[arg(long)]
    fail_on_change: bool,
}

/// `warden replay`. The service is only asked (through `connect`) when the sessions are not
/// read from a file, so an exported file replays offline, without a token.
pub fn run(args: ReplayArgs, connect: &dyn Fn() -> Result<Client, String>, json: bool) -> Result<ExitCode, String> {
    let ReplayArgs { policy, entrypoint, file, sessions, select, fail_on_change } = args;
    // Test modules are left out, as the proxy leaves them out.
    let mut candidate = PolicyDir::load(&policy).map_err(|e| e.0)?.compile(&entrypoint).map_err(|e| e.0)?;
    let version = candidate.version.clone();
    let views: Vec<SessionView> = match file {
        Some(f) => read_export(&std::fs::read_to_string(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?)?,
        None => {
            let client = connect()?;
            let ids = if sessions.is_empty() { search(&client, &select)?.into_iter().map(|s| s.id).collect() } else { sessions };
            ids.iter().map(|id| client.get(&format!("/v1/sessions/{}", client::escape(id)))).collect::<Result<_, _>>()?
        }
    };
    let report = replay(&mut candidate, &views);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        print(&report, &version);
    }
    Ok(if fail_on_change && !report.changes.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// One step the candidate decides differently.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Change {
    pub session_id: String,
    pub step: u64,
    pub recorded: String,
    pub candidate: String,
    pub reasons: Vec<String>,
    pub path: Option<String>,
    pub tool: Option<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub sessions: usize,
    pub steps: usize,
    /// Steps recorded without their input (`policy.record_input: false`), or whose input was
    /// over its limit and kept only as its size and hash: cannot be replayed.
    pub skipped: usize,
    pub changes: Vec<Change>,
    /// Actions per step: as recorded, and as the candidate decides.
    pub recorded_totals: BTreeMap<String, usize>,
    pub candidate_totals: BTreeMap<String, usize>,
}

pub fn replay(policy: &mut Policy, sessions: &[SessionView]) -> Report {
    let mut report = Report { sessions: sessions.len(), ..Default::default() };
    for s in sessions {
        let mut entries: Vec<_> = s.timeline.iter().collect();
        entries.sort_by_key(|e| e.record.step);
        for e in entries {
            let r = &e.record;
            report.steps += 1;
            // A cut input is valid JSON, but not what the step was decided on: evaluating it
            // would report a change that never was.
            let Some(input) = r.input.as_ref().filter(|i| !i.is_cut()) else {
                report.skipped += 1;
                continue;
            };
            *report.recorded_totals.entry(r.action.clone()).or_default() += 1;
            let evaluated = input
                .to_json()
                .map_err(|e| warden_core::error::PolicyError(format!("the recorded input is not JSON: {e}")))
                .and_then(|json| policy.eval(regorus::Value::from(json)))
                .and_then(|v| parse_output(&v));
            let (action, reasons) = match evaluated {
                Ok(d) => (d.action.as_str().to_string(), d.reasons),
                Err(err) => ("error".to_string(), vec![err.0]),
            };
            *report.candidate_totals.entry(action.clone()).or_default() += 1;
            if action != r.action {
                report.changes.push(Change {
                    session_id: s.id.clone(),
                    step: r.step,
                    recorded: r.action.clone(),
                    candidate: action,
                    reasons,
                    path: r.path.clone(),
                    tool: r.tool.clone(),
                });
            }
        }
    }
    report
}

pub fn print(report: &Report, version: &str) {
    println!("replayed {} session(s), {} step(s) against candidate policy {version}", report.sessions, report.steps);
    for c in &report.changes {
        let what = c.tool.as_deref().or(c.path.as_deref()).unwrap_or("-");
        println!("CHANGED  {} step {:>3}  {:<9} -> {:<9} {:<28} {}", c.session_id, c.step, c.recorded, c.candidate, what, c.reasons.join(","));
    }
    println!();
    println!("{:<12} {:>9} {:>10}", "action", "recorded", "candidate");
    let mut actions: Vec<&String> = report.recorded_totals.keys().chain(report.candidate_totals.keys()).collect();
    actions.sort();
    actions.dedup();
    for a in actions {
        println!(
            "{:<12} {:>9} {:>10}",
            a,
            report.recorded_totals.get(a).copied().unwrap_or(0),
            report.candidate_totals.get(a).copied().unwrap_or(0)
        );
    }
    println!();
    println!("{} step(s) changed, {} skipped (no recorded input, or input over its limit)", report.changes.len(), report.skipped);
}

/// Sessions from JSON Lines written by `warden session export`.
pub fn read_export(text: &str) -> Result<Vec<SessionView>, String> {
    Ok(crate::evidence::read(text)?.into_iter().map(|(v, _)| v).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_core::policy::PolicySource;
    use warden_core::session::SessionState;
    use warden_core::wire::{StepRecord, TrailEntry};

    fn view(steps: &[(&str, &str)]) -> SessionView {
        let timeline = steps
            .iter()
            .enumerate()
            .map(|(i, (path, action))| {
                let record = StepRecord {
                    session_id: "s1".into(),
                    step: i as u64 + 1,
                    action: action.to_string(),
                    path: Some(path.to_string()),
                    input: warden_core::wire::RecordedInput::new(&serde_json::json!({"request": {"path": path}})),
                    ..Default::default()
                };
                TrailEntry { seq: i as u64 + 1, record, body: String::new(), prev_hash: String::new(), hash: String::new(), hash_version: 2 }
            })
            .collect();
        SessionView { id: "s1".into(), state: SessionState::default(), revoked_at_ms: None, revoke_reason: None, head: None, timeline, audit: vec![] }
    }

    #[test]
    fn replay_reports_exactly_the_steps_that_change() {
        let rego = "package p\nimport rego.v1\ndefault d := {\"action\": \"allow\"}\nd := {\"action\": \"deny\", \"reasons\": [\"no_reports\"]} if startswith(input.request.path, \"/reports\")";
        let mut p = Policy::compile(&PolicySource { modules: vec![("p.rego", rego)], data: None, entrypoint: "data.p.d", max_instructions: 10_000 }).unwrap();
        let mut v = view(&[("/tickets", "allow"), ("/reports/1", "allow"), ("/admin", "deny")]);
        v.timeline[2].record.input = None;
        let r = replay(&mut p, &[v]);
        assert_eq!((r.steps, r.skipped), (3, 1));
        assert_eq!(r.changes.len(), 1);
        assert_eq!((r.changes[0].step, r.changes[0].recorded.as_str(), r.changes[0].candidate.as_str()), (2, "allow", "deny"));
        assert_eq!(r.candidate_totals.get("deny"), Some(&1));
        assert_eq!(r.recorded_totals.get("allow"), Some(&2));
    }

    #[test]
    fn a_step_whose_input_was_cut_is_skipped_not_reported_as_changed() {
        let rego = "package p\nimport rego.v1\ndefault d := {\"action\": \"deny\"}\nd := {\"action\": \"allow\"} if input.request.path";
        let mut p = Policy::compile(&PolicySource { modules: vec![("p.rego", rego)], data: None, entrypoint: "data.p.d", max_instructions: 10_000 }).unwrap();
        let mut v = view(&[("/tickets", "allow"), ("/big", "allow")]);
        let big = "x".repeat(warden_core::wire::limits::MAX_INPUT_BYTES);
        let mut cut = warden_core::wire::RecordedInput::new(&serde_json::json!({"request": {"path": big}})).unwrap();
        assert!(cut.bound() && cut.is_cut());
        v.timeline[1].record.input = Some(cut);
        let r = replay(&mut p, &[v]);
        assert_eq!((r.steps, r.skipped, r.changes.len()), (2, 1, 0));
    }

    #[test]
    fn exports_are_read_line_by_line_with_errors_naming_the_line() {
        let line = serde_json::to_string(&view(&[("/x", "allow")])).unwrap();
        assert_eq!(read_export(&format!("{line}\n\n{line}\n")).unwrap().len(), 2);
        assert!(read_export(&format!("{line}\nnot json\n")).unwrap_err().starts_with("line 2:"));
    }
}
