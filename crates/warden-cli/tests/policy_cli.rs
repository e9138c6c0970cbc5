//! `warden policy test|eval|check`, run as the built binary on real directories: the fixtures
//! under tests/fixtures/ and the shipped library in policies/.

// Test code: a failure to run the binary or read a file should fail loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value as Json;

const FIXTURE_ENTRYPOINT: &str = "data.fixture.session.decision";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    fn last_line(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }

    fn lines_starting(&self, prefix: &str) -> Vec<String> {
        self.stdout.lines().filter(|l| l.starts_with(prefix)).map(str::to_string).collect()
    }
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn warden(args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warden"));
    cmd.args(args)
        .current_dir(crate_dir())
        // The policy commands must not need the state service or its token.
        .env_remove("WARDEN_ADMIN_TOKEN")
        .env_remove("WARDEN_STATE_URL")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run the warden binary");
    if let Some(text) = stdin {
        // A command that fails before reading its input (a broken policy) closes the pipe first:
        // that write error is expected, the exit code and output are what the tests judge.
        let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn fixture(name: &str) -> String {
    format!("tests/fixtures/{name}")
}

/// The number of cases in the shipped case files, counted the way the case runner reads them.
fn library_case_count() -> usize {
    let dir = crate_dir().join("../../policies/cases");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let doc: Json = yaml_serde::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            n += doc["cases"].as_array().unwrap().len();
        }
    }
    assert!(n >= 10, "expected the shipped case files to hold cases, found {n}");
    n
}

