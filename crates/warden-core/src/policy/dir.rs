//! A policy directory on disk, read one way by everything that runs a policy outside the proxy
//! (`warden policy`, `warden replay`, bench/policy-eval). The proxy gets its modules from the
//! plugin configuration, never from files; the tools that vouch for a policy before it is rolled
//! out must agree with each other on which files are modules, their order, their names and the
//! data, or a policy could pass one tool and fail another.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::{Policy, PolicySource, DEFAULT_MAX_INSTRUCTIONS};
use crate::error::{LoadError, PolicyError};

/// A Rego module: the path it is shown under (the directory joined with the file name, so
/// errors and coverage name the file as the user knows it) and its text.
pub type Module = (String, String);

/// `*.rego` modules, `*_test.rego` test modules and `data.json`, as found in one directory.
#[derive(Debug, Clone)]
pub struct PolicyDir {
    pub dir: PathBuf,
    /// What the proxy would load, sorted by file name.
    pub modules: Vec<Module>,
    /// Never loaded by the proxy: only the Rego tests run them.
    pub test_modules: Vec<Module>,
    pub data: Option<Json>,
}

pub fn is_test_module(path: &str) -> bool {
    path.ends_with("_test.rego")
}

impl PolicyDir {
    /// Errors name the directory or file at fault; a directory without a (non-test) module is
    /// an error, since the proxy refuses a configuration without one.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let entries = std::fs::read_dir(dir).map_err(|e| LoadError(format!("{}: {e}", dir.display())))?;
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| LoadError(format!("{}: {e}", dir.display())))?.path();
            if path.is_file() && path.extension().is_some_and(|e| e == "rego") {
                paths.push(path);
            }
        }
        // read_dir's order is the file system's: sorted, the version hash is stable.
        paths.sort();
        let (mut modules, mut test_modules) = (Vec::new(), Vec::new());
        for path in paths {
            let shown = path.display().to_string();
            let text = read_text(&path)?;
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
        Ok(Self { dir: dir.to_path_buf(), modules, test_modules, data })
    }

    /// All modules, the test modules last: what the Rego tests load.
    pub fn all_modules(&self) -> Vec<Module> {
        self.modules.iter().chain(&self.test_modules).cloned().collect()
    }

    /// The modules and data.json compiled as the proxy compiles them.
    pub fn compile(&self, entrypoint: &str) -> Result<Policy, PolicyError> {
        self.compile_with_data(self.data.as_ref(), entrypoint)
    }

    /// The modules compiled with other data than data.json (a case's, or data.json with more
    /// merged over it).
    pub fn compile_with_data(&self, data: Option<&Json>, entrypoint: &str) -> Result<Policy, PolicyError> {
        Policy::compile(&source(&self.modules, data, entrypoint))
    }
}

/// The proxy's engine set-up for these modules and data, with the proxy's default instruction
/// budget.
pub fn source<'a>(modules: &'a [Module], data: Option<&'a Json>, entrypoint: &'a str) -> PolicySource<'a> {
    PolicySource {
        modules: modules.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect(),
        data,
        entrypoint,
        max_instructions: DEFAULT_MAX_INSTRUCTIONS,
    }
}

/// A text file; the error names the file.
pub fn read_text(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| LoadError(format!("{}: {e}", path.display())))
}

/// A JSON file; errors name the file, line and column.
pub fn read_json(path: &Path) -> Result<Json, LoadError> {
    let text = read_text(path)?;
    parse_json(&path.display().to_string(), &text)
}

/// JSON read from somewhere called `name` (a file, `stdin`); errors name it, line and column.
pub fn parse_json(name: &str, text: &str) -> Result<Json, LoadError> {
    serde_json::from_str(text).map_err(|e| LoadError(format!("{name}:{}:{}: {e}", e.line(), e.column())))
}

/// Deep merge, the one way case files, `--data` and the bench lay JSON over JSON: objects merge
/// key by key; anything else (arrays included) is replaced.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temp dir, removed by the caller.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("warden-core-policy-dir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn merge_is_deep() {
        let mut a = serde_json::json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge(&mut a, &serde_json::json!({"a": {"b": 3}, "d": [2]}));
        assert_eq!(a, serde_json::json!({"a": {"b": 3, "c": 2}, "d": [2]}));
    }

    #[test]
    fn modules_are_sorted_and_test_modules_kept_apart() {
        let dir = temp_dir("sorted");
        std::fs::write(dir.join("b.rego"), "package t\nimport rego.v1\ndecision := {\"action\": \"allow\"}").unwrap();
        std::fs::write(dir.join("a.rego"), "package t.a\n").unwrap();
        std::fs::write(dir.join("b_test.rego"), "package t_test\n").unwrap();
        std::fs::write(dir.join("notes.md"), "not a module").unwrap();
        std::fs::write(dir.join("data.json"), r#"{"k": 1}"#).unwrap();
        let loaded = PolicyDir::load(&dir).unwrap();
        let names: Vec<String> = loaded.modules.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, vec![dir.join("a.rego").display().to_string(), dir.join("b.rego").display().to_string()]);
        assert_eq!(loaded.test_modules.len(), 1);
        assert_eq!(loaded.all_modules().last().map(|(n, _)| n.clone()), Some(dir.join("b_test.rego").display().to_string()));
        assert_eq!(loaded.data, Some(serde_json::json!({"k": 1})));
        assert!(loaded.compile("data.t.decision").unwrap().uses_rvm());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_path() {
        let dir = temp_dir("errors");
        let e = PolicyDir::load(&dir).unwrap_err();
        assert!(e.0.starts_with(&dir.display().to_string()) && e.0.contains("no Rego modules"), "{e}");
        std::fs::write(dir.join("p.rego"), "package p\n").unwrap();
        std::fs::write(dir.join("data.json"), "{\n  \"k\": ,\n}").unwrap();
        let e = PolicyDir::load(&dir).unwrap_err();
        assert!(e.0.starts_with(&format!("{}:2:", dir.join("data.json").display())), "{e}");
        let e = PolicyDir::load(&dir.join("missing")).unwrap_err();
        assert!(e.0.starts_with(&dir.join("missing").display().to_string()), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
