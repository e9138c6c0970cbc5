//! `warden config`: the plugin configuration built from a policy directory and a small settings
//! file, validated by the very code `on_configure` runs (`Warden::from_json`), and printed as the
//! JSON Envoy's `configuration` holds, as YAML for Istio's `pluginConfig`, as a whole Istio
//! `WasmPlugin`, as an ECDS resource file, or as a complete standalone Envoy bootstrap.
//! `warden config --check FILE…` finds every plugin configuration in JSON or YAML files
//! (manifests, bootstraps, ECDS files) and validates each the same way.
//!
//! The settings file is the plugin configuration itself (every field of README's table, unknown
//! ones refused by the filter's own parser) with four additions that are resolved here and never
//! reach the proxy: `policy.dir` and `policy.candidate.dir` (a policy directory, read by
//! `warden_core::policy::dir`, the one loader; `data` given beside it is deep-merged over its
//! `data.json`), `state.token_env` / `state.token_file` (the proxy token, kept out of the file),
//! and the `envoy` and `istio` sections, read only by the bootstrap, ECDS and WasmPlugin formats.

mod check;
mod envoy;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value as Json};
use warden_core::policy::dir::{merge, PolicyDir};
use warden_core::Warden;

pub use envoy::EnvoySettings;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The plugin configuration as JSON (Envoy's `configuration` value).
    Json,
    /// The plugin configuration as YAML (Istio's `pluginConfig`, Envoy Gateway's `config`).
    Yaml,
    /// A whole Istio `WasmPlugin` (needs the settings' `istio` section).
    Istio,
    /// A complete standalone Envoy bootstrap (needs the settings' `envoy` section).
    Bootstrap,
    /// The filter as an ECDS resource file, for `envoy.ecds` (a bootstrap whose filter comes from
    /// a watched file).
    Ecds,
}

#[derive(Args)]
pub struct ConfigArgs {
    /// The settings file (YAML or JSON): the plugin configuration plus `policy.dir`,
    /// `state.token_env`/`token_file`, `envoy` and `istio` (README, "warden config").
    #[arg(long, short = 's', value_name = "FILE", required_unless_present = "check")]
    pub settings: Option<PathBuf>,
    /// The policy directory (overrides the settings' `policy.dir`).
    #[arg(long, value_name = "DIR")]
    pub policy: Option<PathBuf>,
    /// Set one value of the settings, by its dotted path (`envoy.upstream=10.0.0.7:8080`,
    /// `mode=shadow`); the value is read as YAML (a number, `true`, a list…) or else taken as text.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    /// What to print.
    #[arg(long, short = 'f', value_enum, default_value = "json")]
    pub format: Format,
    /// Write to this file (atomically: a temporary file renamed over it, so a watching Envoy
    /// never reads half a file) instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Validate every plugin configuration found in these files (plugin configuration JSON,
    /// Istio WasmPlugin, Envoy Gateway EnvoyExtensionPolicy, Envoy bootstrap or ECDS files).
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["settings", "policy", "out"])]
    pub check: Vec<PathBuf>,
}

