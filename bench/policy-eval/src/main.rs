//! Times Session Warden's policy evaluation natively, with the very engine set-up the proxy uses
//! (`warden_core::policy::Policy` on regorus's RVM), on the policy library in `policies/`.
//!
//!   policy-eval [--iterations N] [--request FILE]
//!
//! Prints one JSON object on stdout:
//! - `policy_eval_ns`: median over batches of one `Policy::eval` of a representative input: the
//!   first case of `policies/cases/session.yaml` that must be allowed ("an ordinary step"),
//!   built as `warden policy test` builds it;
//! - with `--request FILE` (`{"config": <plugin config>, "headers": {name: value}}`, written by
//!   bench/run.py): `on_request_ns`, one whole `Warden::on_request` (strip, identify with the
//!   verified-token cache hit, local session step, input, policy, decision, correlation) for that
//!   request, with `FakeHost` (warden-core's test host) as the host; in sync or cached mode
//!   (the configuration's `state.mode`) a begin-step call is answered with a canned answer
//!   parsed from bytes, as the filter parses the service's, and each request ends as the filter
//!   ends it (`after_response`, the record serialized for its batch).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use regorus::Value;
use serde_json::json;
use warden_core::decision::parse_output;
use warden_core::host::{FakeHost, Headers};
use warden_core::policy::dir::{merge, read_text, PolicyDir};
use warden_core::policy::DEFAULT_ENTRYPOINT;
use warden_core::session::SessionState;
use warden_core::wire::{BeginOutcome, BeginResponse, BeginStep};
use warden_core::{Body, Step, Warden};

const BATCHES: usize = 21;

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn fail(msg: String) -> ! {
    eprintln!("policy-eval: {msg}");
    std::process::exit(1)
}

fn read(p: &Path) -> String {
    read_text(p).unwrap_or_else(|e| fail(e.0))
}

/// Median and minimum nanoseconds per call of `f`, over `BATCHES` batches after a warm-up batch.
fn time<F: FnMut()>(iterations: usize, mut f: F) -> (f64, f64) {
    let per_batch = (iterations / BATCHES).max(1);
    for _ in 0..per_batch {
        f();
    }
    let mut samples: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            t.elapsed().as_nanos() as f64 / per_batch as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    (samples[BATCHES / 2], samples[0])
}

