//! `warden policy test`: YAML cases and Rego `test_*` rules, reported like `opa test`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use regex_lite::Regex;
use regorus::unstable::{Rule, RuleHead};
use regorus::{Engine, Value};
use serde_json::Value as Json;
use warden_core::decision::parse_output;
use warden_core::error::LoadError;
use warden_core::policy::dir::{is_test_module, source, PolicyDir};
use warden_core::policy::DEFAULT_ENTRYPOINT;

use super::coverage::Coverage;
use super::load::{cases, describe_error, describe_policy_error, interpreter, to_json, Case};

#[derive(Args)]
pub struct TestArgs {
    /// The policy directory: *.rego, *_test.rego, data.json, cases/*.yaml.
    #[arg(default_value = "policies")]
    pub dir: PathBuf,
    /// The rule whose value is the decision.
    #[arg(long, default_value = DEFAULT_ENTRYPOINT)]
    pub entrypoint: String,
    /// Print every test with PASS/FAIL/ERROR and its time, not only the failures.
    #[arg(short, long)]
    pub verbose: bool,
    /// Only run the tests whose name matches REGEX: cases are named `<file>: <note>`,
    /// Rego tests `data.<package>.test_<name>`.
    #[arg(long, value_name = "REGEX")]
    pub run: Option<String>,
    /// Report the policy lines (of non-test modules) that no case or Rego test exercised.
    /// Coverage needs regorus's interpreter, not the RVM the proxy uses: with --coverage every
    /// case is also evaluated on the interpreter (`eval_rule(entrypoint)` on the proxy's engine
    /// set-up) to record its lines. Verdicts stay the RVM's; cases the interpreter decides
    /// differently are listed (their coverage may be partial).
    #[arg(long)]
    pub coverage: bool,
}

enum Outcome {
    Pass,
    Fail(String),
    Error(String),
}

struct Ran {
    name: String,
    outcome: Outcome,
    took: Duration,
}

