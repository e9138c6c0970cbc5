//! Loading a policy directory: `*.rego` modules (`*_test.rego` are test modules), an optional
//! `data.json` and `cases/*.yaml` case files, in the format of `policies/cases/*.yaml`.

use std::fmt;
use std::path::{Path, PathBuf};

use regorus::Value;
use serde_json::Value as Json;
use warden_core::error::PolicyError;
use warden_core::policy::{engine_for, PolicySource};

use super::MAX_INSTRUCTIONS;

/// A policy, input, data or case file that cannot be loaded (exit 2).
#[derive(Debug)]
pub struct LoadError(pub String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Rego module: the path it is shown under (the directory joined with the file name, so
/// errors and coverage name the file as the user knows it) and its text.
pub type Module = (String, String);

pub struct PolicyDir {
    pub dir: PathBuf,
    pub modules: Vec<Module>,
    pub test_modules: Vec<Module>,
    pub data: Option<Json>,
}

pub struct Case {
    /// `<case file>: <note>`.
    pub name: String,
    /// `defaults.input` with the case's `input` deep-merged over it.
    pub input: Json,
    /// data.json with the case's `data` deep-merged over it, if the case has its own data.
    pub data: Option<Json>,
    /// Decision fields that must match exactly.
    pub want: serde_json::Map<String, Json>,
}

pub fn is_test_module(path: &str) -> bool {
    path.ends_with("_test.rego")
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| LoadError(format!("{}: {e}", path.display())))
}

pub fn load_dir(dir: &Path) -> Result<PolicyDir, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadError(format!("{}: {e}", dir.display())))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| LoadError(format!("{}: {e}", dir.display())))?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "rego") {
            paths.push(path);
        }
    }
    paths.sort();
    let (mut modules, mut test_modules) = (Vec::new(), Vec::new());
    for path in paths {
        let shown = path.display().to_string();
        let text = read(&path)?;
        if is_test_module(&shown) {
            test_modules.push((shown, text));
        } else {
            modules.push((shown, text));
        }
    }
    if modules.is_empty() {
        return Err(LoadError(format!("{}: no Rego modules (*.rego, other than *_test.rego)", dir.display())));
    }
    let data_path = dir.join("data.json");
    let data = if data_path.is_file() { Some(read_json(&data_path)?) } else { None };
    Ok(PolicyDir { dir: dir.to_path_buf(), modules, test_modules, data })
}

/// A JSON file; errors name the file, line and column.
pub fn read_json(path: &Path) -> Result<Json, LoadError> {
    let text = read(path)?;
    parse_json(&path.display().to_string(), &text)
}

pub fn parse_json(name: &str, text: &str) -> Result<Json, LoadError> {
    serde_json::from_str(text).map_err(|e| LoadError(format!("{name}:{}:{}: {e}", e.line(), e.column())))
}

impl PolicyDir {
    /// Every case of `cases/*.yaml` (sorted by file name), merged exactly like the runner of the
    /// case files (crates/warden-core/tests/policy_cases.rs).
    pub fn cases(&self) -> Result<Vec<Case>, LoadError> {
        let cases_dir = self.dir.join("cases");
        if !cases_dir.is_dir() {
            return Ok(Vec::new());
        }
        let entries = std::fs::read_dir(&cases_dir).map_err(|e| LoadError(format!("{}: {e}", cases_dir.display())))?;
        let mut files = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| LoadError(format!("{}: {e}", cases_dir.display())))?.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
        files.sort();
        let mut out = Vec::new();
        for file in files {
            let shown = file.display().to_string();
            let doc: Json = yaml_serde::from_str(&read(&file)?).map_err(|e| LoadError(format!("{shown}: {e}")))?;
            let defaults = doc.pointer("/defaults/input").cloned().unwrap_or_else(|| Json::Object(Default::default()));
            let cases = doc
                .get("cases")
                .and_then(Json::as_array)
                .ok_or_else(|| LoadError(format!("{shown}: `cases` must be a list")))?;
            for (i, case) in cases.iter().enumerate() {
                let note = case.get("note").and_then(Json::as_str).map(str::to_string).unwrap_or_else(|| format!("case {}", i + 1));
                let name = format!("{shown}: {note}");
                let want = case
                    .get("want")
                    .and_then(Json::as_object)
                    .cloned()
                    .ok_or_else(|| LoadError(format!("{name}: `want` must be an object of decision fields")))?;
                let mut input = defaults.clone();
                if let Some(i) = case.get("input") {
                    merge(&mut input, i);
                }
                let data = case.get("data").map(|d| {
                    let mut data = self.data.clone().unwrap_or_else(|| Json::Object(Default::default()));
                    merge(&mut data, d);
                    data
                });
                out.push(Case { name, input, data, want });
            }
        }
        Ok(out)
    }

    /// All modules, the test modules last: what `policy test` loads.
    pub fn all_modules(&self) -> Vec<Module> {
        self.modules.iter().chain(&self.test_modules).cloned().collect()
    }
}

