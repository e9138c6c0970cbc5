//! Runs every YAML case file in `policies/cases/` against the policy library in `policies/`,
//! with the same engine set-up the proxy uses.

// This whole file is test code: a failure to read a case file should fail loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use warden_core::decision::parse_output;
use warden_core::policy::{Policy, PolicySource};

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

/// Objects merge key by key; anything else is replaced.
fn merge(base: &mut Json, over: &Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Json::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn modules(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rego") && !p.to_string_lossy().ends_with("_test.rego"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn policy_case_files() {
    let dir = policies_dir();
    let mods = modules(&dir);
    assert!(!mods.is_empty(), "no Rego modules in {}", dir.display());
    let base_data: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("data.json")).unwrap()).unwrap();

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("cases")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let (mut passed, mut failed) = (0, Vec::new());
    for file in files.iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        let doc: Json = yaml_serde::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let defaults = doc.pointer("/defaults/input").cloned().unwrap_or(Json::Object(Default::default()));
        for case in doc["cases"].as_array().expect("`cases` must be a list") {
            let note = case["note"].as_str().unwrap_or("(no note)");
            let mut data = base_data.clone();
            if let Some(d) = case.get("data") {
                merge(&mut data, d);
            }
            let mut input = defaults.clone();
            merge(&mut input, &case["input"]);
            let mut policy = Policy::compile(&PolicySource {
                modules: mods.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect(),
                data: Some(&data),
                entrypoint: "data.warden.session.decision",
                max_instructions: 200_000,
            })
            .unwrap();
            assert!(policy.uses_rvm(), "the library must run on the RVM: {:?}", policy.fallback_reason);
            let out = policy.eval(regorus::Value::from(input)).and_then(|v| parse_output(&v).map(|_| v));
            let got: Json = match out {
                Ok(v) => serde_json::from_str(&v.to_json_str().unwrap()).unwrap(),
                Err(e) => Json::String(format!("error: {e}")),
            };
            let ok = case["want"].as_object().unwrap().iter().all(|(k, want)| got.get(k) == Some(want));
            if ok {
                passed += 1;
            } else {
                failed.push(format!("{}: {note}\n    want {}\n    got  {got}", file.display(), case["want"]));
            }
        }
    }
    println!("policy cases: {passed} passed, {} failed", failed.len());
    assert!(failed.is_empty(), "failing policy cases:\n{}", failed.join("\n"));
    assert!(passed >= 10, "expected the case files to hold at least 10 cases, ran {passed}");
}
