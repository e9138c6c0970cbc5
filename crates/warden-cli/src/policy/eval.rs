//! `warden policy eval`: one input through the policy, as the proxy evaluates it.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use regorus::Value;
use serde_json::Value as Json;
use warden_core::decision::parse_output;
use warden_core::error::LoadError;
use warden_core::policy::dir::{merge, parse_json, read_json, source, Module, PolicyDir};
use warden_core::policy::{Policy, DEFAULT_ENTRYPOINT};

use super::load::{describe_policy_error, to_json};

#[derive(Args)]
pub struct EvalArgs {
    /// The policy directory: *.rego (not *_test.rego) and data.json.
    #[arg(long, default_value = "policies")]
    pub dir: PathBuf,
    /// The input document (JSON); `-` or omitted: read it from stdin.
    #[arg(long, short, value_name = "FILE|-")]
    pub input: Option<PathBuf>,
    /// More data (JSON), deep-merged over the directory's data.json.
    #[arg(long, short, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// The rule whose value is the decision.
    #[arg(long, default_value = DEFAULT_ENTRYPOINT)]
    pub entrypoint: String,
    /// Also print the signals of the decision and the value of each rule that fed it (deny,
    /// step_up, throttle, terminate, base of data.warden.session, the signals of the limits,
    /// drift, credentials and tools modules, the risk score), each evaluated as its own
    /// entrypoint on the proxy's engine set-up; rules a custom policy lacks are skipped.
    #[arg(long)]
    pub explain: bool,
}

/// The rules `--explain` shows, when the policy defines them.
const EXPLAINED: &[&str] = &[
    "data.warden.session.deny",
    "data.warden.session.step_up",
    "data.warden.session.throttle",
    "data.warden.session.terminate",
    "data.warden.session.base",
    "data.warden.limits.signals",
    "data.warden.drift.signals",
    "data.warden.credentials.signals",
    "data.warden.tools.signals",
    "data.warden.risk.score",
];

fn read_input(path: Option<&PathBuf>) -> Result<Json, LoadError> {
    match path {
        Some(p) if p.as_os_str() != "-" => read_json(p),
        _ => {
            let stdin = std::io::stdin();
            if path.is_none() && stdin.is_terminal() {
                return Err(LoadError("no input: pass --input FILE, or pipe the input JSON on stdin (--input -)".into()));
            }
            let mut text = String::new();
            stdin.lock().read_to_string(&mut text).map_err(|e| LoadError(format!("stdin: {e}")))?;
            parse_json("stdin", &text)
        }
    }
}

pub fn run(args: EvalArgs) -> Result<ExitCode, LoadError> {
    let dir = PolicyDir::load(&args.dir)?;
    let mut data = dir.data.clone();
    if let Some(path) = &args.data {
        let extra = read_json(path)?;
        let mut merged = data.unwrap_or_else(|| Json::Object(Default::default()));
        merge(&mut merged, &extra);
        data = Some(merged);
    }
    let input = read_input(args.input.as_ref())?;
    let mut policy = dir.compile_with_data(data.as_ref(), &args.entrypoint).map_err(|e| LoadError(describe_policy_error(&e)))?;

    let mut code = ExitCode::SUCCESS;
    match policy.eval(Value::from(input.clone())) {
        Ok(out) => {
            match to_json(&out).and_then(|j| serde_json::to_string_pretty(&j).map_err(|e| e.to_string())) {
                Ok(text) => println!("{text}"),
                Err(e) => println!("{out:?} ({e})"),
            }
            if let Err(e) = parse_output(&out) {
                eprintln!("warden: {e}");
                code = ExitCode::from(1);
            }
            if args.explain {
                explain(&out, &dir.modules, data.as_ref(), input);
            }
        }
        Err(e) => {
            eprintln!("warden: {e}");
            code = ExitCode::from(1);
            if args.explain {
                explain(&Value::Undefined, &dir.modules, data.as_ref(), input);
            }
        }
    }
    Ok(code)
}

fn compact(v: &Value) -> String {
    to_json(v).map(|j| j.to_string()).unwrap_or_else(|_| format!("{v:?}"))
}

fn explain(decision: &Value, modules: &[Module], data: Option<&Json>, input: Json) {
    println!();
    println!("explain:");
    if let Ok(Json::Array(signals)) = to_json(&decision["signals"]) {
        let names: Vec<String> = signals.iter().map(|s| s.as_str().map(str::to_string).unwrap_or_else(|| s.to_string())).collect();
        println!("  signals: {}", if names.is_empty() { "(none)".to_string() } else { names.join(", ") });
    }
    // Each rule is compiled as its own entrypoint, like the decision: RVM semantics, the
    // interpreter only when the RVM cannot compile it. (regorus's interpreter raises an error on
    // arithmetic with null where the RVM, like OPA, is undefined.) Rules a custom policy does not
    // define, or that are undefined for this input, are skipped.
    let mut shown = 0;
    for rule in EXPLAINED {
        let Ok(mut policy) = Policy::compile(&source(modules, data, rule)) else {
            continue;
        };
        if let Ok(v) = policy.eval(Value::from(input.clone())) {
            println!("  {rule} = {}", compact(&v));
            shown += 1;
        }
    }
    if shown == 0 {
        println!("  (this policy defines none of the rules of the shipped library that --explain shows)");
    }
}
