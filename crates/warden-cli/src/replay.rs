//! `warden replay`: re-decide recorded sessions with a candidate policy, step by step, from the
//! exact input each step was decided on (session state as it was at that step included), and
//! say what would change before the candidate is rolled out. With `--config`, re-decide each step
//! with the very policy the proxy decided it with (the plugin configurations it ran, matched by
//! policy version): any change is a step the proxy decided otherwise than its recorded input
//! decides natively, which `make test` requires to be none.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use warden_core::decision::parse_output;
use warden_core::policy::dir::PolicyDir;
use warden_core::policy::{Policy, DEFAULT_ENTRYPOINT};
use warden_core::wire::{SessionView, StepRecord};
use warden_core::Warden;

use crate::client::{self, Client};
use crate::session::{search, Selection};

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// Directory of the candidate policy (`*.rego` and `data.json`).
    #[arg(long, required_unless_present = "configs", conflicts_with = "configs")]
    policy: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_ENTRYPOINT)]
    entrypoint: String,
    /// A plugin configuration the proxies ran, as given to Envoy (JSON; repeatable; a directory
    /// stands for its `*.json`): each step is re-decided by the policy, or candidate, of these
    /// that has the version it was recorded with; steps of other versions are counted unmatched.
    #[arg(long = "config")]
    configs: Vec<PathBuf>,
    /// Sessions exported with `warden session export` (repeatable; a directory stands for its
    /// `*.jsonl`); else they are read from the service.
    #[arg(long = "file")]
    files: Vec<PathBuf>,
    /// A session to replay (repeatable); without it, the selection flags choose them.
    #[arg(long = "session")]
    sessions: Vec<String>,
    #[command(flatten)]
    select: Selection,
    /// Exit 1 when any step would be decided differently (for CI).
    #[arg(long)]
    fail_on_change: bool,
}

/// What re-decides the steps: one candidate for every step, or the proxies' own policies by
/// version.
pub enum Deciders {
    Candidate(Box<Policy>),
    ByVersion(BTreeMap<String, Policy>),
}

impl Deciders {
    fn version(&self) -> String {
        match self {
            Self::Candidate(p) => p.version.clone(),
            Self::ByVersion(m) => format!("{} version(s) of the proxies' configurations", m.len()),
        }
    }
}

/// A path, or the files in it that end with `ext`, sorted.
fn expand(paths: &[PathBuf], ext: &str) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == ext))
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The policies (and candidates) of plugin configurations, compiled by the proxy's own
/// `Warden::from_json`, by version. A configuration the proxy refuses decided no step: it is
/// named on stderr and left out.
fn proxies_policies(configs: &[PathBuf]) -> Result<BTreeMap<String, Policy>, String> {
    let mut out = BTreeMap::new();
    for c in expand(configs, "json")? {
        let bytes = std::fs::read(&c).map_err(|e| format!("cannot read {}: {e}", c.display()))?;
        let warden = match Warden::from_json(&bytes) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("warden replay: {} is left out: the proxy refuses it ({}: {})", c.display(), e.field, e.message.trim());
                continue;
            }
        };
        let (policy, candidate) = warden.into_policies();
        for p in std::iter::once(policy).chain(candidate) {
            out.entry(p.version.clone()).or_insert(p);
        }
    }
    if out.is_empty() {
        return Err("--config named no plugin configuration".into());
    }
    Ok(out)
}

