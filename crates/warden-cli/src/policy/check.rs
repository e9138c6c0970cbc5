//! `warden policy check`: does the policy load, on which engine, and does every sample input give
//! a decision of the right shape; optionally, is a plugin configuration valid.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use regorus::Value;
use serde_json::Value as Json;
use warden_core::decision::parse_output;
use warden_core::error::LoadError;
use warden_core::policy::dir::{source, PolicyDir};
use warden_core::policy::{engine_for, DEFAULT_ENTRYPOINT};

use super::load::{cases, describe_error, describe_policy_error};

#[derive(Args)]
pub struct CheckArgs {
    /// The policy directory: *.rego, *_test.rego (parsed only), data.json, cases/*.yaml.
    #[arg(default_value = "policies")]
    pub dir: PathBuf,
    /// Also parse and fully validate a plugin configuration (JSON) exactly as the proxy does.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The rule whose value is the decision.
    #[arg(long, default_value = DEFAULT_ENTRYPOINT)]
    pub entrypoint: String,
}

/// A minimal input of the shape of policies/input.schema.json, for a directory without cases.
fn builtin_sample() -> Json {
    serde_json::json!({
        "now": 1_800_000_100,
        "now_ms": 1_800_000_100_000_u64,
        "mode": "enforce",
        "request": {"method": "GET", "path": "/", "raw_path": "/", "authority": "api.test", "scheme": "https", "headers": {},
                    "source": {"address": "10.0.0.1:40000", "principal": null}, "mcp": null},
        "identity": {"kind": "jwt", "subject": "agent-1", "issuer": "https://issuer.test", "provider": "test",
                     "scopes": [], "claims": {}, "delegation": [], "workload": null},
        "credential": {"kind": "jwt", "fingerprint": "sha256:00112233445566778899aabbccddeeff", "kid": null, "jti": null,
                       "iat": 1_800_000_000, "exp": 1_800_003_600},
        "context": {"region": null, "device": null, "user_agent": null},
        "session": {"id": "ses_sample", "source": "minted", "new": true, "started_at": 1_800_000_100,
                    "last_seen_at": 1_800_000_100, "steps": 0, "step": 1, "subjects": [], "credentials": [],
                    "workloads": [], "regions": [], "devices": [], "tools": [], "risk": 0, "flags": [],
                    "revoked": false, "last_step_up": null, "unavailable": false}
    })
}

pub fn run(args: CheckArgs) -> Result<ExitCode, LoadError> {
    let dir = PolicyDir::load(&args.dir)?;
    // Test modules are not loaded by the proxy, but a broken one breaks `policy test`.
    if !dir.test_modules.is_empty() {
        engine_for(&source(&dir.all_modules(), dir.data.as_ref(), &args.entrypoint)).map_err(|e| LoadError(describe_policy_error(&e)))?;
    }
    let policy = dir.compile(&args.entrypoint).map_err(|e| LoadError(describe_policy_error(&e)))?;
    println!(
        "policy {}: {} module(s), {} test module(s), {}, entrypoint {}, version {}",
        dir.dir.display(),
        dir.modules.len(),
        dir.test_modules.len(),
        if dir.data.is_some() { "data.json" } else { "no data.json" },
        args.entrypoint,
        policy.version
    );
    match &policy.fallback_reason {
        None => println!("engine: RVM (compiled once, as the proxy runs it)"),
        Some(why) => println!("engine: interpreter: the RVM cannot compile this policy: {}", why.trim()),
    }

    let cases = cases(&dir)?;
    let samples: Vec<(String, Json, Option<Json>)> = if cases.is_empty() {
        vec![("built-in sample input".to_string(), builtin_sample(), None)]
    } else {
        cases.into_iter().map(|c| (c.name, c.input, c.data)).collect()
    };
    let mut bad = 0;
    for (name, input, data) in &samples {
        let data = data.as_ref().or(dir.data.as_ref());
        let result = dir
            .compile_with_data(data, &args.entrypoint)
            .map_err(|e| describe_policy_error(&e))
            .and_then(|mut p| p.eval(Value::from(input.clone())).map_err(|e| e.to_string()))
            .and_then(|out| parse_output(&out).map_err(|e| e.to_string()));
        if let Err(e) = result {
            bad += 1;
            println!("BAD   {name}: {e}");
        }
    }
    let mut code = ExitCode::SUCCESS;
    if bad == 0 {
        println!("outputs: {} sample input(s), every output is a valid decision", samples.len());
    } else {
        println!("outputs: {bad} of {} sample input(s) give an output that is not a valid decision", samples.len());
        code = ExitCode::from(1);
    }

    if let Some(path) = &args.config {
        let bytes = std::fs::read(path).map_err(|e| LoadError(format!("{}: {e}", path.display())))?;
        match warden_core::Warden::from_json(&bytes) {
            Ok(w) => println!(
                "config {}: valid (policy version {}, {})",
                path.display(),
                w.policy_version(),
                match w.policy_fallback() {
                    None => "RVM".to_string(),
                    Some(why) => format!("interpreter: {}", why.trim()),
                }
            ),
            Err(e) => {
                println!("config {}: invalid", path.display());
                // `field.path: message`, the way the proxy logs it.
                println!("{}: {}", e.field, describe_error(&e.message));
                code = ExitCode::from(2);
            }
        }
    }
    Ok(code)
}
