//! What the CLI adds to warden-core's policy directory (`warden_core::policy::dir`): the YAML
//! case files of `cases/*.yaml` (format of `policies/cases/*.yaml`), the interpreter that only
//! the CLI needs (Rego tests, coverage, `--explain`), and regorus's errors made readable. The
//! modules, data.json and the JSON merge are the core's, so `policy`, `replay` and the bench
//! read a directory the same way.

use regorus::Value;
use serde_json::Value as Json;
use warden_core::error::{LoadError, PolicyError};
use warden_core::policy::dir::{merge, read_text, PolicyDir};
use warden_core::policy::{engine_for, PolicySource};

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

/// Every case of `cases/*.yaml` (sorted by file name) of the directory.
pub fn cases(dir: &PolicyDir) -> Result<Vec<Case>, LoadError> {
    let cases_dir = dir.dir.join("cases");
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
        let doc: Json = yaml_serde::from_str(&read_text(&file)?).map_err(|e| LoadError(format!("{shown}: {e}")))?;
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
                let mut data = dir.data.clone().unwrap_or_else(|| Json::Object(Default::default()));
                merge(&mut data, d);
                data
            });
            out.push(Case { name, input, data, want });
        }
    }
    Ok(out)
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
}