fn file_name(path: &str) -> String {
    Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn main() {
    let mut iterations = 200_000usize;
    let mut request: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => {
                iterations = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| fail("--iterations N".into()))
            }
            "--request" => request = args.next().map(PathBuf::from),
            other => fail(format!("unknown argument {other}")),
        }
    }

    // The policy library, loaded by the loader `warden policy` and `warden replay` use.
    let dir = PolicyDir::load(&policies_dir()).unwrap_or_else(|e| fail(e.0));
    let mut data =
        dir.data.clone().unwrap_or_else(|| fail(format!("{}: no data.json", dir.dir.join("data.json").display())));
    // The representative input: the first case of policies/cases/session.yaml that the library
    // must allow ("an ordinary step"), merged over the file's defaults, exactly as
    // `warden policy test` builds it (its `data`, if any, merged over data.json).
    let cases_path = dir.dir.join("cases").join("session.yaml");
    let cases: serde_json::Value =
        yaml_serde::from_str(&read(&cases_path)).unwrap_or_else(|e| fail(format!("{}: {e}", cases_path.display())));
    let case = cases["cases"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["want"]["action"] == "allow"))
        .unwrap_or_else(|| fail(format!("{}: no case that wants `allow`", cases_path.display())));
    let mut input_json = cases.pointer("/defaults/input").cloned().unwrap_or_else(|| json!({}));
    merge(&mut input_json, &case["input"]);
    if let Some(d) = case.get("data") {
        merge(&mut data, d);
    }
    let case_note = case["note"].as_str().unwrap_or("").to_string();
    let mut policy =
        dir.compile_with_data(Some(&data), DEFAULT_ENTRYPOINT).unwrap_or_else(|e| fail(format!("compile: {e}")));
    let input = Value::from(input_json);
    let first = policy.eval(input.clone()).unwrap_or_else(|e| fail(format!("eval: {e}")));
    let decision = parse_output(&first).unwrap_or_else(|e| fail(format!("decision: {e}")));
    if decision.action.as_str() != "allow" {
        fail(format!("case `{case_note}` should be allowed, got {} {:?}", decision.action.as_str(), decision.reasons));
    }
    let (eval_ns, eval_min) = time(iterations, || {
        black_box(policy.eval(black_box(input.clone())).ok());
    });
    let mut out = json!({
        "policy_eval_ns": eval_ns.round(),
        "policy_eval_min_ns": eval_min.round(),
        "iterations": iterations,
        "uses_rvm": policy.uses_rvm(),
        "decision": decision.action.as_str(),
        "case": case_note,
        // File names, not the loader's paths: the report stays the same wherever the bench runs.
        "modules": dir.modules.iter().map(|(p, _)| file_name(p)).collect::<Vec<_>>(),
    });

    // The whole per-request path, for the bench's own request and plugin configuration.
    if let Some(path) = request {
        let doc: serde_json::Value =
            serde_json::from_str(&read(&path)).unwrap_or_else(|e| fail(format!("{}: {e}", path.display())));
        let config = doc["config"].to_string();
        let mut warden = Warden::from_json(config.as_bytes()).unwrap_or_else(|e| fail(format!("config: {e}")));
        let pairs = doc["headers"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().as_bytes().to_vec())).collect::<Vec<_>>())
            .unwrap_or_default();
        let headers = Headers::from_pairs(pairs);
        let mut host = FakeHost::at(now_ms()).with_property("source.address", "127.0.0.1:40000");
        // The step the service counted last: what a canned begin-step answer says next.
        let mut steps = 0u64;
        let mut request = |warden: &mut Warden, host: &mut FakeHost| -> Result<(), String> {
            let outcome = match warden.on_request(black_box(headers.clone()), Body::Absent, host) {
                Step::Done(o) => o,
                // Sync mode, or cached mode's first step: the state service's answer, as bytes
                // parsed as the filter parses them, for the session the call names.
                Step::Call { pending, call } => {
                    let req: BeginStep = serde_json::from_slice(&call.body).map_err(|e| e.to_string())?;
                    steps += 1;
                    let mut session = SessionState::open(&req.subject, &req.scopes, host.now_ms);
                    session.steps = steps - 1;
                    let answer = BeginResponse { outcome: BeginOutcome::Ok, step: steps, new: steps == 1, session };
                    let bytes = serde_json::to_vec(&answer).map_err(|e| e.to_string())?;
                    let answer: BeginResponse = serde_json::from_slice(black_box(&bytes)).map_err(|e| e.to_string())?;
                    warden.resume(pending, Ok(answer), host)
                }
            };
            if let Some(r) = outcome.reply {
                return Err(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)));
            }
            // What the filter does once the response went out: the session's data volume, and the
            // record serialized for its batch.
            if let Some(record) = outcome.record {
                warden.after_response(&record.session_id, 1234, host);
                black_box(serde_json::to_vec(&record).map_err(|e| e.to_string())?);
            }
            Ok(())
        };
        match request(&mut warden, &mut host) {
            Err(why) => out["on_request_error"] = json!(format!("the bench request is refused natively: {why}")),
            Ok(()) => {
                // `Headers` is taken by value: the clone (a small map) stands for the proxy reading
                // the request's headers from Envoy, which it does on every request too.
                let (req_ns, req_min) = time(iterations / 4, || {
                    black_box(request(&mut warden, &mut host).ok());
                });
                out["on_request_ns"] = json!(req_ns.round());
                out["on_request_min_ns"] = json!(req_min.round());
                out["mode"] = json!(doc["config"].pointer("/state/mode").and_then(|m| m.as_str()).unwrap_or("local"));
            }
        }
    }
    println!("{out}");
}