pub fn run(args: TestArgs) -> Result<ExitCode, LoadError> {
    let filter = match &args.run {
        Some(r) => Some(Regex::new(r).map_err(|e| LoadError(format!("--run: invalid regular expression: {e}")))?),
        None => None,
    };
    let selected = |name: &str| filter.as_ref().is_none_or(|f| f.is_match(name));

    let dir = PolicyDir::load(&args.dir)?;
    // The policy must load exactly as the proxy loads it; a broken one is a load error (exit 2).
    dir.compile(&args.entrypoint).map_err(|e| LoadError(describe_policy_error(&e)))?;
    let cases = cases(&dir)?;

    // The Rego tests run on one interpreter engine holding every module, test modules included.
    let all = dir.all_modules();
    let mut test_engine = interpreter(&source(&all, dir.data.as_ref(), &args.entrypoint)).map_err(|e| LoadError(describe_policy_error(&e)))?;
    let rego_tests = discover_tests(&mut test_engine)?;

    let mut coverage = Coverage::default();
    let mut diverged = Vec::new();
    let mut results = Vec::new();
    for case in cases.iter().filter(|c| selected(&c.name)) {
        let start = Instant::now();
        let out = eval_case(&dir, case, &args.entrypoint);
        if args.coverage {
            // The verdict is the proxy's (above); the interpreter re-runs the case for coverage.
            let interp = eval_case_covered(&dir, case, &args.entrypoint, &mut coverage);
            if let Some(why) = divergence(&out, &interp) {
                diverged.push(format!("{}: {why}", case.name));
            }
        }
        let ran = finish_case(case, out, start);
        report(&ran, args.verbose);
        results.push(ran);
    }
    if args.coverage {
        test_engine.set_enable_coverage(true);
    }
    for name in rego_tests.iter().filter(|n| selected(n)) {
        let ran = run_rego_test(&mut test_engine, name);
        report(&ran, args.verbose);
        results.push(ran);
    }
    if args.coverage {
        coverage.add(test_engine.get_coverage_report().map_err(|e| LoadError(format!("coverage: {e}")))?);
    }

    let passed = results.iter().filter(|r| matches!(r.outcome, Outcome::Pass)).count();
    let failed = results.iter().filter(|r| matches!(r.outcome, Outcome::Fail(_))).count();
    let errored = results.iter().filter(|r| matches!(r.outcome, Outcome::Error(_))).count();
    if results.is_empty() {
        eprintln!("warden: no tests found{}", if filter.is_some() { " matching --run" } else { "" });
    }
    if args.coverage {
        let modules: Vec<String> = dir.modules.iter().map(|(p, _)| p.clone()).collect();
        if args.verbose || failed + errored > 0 {
            println!();
        }
        print!("{}", coverage.render(&modules));
        if !diverged.is_empty() {
            println!(
                "note: on {} case(s) regorus's interpreter (which coverage needs) does not decide like the RVM the proxy runs; the verdicts above are the RVM's, the coverage of these cases may be partial:",
                diverged.len()
            );
            let shown = if args.verbose { diverged.len() } else { 3 };
            for d in diverged.iter().take(shown) {
                println!("  {}", d.lines().next().unwrap_or(""));
            }
            if diverged.len() > shown {
                println!("  … and {} more (--verbose lists them)", diverged.len() - shown);
            }
        }
    }
    if args.verbose || failed + errored > 0 || args.coverage {
        println!();
    }
    // CI parses this line: keep it the last one, in exactly this form.
    if errored > 0 {
        println!("{passed} passed, {failed} failed, {errored} errored");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    Ok(if failed + errored > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Failures always; passes with --verbose.
fn report(r: &Ran, verbose: bool) {
    let took = format!("{:.3}ms", r.took.as_secs_f64() * 1000.0);
    match &r.outcome {
        Outcome::Pass => {
            if verbose {
                println!("PASS  {} ({took})", r.name);
            }
        }
        Outcome::Fail(detail) => println!("FAIL  {} ({took})\n{detail}", r.name),
        Outcome::Error(e) => println!("ERROR {} ({took})\n{}", r.name, indent(e)),
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// As the proxy runs a policy: compiled (RVM, interpreter fallback), then evaluated. (`finish_case` checks the shape and compares the `want` fields.)
fn eval_case(dir: &PolicyDir, case: &Case, entrypoint: &str) -> Result<Value, String> {
    let data = case.data.as_ref().or(dir.data.as_ref());
    dir.compile_with_data(data, entrypoint)
        .map_err(|e| describe_policy_error(&e))
        .and_then(|mut policy| policy.eval(Value::from(case.input.clone())).map_err(|e| e.to_string()))
}

/// The same case on the interpreter (coverage needs it), through the proxy's engine set-up.
fn eval_case_covered(dir: &PolicyDir, case: &Case, entrypoint: &str, coverage: &mut Coverage) -> Result<Value, String> {
    let data = case.data.as_ref().or(dir.data.as_ref());
    let mut engine = interpreter(&source(&dir.modules, data, entrypoint)).map_err(|e| describe_policy_error(&e))?;
    engine.set_enable_coverage(true);
    engine.set_input(Value::from(case.input.clone()));
    let out = match engine.eval_rule(entrypoint.to_string()) {
        Ok(Value::Undefined) => Err("the entrypoint is undefined for this input".to_string()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("evaluation failed: {}", describe_error(&e.to_string()))),
    };
    match engine.get_coverage_report() {
        Ok(r) => coverage.add(r),
        Err(e) => eprintln!("warden: coverage of {}: {e}", case.name),
    }
    out
}

/// Why the interpreter's answer differs from the RVM's, if it does.
fn divergence(rvm: &Result<Value, String>, interp: &Result<Value, String>) -> Option<String> {
    match (rvm, interp) {
        (Ok(a), Ok(b)) if a == b => None,
        (Err(_), Err(_)) => None,
        (Ok(_), Err(e)) => Some(format!("the interpreter fails: {e}")),
        (Err(e), Ok(_)) => Some(format!("only the interpreter decides (the RVM fails: {e})")),
        (Ok(_), Ok(b)) => Some(format!("the interpreter decides {}", to_json(b).map(|j| j.to_string()).unwrap_or_default())),
    }
}

fn finish_case(case: &Case, result: Result<Value, String>, start: Instant) -> Ran {
    let outcome = match result.and_then(|v| parse_output(&v).map_err(|e| e.to_string()).and_then(|_| to_json(&v))) {
        Err(e) => Outcome::Error(format!("{e}\nwant {}", Json::Object(case.want.clone()))),
        Ok(got) => {
            if case.want.iter().all(|(k, want)| got.get(k) == Some(want)) {
                Outcome::Pass
            } else {
                Outcome::Fail(format!("    want {}\n    got  {got}", Json::Object(case.want.clone())))
            }
        }
    };
    Ran { name: case.name.clone(), outcome, took: start.elapsed() }
}

/// A Rego test passes when it evaluates to `true`; false or undefined fails; an error errors.
fn run_rego_test(engine: &mut Engine, name: &str) -> Ran {
    let start = Instant::now();
    let outcome = match engine.eval_rule(name.to_string()) {
        Ok(Value::Bool(true)) => Outcome::Pass,
        Ok(Value::Undefined) => Outcome::Fail("    undefined (a test must evaluate to true)".into()),
        Ok(v) => Outcome::Fail(format!("    = {} (a test must evaluate to true)", to_json(&v).map(|j| j.to_string()).unwrap_or_else(|_| "?".into()))),
        Err(e) => Outcome::Error(describe_error(&e.to_string())),
    };
    Ran { name: name.to_string(), outcome, took: start.elapsed() }
}

/// `data.<package>.test_<name>` for every rule named `test_*` in a package that a
/// `*_test.rego` module defines, in module order.
fn discover_tests(engine: &mut Engine) -> Result<Vec<String>, LoadError> {
    let packages = engine.get_packages().map_err(|e| LoadError(describe_error(&e.to_string())))?;
    let modules = engine.get_modules().clone();
    let test_packages: BTreeSet<&String> = modules
        .iter()
        .zip(&packages)
        .filter(|(m, _)| is_test_module(m.package.span.source.file()))
        .map(|(_, p)| p)
        .collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (module, package) in modules.iter().zip(&packages) {
        if !test_packages.contains(package) {
            continue;
        }
        for rule in &module.policy {
            let Rule::Spec { head: RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. }, .. } = rule.as_ref() else {
                continue;
            };
            let name = refr.span().text();
            let is_test = name.strip_prefix("test_").is_some_and(|rest| rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            if is_test {
                let full = format!("{package}.{name}");
                if seen.insert(full.clone()) {
                    out.push(full);
                }
            }
        }
    }
    Ok(out)
}
