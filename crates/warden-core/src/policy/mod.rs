//! The Rego session policy: compiled once per configuration and evaluated per request with
//! regorus. The RVM is the fast path (compile once, one reused `RegoVM` per proxy VM, per request
//! `set_input` + `execute`); a policy the RVM cannot compile falls back to the interpreter.

use std::sync::Arc;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::vm::RegoVM;
use regorus::{Engine, Rc, Value};

use crate::error::PolicyError;
use crate::hash::{hex, sha256};

pub mod dir;

/// The rule whose value is the decision when `policy.entrypoint` is not set. The CLI, the bench
/// and the configuration's default share it, so a policy checked offline is the one the proxy runs.
pub const DEFAULT_ENTRYPOINT: &str = "data.warden.session.decision";
/// `policy.max_instructions` when not set: the RVM's budget per evaluation, shared for the same
/// reason (a policy that passes its tests offline must not run out of budget in the proxy).
pub const DEFAULT_MAX_INSTRUCTIONS: usize = 200_000;

/// The same engine set-up everywhere a policy runs: proxy, CLI and tests.
pub struct PolicySource<'a> {
    pub modules: Vec<(&'a str, &'a str)>,
    pub data: Option<&'a serde_json::Value>,
    pub entrypoint: &'a str,
    pub max_instructions: usize,
}

enum Backend {
    Rvm(Box<RegoVM>),
    Interpreter { engine: Box<Engine>, entrypoint: String },
}

pub struct Policy {
    backend: Backend,
    /// Short hash of the modules and data: which policy made a decision.
    pub version: String,
    /// Why the interpreter is used instead of the RVM, if it is.
    pub fallback_reason: Option<String>,
}

/// The engine every policy runs on, set up the same way in the proxy, the CLI and the tests:
/// the modules and the data, nothing else. Returns the engine, the data as a policy value, and
/// the policy version (a short hash of modules and data).
pub fn engine_for(src: &PolicySource<'_>) -> Result<(Engine, Option<Value>, String), PolicyError> {
    let mut engine = Engine::new();
    for (name, text) in &src.modules {
        engine
            .add_policy(name.to_string(), text.to_string())
            .map_err(|e| PolicyError(format!("module {name}: {e}")))?;
    }
    // The version is the policy's content: each module by its package and text, in package
    // order, never by the name or path it was loaded under, so the proxy, the CLI and replay
    // give one policy one version however its directory was written.
    let mut modules: Vec<(&str, &str)> = src.modules.iter().map(|(_, text)| (package_of(text), *text)).collect();
    modules.sort_unstable();
    let mut fingerprint = Vec::new();
    for (package, text) in modules {
        for part in [package, text] {
            fingerprint.extend_from_slice(part.as_bytes());
            fingerprint.push(0);
        }
    }
    let data = match src.data {
        Some(d) => {
            // serde_json's maps are ordered by key: the same data, the same text.
            fingerprint.extend_from_slice(d.to_string().as_bytes());
            let v = Value::from(d.clone());
            if !matches!(v, Value::Object(_)) {
                return Err(PolicyError("data must be a JSON object".into()));
            }
            engine.add_data(v.clone()).map_err(|e| PolicyError(format!("data: {e}")))?;
            Some(v)
        }
        None => None,
    };
    Ok((engine, data, hex(&sha256(&fingerprint)[..6])))
}