fn read_files(files: &[PathBuf]) -> Result<Vec<SessionView>, String> {
    let mut views = Vec::new();
    for f in expand(files, "jsonl")? {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        views.extend(read_export(&text).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    Ok(views)
}

/// `warden replay`. The service is only asked (through `connect`) when the sessions are not
/// read from a file, so an exported file replays offline, without a token.
pub fn run(args: ReplayArgs, connect: &dyn Fn() -> Result<Client, String>, json: bool) -> Result<ExitCode, String> {
    let ReplayArgs { policy, entrypoint, configs, files, sessions, select, fail_on_change } = args;
    let mut deciders = match policy {
        // Test modules are left out, as the proxy leaves them out.
        Some(dir) => Deciders::Candidate(Box::new(PolicyDir::load(&dir).map_err(|e| e.0)?.compile(&entrypoint).map_err(|e| e.0)?)),
        None => Deciders::ByVersion(proxies_policies(&configs)?),
    };
    let views: Vec<SessionView> = if files.is_empty() {
        let client = connect()?;
        let ids = if sessions.is_empty() { search(&client, &select)?.into_iter().map(|s| s.id).collect() } else { sessions };
        ids.iter().map(|id| client.get(&format!("/v1/sessions/{}", client::escape(id)))).collect::<Result<_, _>>()?
    } else {
        read_files(&files)?
    };
    let report = replay(&mut deciders, &views);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        print(&report, &deciders.version());
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
    /// `candidate` when the step's recorded candidate outcome is the one that changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub of: Option<&'static str>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub sessions: usize,
    pub steps: usize,
    /// Steps recorded without their input (`policy.record_input: false`), or whose input was
    /// over its limit and kept only as its size and hash: cannot be replayed.
    pub skipped: usize,
    /// With `--config`: steps recorded under a policy version none of the configurations has.
    pub unmatched: usize,
    /// With `--config`: the candidate outcomes recorded beside steps, re-decided too.
    pub candidate_outcomes: usize,
    pub changes: Vec<Change>,
    /// Actions per step: as recorded, and as the candidate decides.
    pub recorded_totals: BTreeMap<String, usize>,
    pub candidate_totals: BTreeMap<String, usize>,
}

/// The action a recorded decision stands for: a policy that failed to evaluate is `error`,
/// whatever `policy.on_error` made of it.
fn recorded_action(r: &StepRecord) -> String {
    if r.reasons.iter().any(|x| x == "policy_error" || x == "policy_error_allowed") {
        "error".into()
    } else {
        r.action.clone()
    }
}

fn decide(policy: &mut Policy, input: serde_json::Value) -> (String, Vec<String>) {
    match policy.eval(regorus::Value::from(input)).and_then(|v| parse_output(&v)) {
        Ok(d) => (d.action.as_str().to_string(), d.reasons),
        Err(err) => ("error".to_string(), vec![err.0]),
    }
}

pub fn replay(deciders: &mut Deciders, sessions: &[SessionView]) -> Report {
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
            let input = match input.to_json() {
                Ok(j) => j,
                Err(_) => {
                    report.skipped += 1;
                    continue;
                }
            };
            let policy = match deciders {
                Deciders::Candidate(p) => Some(&mut **p),
                Deciders::ByVersion(m) => m.get_mut(&r.policy_version),
            };
            let Some(policy) = policy else {
                report.unmatched += 1;
                continue;
            };
            *report.recorded_totals.entry(r.action.clone()).or_default() += 1;
            let (action, reasons) = decide(policy, input.clone());
            *report.candidate_totals.entry(action.clone()).or_default() += 1;
            let change = |recorded: String, candidate: String, reasons: Vec<String>, of| Change {
                session_id: s.id.clone(),
                step: r.step,
                recorded,
                candidate,
                reasons,
                path: r.path.clone(),
                tool: r.tool.clone(),
                of,
            };
            if action != recorded_action(r) {
                report.changes.push(change(r.action.clone(), action, reasons, None));
            }
            // The proxies' candidate, when it is one of the configurations': what it recorded
            // beside the step must be what it decides again.
            if let (Deciders::ByVersion(m), Some(c)) = (&mut *deciders, r.candidate.as_ref()) {
                if let Some(p) = m.get_mut(&c.policy_version) {
                    report.candidate_outcomes += 1;
                    let recorded = if c.error.is_some() { "error".to_string() } else { c.action.clone() };
                    let (again, reasons) = decide(p, input);
                    if again != recorded {
                        report.changes.push(change(recorded, again, reasons, Some("candidate")));
                    }
                }
            }
        }
    }
    report
}