pub fn run(args: ConfigArgs) -> Result<ExitCode, String> {
    if !args.check.is_empty() {
        return check::run(&args.check);
    }
    let settings_path = args.settings.as_deref().ok_or("no settings file: pass --settings FILE")?;
    let built = build(settings_path, args.policy.as_deref(), &args.set)?;
    let text = match args.format {
        Format::Json => pretty(&built.plugin)?,
        Format::Yaml => yaml(&built.plugin)?,
        Format::Istio => yaml(&built.wasm_plugin()?)?,
        Format::Bootstrap => pretty(&built.envoy()?.bootstrap(&built.plugin)?)?,
        Format::Ecds => pretty(&built.envoy()?.ecds_resource(&built.plugin)?)?,
    };
    eprintln!("warden config: valid (policy version {}{})", built.version, built.engine_note());
    match &args.out {
        None => print!("{text}"),
        Some(path) => write_atomically(path, &text)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A settings file resolved into a plugin configuration the filter accepts.
#[derive(Clone)]
pub struct Built {
    /// The plugin configuration, exactly as the proxy will get it.
    pub plugin: Json,
    pub version: String,
    fallback: Option<String>,
    envoy: Option<Json>,
    istio: Option<Json>,
    base: PathBuf,
}

impl Built {
    fn engine_note(&self) -> String {
        match &self.fallback {
            None => ", RVM".into(),
            Some(why) => format!(", interpreter: the RVM cannot compile it: {}", why.trim()),
        }
    }

    fn envoy(&self) -> Result<EnvoySettings, String> {
        let raw = self.envoy.clone().ok_or("the settings have no `envoy` section: a bootstrap needs at least `envoy.upstream` (HOST:PORT of the service to protect)")?;
        EnvoySettings::parse(raw, &self.base)
    }

    #[cfg(test)]
    fn wasm_plugin_for_test(&self) -> Json {
        let b = Built { istio: Some(json!({"url": "oci://r.test/w:1"})), ..self.clone() };
        b.wasm_plugin().unwrap_or_default()
    }

    /// An Istio WasmPlugin with this configuration as its `pluginConfig`.
    fn wasm_plugin(&self) -> Result<Json, String> {
        let raw = self.istio.clone().ok_or("the settings have no `istio` section: a WasmPlugin needs at least `istio.url` (oci://… of the image, see `warden oci push`)")?;
        let obj = raw.as_object().ok_or("istio: must be a mapping")?;
        let allowed = ["name", "namespace", "selector", "url", "sha256", "phase", "priority", "failStrategy", "imagePullPolicy", "imagePullSecret"];
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("istio.{k}: unknown field, expected one of {}", allowed.join(", ")));
        }
        let text = |k: &str| obj.get(k).and_then(Json::as_str).map(str::to_string);
        let url = text("url").ok_or("istio.url: required (oci://REGISTRY/REPO:TAG or @sha256:…, as `warden oci push` prints)")?;
        let mut metadata = json!({"name": text("name").unwrap_or_else(|| "session-warden".into())});
        if let Some(ns) = text("namespace") {
            metadata["namespace"] = json!(ns);
        }
        let mut spec = json!({
            "url": url,
            "phase": text("phase").unwrap_or_else(|| "AUTHN".into()),
            "priority": obj.get("priority").cloned().unwrap_or(json!(10)),
            "failStrategy": text("failStrategy").unwrap_or_else(|| "FAIL_CLOSE".into()),
            "pluginName": "session-warden",
        });
        for k in ["sha256", "imagePullPolicy", "imagePullSecret"] {
            if let Some(v) = text(k) {
                spec[k] = json!(v);
            }
        }
        if let Some(sel) = obj.get("selector") {
            spec["selector"] = json!({"matchLabels": sel});
        }
        spec["pluginConfig"] = self.plugin.clone();
        Ok(json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": metadata, "spec": spec}))
    }
}

/// Read and resolve a settings file; the result is validated as `on_configure` validates it.
pub fn build(settings_path: &Path, policy_override: Option<&Path>, set: &[String]) -> Result<Built, String> {
    let text = std::fs::read_to_string(settings_path).map_err(|e| format!("{}: {e}", settings_path.display()))?;
    let mut settings: Json = yaml_serde::from_str(&text).map_err(|e| format!("{}: {e}", settings_path.display()))?;
    for assignment in set {
        apply_set(&mut settings, assignment)?;
    }
    let base = settings_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
    resolve(settings, &base, policy_override)
}

/// The settings (already read) resolved against `base`, the directory relative paths start from.
pub fn resolve(settings: Json, base: &Path, policy_override: Option<&Path>) -> Result<Built, String> {
    let Json::Object(mut cfg) = settings else {
        return Err("settings: must be a mapping (the plugin configuration plus policy.dir, envoy, istio)".into());
    };
    let envoy = cfg.remove("envoy");
    let istio = cfg.remove("istio");

    let policy = cfg.entry("policy").or_insert_with(|| json!({}));
    let policy = policy.as_object_mut().ok_or("policy: must be a mapping")?;
    let dir = match policy_override {
        Some(d) => Some(d.to_path_buf()),
        None => take_path(policy, "dir", "policy.dir", base)?,
    };
    policy.remove("dir");
    if let Some(dir) = dir {
        load_policy_dir(policy, &dir, "policy")?;
    } else if !policy.contains_key("modules") {
        return Err("policy: no policy: set `policy.dir` (a directory of *.rego and data.json) or pass --policy DIR".into());
    }
    if let Some(Json::Object(candidate)) = policy.get_mut("candidate") {
        if let Some(cdir) = take_path(candidate, "dir", "policy.candidate.dir", base)? {
            load_policy_dir(candidate, &cdir, "policy.candidate")?;
        }
    }

    if let Some(Json::Object(state)) = cfg.get_mut("state") {
        resolve_token(state, base)?;
    }

    let plugin = Json::Object(cfg);
    let bytes = serde_json::to_vec(&plugin).map_err(|e| e.to_string())?;
    // The one validation: what on_configure runs, field path and all.
    let warden = Warden::from_json(&bytes).map_err(|e| format!("invalid plugin configuration: {}: {}", e.field, e.message.trim()))?;
    Ok(Built {
        version: warden.policy_version().to_string(),
        fallback: warden.policy_fallback().map(str::to_string),
        plugin,
        envoy,
        istio,
        base: base.to_path_buf(),
    })
}

/// `a.b.c=VALUE`: sets that value, creating the mappings on the way.
fn apply_set(settings: &mut Json, assignment: &str) -> Result<(), String> {
    let (path, raw) = assignment.split_once('=').ok_or_else(|| format!("--set {assignment}: expected PATH=VALUE"))?;
    let value: Json = yaml_serde::from_str(raw).unwrap_or_else(|_| Json::String(raw.to_string()));
    let value = if value.is_null() && !raw.trim().is_empty() && raw.trim() != "null" { Json::String(raw.to_string()) } else { value };
    let mut at = settings;
    for key in path.split('.') {
        if key.is_empty() {
            return Err(format!("--set {assignment}: empty key in `{path}`"));
        }
        if !at.is_object() {
            *at = json!({});
        }
        at = at.as_object_mut().ok_or("unreachable")?.entry(key.to_string()).or_insert(Json::Null);
    }
    *at = value;
    Ok(())
}

/// A path-valued setting, taken out of its section, relative to `base`.
fn take_path(section: &mut Map<String, Json>, key: &str, shown: &str, base: &Path) -> Result<Option<PathBuf>, String> {
    match section.remove(key) {
        None => Ok(None),
        Some(Json::String(s)) => Ok(Some(base.join(s))),
        Some(_) => Err(format!("{shown}: must be a path")),
    }
}

/// `modules` and `data` from a policy directory, as the proxy will get them: modules by file
/// name (the version does not depend on names), test modules left out, the section's own `data`
/// deep-merged over `data.json`.
fn load_policy_dir(section: &mut Map<String, Json>, dir: &Path, shown: &str) -> Result<(), String> {
    if section.contains_key("modules") {
        return Err(format!("{shown}: give either `dir` or `modules`, not both"));
    }
    let loaded = PolicyDir::load(dir).map_err(|e| format!("{shown}.dir: {}", e.0))?;
    let mut modules = Map::new();
    for (path, text) in &loaded.modules {
        let name = Path::new(path).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| path.clone());
        modules.insert(name, Json::String(text.clone()));
    }
    section.insert("modules".into(), Json::Object(modules));
    let mut data = loaded.data.unwrap_or(Json::Null);
    if let Some(over) = section.remove("data") {
        if data.is_null() {
            data = over;
        } else {
            merge(&mut data, &over);
        }
    }
    if !data.is_null() {
        section.insert("data".into(), data);
    }
    Ok(())
}