/// The package a module declares (its first `package` line), or "" when it has none (the
/// engine then refuses the module anyway).
fn package_of(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("package "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
}

impl Policy {
    pub fn compile(src: &PolicySource<'_>) -> Result<Self, PolicyError> {
        let (mut engine, data, version) = engine_for(src)?;
        let entry: Rc<str> = src.entrypoint.into();
        let compiled = engine
            .compile_with_entrypoint(&entry)
            .map_err(|e| PolicyError(format!("entrypoint {}: {e}", src.entrypoint)))?;

        match Compiler::compile_from_policy(&compiled, &[src.entrypoint]) {
            Ok(program) => {
                let mut vm = RegoVM::new();
                vm.load_program(Arc::clone(&program));
                vm.set_max_instructions(src.max_instructions);
                if let Some(d) = data {
                    vm.set_data(d).map_err(|e| PolicyError(format!("data: {e}")))?;
                }
                Ok(Self { backend: Backend::Rvm(Box::new(vm)), version, fallback_reason: None })
            }
            Err(e) => Ok(Self {
                backend: Backend::Interpreter { engine: Box::new(engine), entrypoint: src.entrypoint.to_string() },
                version,
                fallback_reason: Some(e.to_string()),
            }),
        }
    }

    pub fn uses_rvm(&self) -> bool {
        matches!(self.backend, Backend::Rvm(_))
    }

    /// Evaluate the entrypoint for `input`. An undefined result is an error: the policy must
    /// always say something.
    pub fn eval(&mut self, input: Value) -> Result<Value, PolicyError> {
        let out = match &mut self.backend {
            Backend::Rvm(vm) => {
                vm.set_input(input);
                vm.execute().map_err(|e| PolicyError(format!("evaluation failed: {e}")))?
            }
            Backend::Interpreter { engine, entrypoint } => {
                engine.set_input(input);
                engine.eval_rule(entrypoint.clone()).map_err(|e| PolicyError(format!("evaluation failed: {e}")))?
            }
        };
        if matches!(out, Value::Undefined) {
            return Err(PolicyError("the entrypoint is undefined for this input".into()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(rego: &str) -> Result<Policy, PolicyError> {
        Policy::compile(&PolicySource {
            modules: vec![("t.rego", rego)],
            data: None,
            entrypoint: "data.t.decision",
            max_instructions: 100_000,
        })
    }

    #[test]
    fn the_version_is_the_content_not_the_paths_or_their_order() {
        let a = "# the library\npackage warden.a\nimport rego.v1\nx := 1\n";
        let b = "package warden.session\nimport rego.v1\ndecision := {\"action\": \"allow\"}\n";
        let data = serde_json::json!({"warden": {"config": {"z": 1, "a": [1, 2]}}});
        let version = |modules: Vec<(&str, &str)>, data: &serde_json::Value| {
            engine_for(&PolicySource { modules, data: Some(data), entrypoint: DEFAULT_ENTRYPOINT, max_instructions: 1000 }).unwrap().2
        };
        let proxy = version(vec![("a.rego", a), ("session.rego", b)], &data);
        assert_eq!(version(vec![("./policies//session.rego", b), ("/abs/policies/a.rego", a)], &data), proxy);
        // The same data written in another key order is the same data.
        let reordered: serde_json::Value = serde_json::from_str(r#"{"warden": {"config": {"a": [1, 2], "z": 1}}}"#).unwrap();
        assert_eq!(version(vec![("session.rego", b), ("a.rego", a)], &reordered), proxy);
        assert_ne!(version(vec![("a.rego", a), ("session.rego", &b.replace("allow", "deny"))], &data), proxy);
        assert_ne!(version(vec![("a.rego", a), ("session.rego", b)], &serde_json::json!({"warden": {}})), proxy);
        assert_eq!(package_of(a), "warden.a");
    }

    #[test]
    fn rvm_evaluates_and_is_reused() {
        let mut p = compile("package t\nimport rego.v1\ndecision := {\"action\": a} if { a := input.want }").unwrap();
        assert!(p.uses_rvm(), "{:?}", p.fallback_reason);
        for want in ["allow", "deny", "allow"] {
            let mut input = std::collections::BTreeMap::new();
            input.insert(Value::from("want"), Value::from(want));
            let out = p.eval(Value::from(input)).unwrap();
            assert_eq!(out["action"], Value::from(want));
        }
    }

    #[test]
    fn undefined_and_broken_policies_are_errors() {
        let mut p = compile("package t\nimport rego.v1\ndecision := 1 if { input.never }").unwrap();
        assert!(p.eval(Value::new_object()).is_err());
        let e = compile("package t\ndecision := {").err().unwrap();
        assert!(e.0.contains("t.rego"), "{e}");
    }

    #[test]
    fn runaway_policies_are_stopped() {
        let rego = "package t\nimport rego.v1\ndecision := count([x | some x in numbers.range(1, 1000000)])";
        let mut p = compile(rego).unwrap();
        assert!(p.eval(Value::new_object()).is_err());
    }
}