pub fn print(report: &Report, version: &str) {
    println!("replayed {} session(s), {} step(s) against candidate policy {version}", report.sessions, report.steps);
    for c in &report.changes {
        let what = c.tool.as_deref().or(c.path.as_deref()).unwrap_or("-");
        let of = if c.of.is_some() { " (candidate)" } else { "" };
        println!("CHANGED  {} step {:>3}{of}  {:<9} -> {:<9} {:<28} {}", c.session_id, c.step, c.recorded, c.candidate, what, c.reasons.join(","));
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
    if report.unmatched > 0 || report.candidate_outcomes > 0 {
        println!(
            "{} step(s) recorded under a policy version no --config has; {} recorded candidate outcome(s) re-decided",
            report.unmatched, report.candidate_outcomes
        );
    }
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
        let p = Policy::compile(&PolicySource { modules: vec![("p.rego", rego)], data: None, entrypoint: "data.p.d", max_instructions: 10_000 }).unwrap();
        let mut v = view(&[("/tickets", "allow"), ("/reports/1", "allow"), ("/admin", "deny")]);
        v.timeline[2].record.input = None;
        let r = replay(&mut Deciders::Candidate(Box::new(p)), &[v]);
        assert_eq!((r.steps, r.skipped), (3, 1));
        assert_eq!(r.changes.len(), 1);
        assert_eq!((r.changes[0].step, r.changes[0].recorded.as_str(), r.changes[0].candidate.as_str()), (2, "allow", "deny"));
        assert_eq!(r.candidate_totals.get("deny"), Some(&1));
        assert_eq!(r.recorded_totals.get("allow"), Some(&2));
    }

    #[test]
    fn a_step_whose_input_was_cut_is_skipped_not_reported_as_changed() {
        let rego = "package p\nimport rego.v1\ndefault d := {\"action\": \"deny\"}\nd := {\"action\": \"allow\"} if input.request.path";
        let p = Policy::compile(&PolicySource { modules: vec![("p.rego", rego)], data: None, entrypoint: "data.p.d", max_instructions: 10_000 }).unwrap();
        let mut v = view(&[("/tickets", "allow"), ("/big", "allow")]);
        let big = "x".repeat(warden_core::wire::limits::MAX_INPUT_BYTES);
        let mut cut = warden_core::wire::RecordedInput::new(&serde_json::json!({"request": {"path": big}})).unwrap();
        assert!(cut.bound() && cut.is_cut());
        v.timeline[1].record.input = Some(cut);
        let r = replay(&mut Deciders::Candidate(Box::new(p)), &[v]);
        assert_eq!((r.steps, r.skipped, r.changes.len()), (2, 1, 0));
    }

    #[test]
    fn by_version_each_step_meets_the_policy_it_was_recorded_with() {
        let dir = std::env::temp_dir().join(format!("warden-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = |rego: &str| serde_json::json!({"policy": {"modules": {"p.rego": rego}, "entrypoint": "data.p.d"}});
        let deny_reports = "package p\nimport rego.v1\ndefault d := {\"action\": \"allow\"}\nd := {\"action\": \"deny\", \"reasons\": [\"no_reports\"]} if startswith(input.request.path, \"/reports\")";
        let broken = "package p\nimport rego.v1\nd := {\"action\": \"allow\"} if 1 / input.zero";
        std::fs::write(dir.join("a.json"), config(deny_reports).to_string()).unwrap();
        std::fs::write(dir.join("b.json"), config(broken).to_string()).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a configuration").unwrap();
        // A configuration the proxy refuses (as a test of a broken policy starts one) decided nothing.
        std::fs::write(dir.join("c.json"), config("package p\nthis is not rego {").to_string()).unwrap();
        let policies = proxies_policies(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(policies.len(), 2);
        let version_of = |rego: &str| {
            let (p, _) = Warden::from_json(config(rego).to_string().as_bytes()).unwrap().into_policies();
            p.version
        };
        let (a, b) = (version_of(deny_reports), version_of(broken));
        let mut v = view(&[("/tickets", "allow"), ("/reports/1", "allow"), ("/x", "deny"), ("/y", "allow"), ("/z", "allow")]);
        for (i, version) in [&a, &a, &b, &b].iter().enumerate() {
            v.timeline[i].record.policy_version = version.to_string();
        }
        // Step 3 was a policy error the proxy denied under `on_error: deny`: an error again is no
        // change. Step 4 claims the broken policy allowed: a change. Step 5: an unknown version.
        v.timeline[2].record.reasons = vec!["policy_error".into()];
        v.timeline[4].record.policy_version = "unknown".into();
        let r = replay(&mut Deciders::ByVersion(policies), &[v]);
        assert_eq!((r.steps, r.unmatched, r.skipped), (5, 1, 0));
        let changed: Vec<(u64, &str, &str)> = r.changes.iter().map(|c| (c.step, c.recorded.as_str(), c.candidate.as_str())).collect();
        assert_eq!(changed, vec![(2, "allow", "deny"), (4, "allow", "error")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exports_are_read_line_by_line_with_errors_naming_the_line() {
        let line = serde_json::to_string(&view(&[("/x", "allow")])).unwrap();
        assert_eq!(read_export(&format!("{line}\n\n{line}\n")).unwrap().len(), 2);
        assert!(read_export(&format!("{line}\nnot json\n")).unwrap_err().starts_with("line 2:"));
    }
}