/// Objects merge key by key; anything else is replaced.
pub fn merge(base: &mut Json, over: &Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Json::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The proxy's engine set-up for these modules and data.
pub fn source<'a>(modules: &'a [Module], data: Option<&'a Json>, entrypoint: &'a str) -> PolicySource<'a> {
    PolicySource {
        modules: modules.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect(),
        data,
        entrypoint,
        max_instructions: MAX_INSTRUCTIONS,
    }
}

/// The proxy's engine set-up (`engine_for`), for what only the interpreter can do: Rego tests,
/// coverage, `--explain`. Builtin errors are undefined, as on the RVM (and in OPA): regorus's
/// interpreter raises them by default, so `input.now - null` would be an error here and
/// undefined in the proxy.
pub fn interpreter(src: &PolicySource<'_>) -> Result<regorus::Engine, PolicyError> {
    let (mut engine, _, _) = engine_for(src)?;
    engine.set_strict_builtin_errors(false);
    Ok(engine)
}

/// A policy value as JSON (sets become arrays), the way the case runner compares decisions.
pub fn to_json(v: &Value) -> Result<Json, String> {
    let text = v.to_json_str().map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// regorus reports a location as `--> file:line:col`, then the code, then `error: message`.
/// Turn that into `file:line:col: message`, followed by the code excerpt.
pub fn describe_policy_error(e: &PolicyError) -> String {
    describe_error(&e.0)
}

pub fn describe_error(text: &str) -> String {
    let Some(at) = text.find("--> ") else {
        return text.trim().to_string();
    };
    let context = text[..at].trim().trim_end_matches(':').trim();
    let rest = &text[at + 4..];
    let mut lines = rest.lines();
    let location = lines.next().unwrap_or("").trim();
    let mut excerpt = Vec::new();
    let mut message = String::new();
    for line in lines {
        if message.is_empty() {
            if let Some(m) = line.strip_prefix("error: ") {
                message = m.trim().to_string();
                continue;
            }
            excerpt.push(format!("    {line}"));
        } else {
            // A message spanning several lines.
            message.push(' ');
            message.push_str(line.trim());
        }
    }
    if message.is_empty() {
        message = "error".into();
    }
    let mut out = format!("{location}: {message}");
    // `module <file>` only repeats the file; any other context (the entrypoint) is worth keeping.
    if !context.is_empty() && !context.starts_with("module ") {
        out.push_str(&format!(" ({context})"));
    }
    for line in excerpt {
        out.push('\n');
        out.push_str(line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regorus_locations_become_file_line_col() {
        let raw = "module p/x.rego: \n--> p/x.rego:2:13\n  |\n2 | decision := {\n  |             ^\nerror: unexpected eof";
        let d = describe_error(raw);
        assert!(d.starts_with("p/x.rego:2:13: unexpected eof"), "{d}");
        assert!(d.contains("2 | decision := {"), "{d}");
        assert_eq!(describe_error("plain"), "plain");
    }

    #[test]
    fn merge_is_deep() {
        let mut a = serde_json::json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge(&mut a, &serde_json::json!({"a": {"b": 3}, "d": [2]}));
        assert_eq!(a, serde_json::json!({"a": {"b": 3, "c": 2}, "d": [2]}));
    }
}