/// An input for the shipped library: the defaults of policies/cases/session.yaml, on a forbidden
/// path, from a new region.
fn library_sample_input() -> Json {
    let text = std::fs::read_to_string(crate_dir().join("../../policies/cases/session.yaml")).unwrap();
    let doc: Json = yaml_serde::from_str(&text).unwrap();
    let mut input = doc["defaults"]["input"].clone();
    input["request"]["path"] = Json::from("/admin/users");
    input["context"]["region"] = Json::from("us-east");
    input
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warden-policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

// ---- policy test: fixtures -------------------------------------------------------------------

#[test]
fn passing_dir_passes_and_prints_only_the_summary() {
    let r = warden(&["policy", "test", &fixture("passing"), "--entrypoint", FIXTURE_ENTRYPOINT], None);
    assert_eq!(r.code, 0, "{}", r.all());
    // 4 cases + 2 Rego tests.
    assert_eq!(r.last_line(), "6 passed, 0 failed", "{}", r.all());
    assert!(!r.stdout.contains("FAIL") && !r.stdout.contains("PASS"), "only failures are printed by default:\n{}", r.all());
}

#[test]
fn failing_dir_reports_want_and_got_and_the_failing_rule() {
    let r = warden(&["policy", "test", &fixture("failing"), "--entrypoint", FIXTURE_ENTRYPOINT], None);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.last_line(), "2 passed, 2 failed", "{}", r.all());
    let fails = r.lines_starting("FAIL");
    assert_eq!(fails.len(), 2, "{}", r.all());
    assert!(fails[0].starts_with("FAIL  tests/fixtures/failing/cases/failing.yaml: tickets are denied (fails on purpose) ("), "{}", r.all());
    assert!(fails[1].starts_with("FAIL  data.fixture.session_test.test_tickets_are_denied ("), "{}", r.all());
    assert!(r.stdout.contains(r#"    want {"action":"deny","reasons":["path_forbidden"]}"#), "{}", r.all());
    assert!(r.stdout.contains(r#"    got  {"action":"allow","reasons":[]}"#), "{}", r.all());
    assert!(!r.stdout.contains("PASS"), "{}", r.all());
}

#[test]
fn erroring_tests_are_counted_apart_and_the_summary_says_so() {
    let r = warden(&["policy", "test", &fixture("erroring"), "--entrypoint", FIXTURE_ENTRYPOINT], None);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.last_line(), "1 passed, 0 failed, 1 errored", "{}", r.all());
    let errors = r.lines_starting("ERROR");
    assert_eq!(errors.len(), 1, "{}", r.all());
    assert!(errors[0].starts_with("ERROR data.fixture.session_test.test_arithmetic_on_null ("), "{}", r.all());
    assert!(r.stdout.contains("tests/fixtures/erroring/policy_test.rego:11:"), "the error names file and line:\n{}", r.all());
}

#[test]
fn broken_policy_is_a_load_error_naming_file_and_line() {
    for args in [
        vec!["policy", "test", "tests/fixtures/broken"],
        vec!["policy", "check", "tests/fixtures/broken"],
        vec!["policy", "eval", "--dir", "tests/fixtures/broken", "--input", "-"],
    ] {
        let r = warden(&args, Some("{}"));
        assert_eq!(r.code, 2, "{args:?}: {}", r.all());
        assert!(
            r.stderr.lines().any(|l| l.starts_with("tests/fixtures/broken/policy.rego:7:") && l.contains("expecting expression")),
            "{args:?} must print file:line:col: message\n{}",
            r.all()
        );
        assert!(!r.stdout.contains("passed"), "{args:?}: no summary for a policy that does not load\n{}", r.all());
    }
}

#[test]
fn run_filters_by_test_name() {
    let r = warden(&["policy", "test", &fixture("passing"), "--entrypoint", FIXTURE_ENTRYPOINT, "--verbose", "--run", "admin"], None);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.lines_starting("PASS").len(), 1, "{}", r.all());
    assert!(r.stdout.contains("PASS  data.fixture.session_test.test_admin_is_denied ("), "{}", r.all());
    assert_eq!(r.last_line(), "1 passed, 0 failed");

    // Case names are `<file>: <note>`.
    let r = warden(&["policy", "test", &fixture("failing"), "--entrypoint", FIXTURE_ENTRYPOINT, "--run", "failing.yaml: tickets"], None);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.last_line(), "0 passed, 1 failed", "{}", r.all());

    let r = warden(&["policy", "test", &fixture("failing"), "--entrypoint", FIXTURE_ENTRYPOINT, "--run", "ordinary"], None);
    assert_eq!(r.code, 0, "the failing tests are filtered out: {}", r.all());
    assert_eq!(r.last_line(), "2 passed, 0 failed", "{}", r.all());

    let r = warden(&["policy", "test", &fixture("passing"), "--run", "("], None);
    assert_eq!(r.code, 2, "an invalid regex is a usage error: {}", r.all());
}

#[test]
fn verbose_lists_every_test_with_its_time() {
    let r = warden(&["policy", "test", &fixture("passing"), "--entrypoint", FIXTURE_ENTRYPOINT, "--verbose"], None);
    assert_eq!(r.code, 0, "{}", r.all());
    let passes = r.lines_starting("PASS  ");
    let names: Vec<&str> = passes.iter().map(|l| l.trim_start_matches("PASS  ").rsplit_once(" (").unwrap().0).collect();
    assert_eq!(
        names,
        [
            "tests/fixtures/passing/cases/basic.yaml: an ordinary step is allowed",
            "tests/fixtures/passing/cases/basic.yaml: forbidden paths are denied",
            "tests/fixtures/passing/cases/basic.yaml: too many steps are throttled",
            "tests/fixtures/passing/cases/basic.yaml: per-case data raises the limit",
            "data.fixture.session_test.test_ordinary_step_is_allowed",
            "data.fixture.session_test.test_admin_is_denied",
        ]
    );
    assert!(passes.iter().all(|l| l.ends_with("ms)")), "{passes:?}");
    assert_eq!(r.last_line(), "6 passed, 0 failed");

    let r = warden(&["policy", "test", &fixture("failing"), "--entrypoint", FIXTURE_ENTRYPOINT, "--verbose"], None);
    assert_eq!((r.lines_starting("PASS").len(), r.lines_starting("FAIL").len()), (2, 2), "{}", r.all());
}

#[test]
fn coverage_names_the_planted_uncovered_line() {
    let r = warden(&["policy", "test", &fixture("passing"), "--entrypoint", FIXTURE_ENTRYPOINT, "--coverage"], None);
    assert_eq!(r.code, 0, "{}", r.all());
    // policy.rego line 21 (`input.request.method == "TRACE"`) is reached by no case and no test.
    let planted = std::fs::read_to_string(crate_dir().join("tests/fixtures/passing/policy.rego")).unwrap();
    assert_eq!(planted.lines().nth(20).map(str::trim), Some(r#"input.request.method == "TRACE""#));
    assert!(
        r.stdout.lines().any(|l| l.trim() == "tests/fixtures/passing/policy.rego: line 21 not covered (85.7% of 7 lines covered)"),
        "{}",
        r.all()
    );
    assert!(r.stdout.contains("coverage: 85.7% of 7 policy lines covered"), "{}", r.all());
    assert!(!r.stdout.contains("policy_test.rego:"), "test modules are not part of the coverage:\n{}", r.all());
    assert_eq!(r.last_line(), "6 passed, 0 failed", "the summary stays last: {}", r.all());
}

// ---- the shipped library -----------------------------------------------------------------------

#[test]
fn the_library_passes_every_case_of_its_case_files() {
    let n = library_case_count();
    // One run (make test runs the library's cases only here): every case, each listed as passed.
    let r = warden(&["policy", "test", "../../policies", "--verbose"], None);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.last_line(), format!("{n} passed, 0 failed"), "{}", r.all());
    assert_eq!(r.lines_starting("PASS  ../../policies/cases/").len(), n, "{}", r.all());
}

#[test]
fn the_library_checks_on_the_rvm() {
    let n = library_case_count();
    let r = warden(&["policy", "check", "../../policies"], None);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.lines().any(|l| l.starts_with("engine: RVM")), "{}", r.all());
    assert!(r.stdout.contains(&format!("outputs: {n} sample input(s), every output is a valid decision")), "{}", r.all());
}

#[test]
fn eval_prints_the_decision_of_the_library() {
    let input = library_sample_input().to_string();
    // From a file.
    let path = temp_file("input.json", &input);
    let r = warden(&["policy", "eval", "--dir", "../../policies", "--input", path.to_str().unwrap()], None);
    assert_eq!(r.code, 0, "{}", r.all());
    let decision: Json = serde_json::from_str(&r.stdout).expect("stdout is the decision JSON");
    assert_eq!(decision["action"], "deny", "{decision}");
    assert_eq!(decision["reasons"], serde_json::json!(["path_forbidden"]), "{decision}");

    // From stdin, `--input -` and no --input at all.
    for args in [vec!["policy", "eval", "--dir", "../../policies", "--input", "-"], vec!["policy", "eval", "--dir", "../../policies"]] {
        let r = warden(&args, Some(&input));
        assert_eq!(r.code, 0, "{args:?}: {}", r.all());
        let from_stdin: Json = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(from_stdin, decision);
    }

    // --data is merged over data.json: /admin is no longer forbidden.
    let data = temp_file("data.json", r#"{"warden": {"config": {"forbidden_paths": ["/nothing"]}}}"#);
    let r = warden(&["policy", "eval", "--dir", "../../policies", "--input", path.to_str().unwrap(), "--data", data.to_str().unwrap()], None);
    assert_eq!(r.code, 0, "{}", r.all());
    let d: Json = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(d["action"], "throttle", "region_changed still throttles: {d}");
}

#[test]
fn eval_explain_shows_signals_and_the_rules_that_fired() {
    let input = library_sample_input().to_string();
    let r = warden(&["policy", "eval", "--dir", "../../policies", "--explain"], Some(&input));
    assert_eq!(r.code, 0, "{}", r.all());
    let lines: Vec<&str> = r.stdout.lines().map(str::trim).collect();
    assert!(lines.contains(&"signals: path_forbidden, region_changed"), "{}", r.all());
    assert!(lines.contains(&r#"data.warden.session.deny = ["path_forbidden"]"#), "{}", r.all());
    assert!(lines.contains(&r#"data.warden.session.throttle = ["region_changed"]"#), "{}", r.all());
    assert!(lines.contains(&r#"data.warden.drift.signals = ["region_changed"]"#), "{}", r.all());
    assert!(lines.contains(&"data.warden.session.step_up = []"), "{}", r.all());
    assert!(lines.contains(&"data.warden.risk.score = 40"), "{}", r.all());
}

#[test]
fn eval_exit_codes() {
    // Not JSON: a load error.
    let r = warden(&["policy", "eval", "--dir", "../../policies", "--input", "-"], Some("{not json"));
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("stdin:1:"), "{}", r.all());
    // The library is undefined for an empty input: not a decision.
    let r = warden(&["policy", "eval", "--dir", "../../policies", "--input", "-"], Some("{}"));
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("undefined"), "{}", r.all());
    // A decision of the wrong shape: printed, and the contract's error.
    let r = warden(
        &["policy", "eval", "--dir", "tests/fixtures/badshape", "--entrypoint", "data.fixture.shape.decision", "--input", "-"],
        Some(r#"{"request": {"path": "/legacy"}}"#),
    );
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stdout.contains(r#""action": "permit""#), "{}", r.all());
    assert!(r.stderr.contains("decision has the wrong shape: unknown action `permit`"), "{}", r.all());
}

// ---- policy check ------------------------------------------------------------------------------

#[test]
fn check_names_the_sample_with_the_wrong_shape() {
    let r = warden(&["policy", "check", "tests/fixtures/badshape", "--entrypoint", "data.fixture.shape.decision"], None);
    assert_eq!(r.code, 1, "{}", r.all());
    let bad = r.lines_starting("BAD");
    assert_eq!(bad.len(), 1, "{}", r.all());
    assert!(bad[0].starts_with("BAD   tests/fixtures/badshape/cases/shape.yaml: the legacy path: decision has the wrong shape"), "{}", r.all());
}

#[test]
fn check_without_cases_uses_the_builtin_sample() {
    let dir = std::env::temp_dir().join(format!("warden-policy-nocases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(crate_dir().join("tests/fixtures/passing/policy.rego"), dir.join("policy.rego")).unwrap();
    let r = warden(&["policy", "check", dir.to_str().unwrap(), "--entrypoint", FIXTURE_ENTRYPOINT], None);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("outputs: 1 sample input(s), every output is a valid decision"), "{}", r.all());
    // The same directory with a policy that is undefined for the sample: exit 1.
    std::fs::write(dir.join("policy.rego"), "package fixture.session\nimport rego.v1\ndecision := {\"action\": \"allow\"} if input.never\n").unwrap();
    let r = warden(&["policy", "check", dir.to_str().unwrap(), "--entrypoint", FIXTURE_ENTRYPOINT], None);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stdout.contains("BAD   built-in sample input: the entrypoint is undefined"), "{}", r.all());
}

#[test]
fn check_config_names_the_bad_field() {
    let r = warden(&["policy", "check", "../../policies", "--config", "tests/fixtures/configs/bad_mode.json"], None);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stdout.lines().any(|l| l.starts_with("mode: unknown variant `loud`")), "{}", r.all());

    let r = warden(&["policy", "check", "../../policies", "--config", "tests/fixtures/configs/good.json"], None);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("config tests/fixtures/configs/good.json: valid"), "{}", r.all());

    // A config whose policy does not parse: the field, then file:line:col.
    let bad = temp_file("bad_rego.json", r#"{"policy": {"modules": {"p.rego": "package p\ndecision := {"}}}"#);
    let r = warden(&["policy", "check", "../../policies", "--config", bad.to_str().unwrap()], None);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stdout.lines().any(|l| l.starts_with("policy: p.rego:2:")), "{}", r.all());
}

#[test]
fn policy_commands_need_no_state_service() {
    // `run` of the other commands insists on a token; the policy commands never ask for one.
    let r = warden(&["policy", "check", "../../policies"], None);
    assert!(!r.all().contains("no admin token"), "{}", r.all());
    assert!(Path::new(env!("CARGO_BIN_EXE_warden")).exists());
    assert_eq!(r.code, 0, "{}", r.all());
}