/// `state.token_env` (an environment variable) or `state.token_file` (a file, trimmed) become
/// `state.token`: the settings file can be committed without the secret.
fn resolve_token(state: &mut Map<String, Json>, base: &Path) -> Result<(), String> {
    let from_env = state.remove("token_env");
    let from_file = take_path(state, "token_file", "state.token_file", base)?;
    let given = usize::from(state.contains_key("token")) + usize::from(from_env.is_some()) + usize::from(from_file.is_some());
    if given > 1 {
        return Err("state: give one of `token`, `token_env`, `token_file`".into());
    }
    if let Some(var) = from_env {
        let var = var.as_str().ok_or("state.token_env: must be the name of an environment variable")?;
        let token = std::env::var(var).map_err(|_| format!("state.token_env: the environment variable {var} is not set: export it (the service's proxy token, WARDEN_PROXY_TOKEN of warden-state)"))?;
        state.insert("token".into(), Json::String(token));
    }
    if let Some(path) = from_file {
        let token = std::fs::read_to_string(&path).map_err(|e| format!("state.token_file: {}: {e}", path.display()))?;
        state.insert("token".into(), Json::String(token.trim().to_string()));
    }
    Ok(())
}

fn pretty(v: &Json) -> Result<String, String> {
    serde_json::to_string_pretty(v).map(|s| s + "\n").map_err(|e| e.to_string())
}

fn yaml(v: &Json) -> Result<String, String> {
    yaml_serde::to_string(v).map_err(|e| e.to_string())
}

/// Write `text` to `path` through a temporary file in the same directory and a rename, so a
/// reader (Envoy watching the directory) sees the old file or the new one, never a part.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests;
