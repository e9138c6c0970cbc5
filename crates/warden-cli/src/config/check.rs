//! `warden config --check FILE…`: every plugin configuration in the files, validated by the
//! filter's own parser (`Warden::from_json`, what `on_configure` runs). It finds them in a plugin
//! configuration (JSON or YAML), an Istio `WasmPlugin` (`spec.pluginConfig`), an Envoy Gateway
//! `EnvoyExtensionPolicy` (`spec.wasm[].config`), and any Envoy bootstrap, listener or ECDS file
//! (the `configuration` of a `Wasm` filter named session-warden).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Deserialize;
use serde_json::Value as Json;
use warden_core::Warden;

use super::envoy::{FILTER_NAME, WASM_TYPE};

/// The documents of a file: one JSON value, or every document of a YAML stream.
pub fn documents(path: &Path) -> Result<Vec<Json>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        return serde_json::from_str(&text).map(|d| vec![d]).map_err(|e| format!("{}:{}:{}: {e}", path.display(), e.line(), e.column()));
    }
    let mut docs = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(&text) {
        let value = Json::deserialize(doc).map_err(|e| format!("{}: {e}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The plugin configurations in one document, each with where it was found.
pub fn configs_in(doc: &Json) -> Vec<(String, Result<Vec<u8>, String>)> {
    let name = doc.pointer("/metadata/name").and_then(Json::as_str).unwrap_or("?");
    match doc.get("kind").and_then(Json::as_str) {
        Some("WasmPlugin") => {
            let cfg = doc.pointer("/spec/pluginConfig").cloned().unwrap_or(Json::Null);
            return vec![(format!("WasmPlugin {name} spec.pluginConfig"), serde_json::to_vec(&cfg).map_err(|e| e.to_string()))];
        }
        Some("EnvoyExtensionPolicy") => {
            let wasms = doc.pointer("/spec/wasm").and_then(Json::as_array).cloned().unwrap_or_default();
            return wasms
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let cfg = w.get("config").cloned().unwrap_or(Json::Null);
                    (format!("EnvoyExtensionPolicy {name} spec.wasm[{i}].config"), serde_json::to_vec(&cfg).map_err(|e| e.to_string()))
                })
                .collect();
        }
        _ => {}
    }
    if doc.get("policy").is_some() && doc.get("kind").is_none() {
        return vec![("plugin configuration".into(), serde_json::to_vec(doc).map_err(|e| e.to_string()))];
    }
    let mut out = Vec::new();
    walk(doc, "", &mut out);
    out
}

/// Wasm filters named session-warden anywhere in an Envoy configuration.
fn walk(v: &Json, at: &str, out: &mut Vec<(String, Result<Vec<u8>, String>)>) {
    match v {
        Json::Object(m) => {
            let is_warden = m.get("@type").and_then(Json::as_str) == Some(WASM_TYPE)
                && [v.pointer("/config/name"), v.pointer("/config/root_id")].iter().any(|n| n.and_then(Json::as_str) == Some(FILTER_NAME));
            if is_warden {
                let value = v.pointer("/config/configuration/value");
                let bytes = match value.and_then(Json::as_str) {
                    Some(s) => Ok(s.as_bytes().to_vec()),
                    None => Err("config.configuration.value: missing (a google.protobuf.StringValue holding the plugin configuration JSON)".into()),
                };
                out.push((format!("Wasm filter at {}", if at.is_empty() { "/" } else { at }), bytes));
                return;
            }
            for (k, child) in m {
                walk(child, &format!("{at}/{k}"), out);
            }
        }
        Json::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

pub fn run(files: &[PathBuf]) -> Result<ExitCode, String> {
    let (mut found, mut bad) = (0, 0);
    for path in files {
        let mut here = 0;
        for (n, doc) in documents(path)?.iter().enumerate() {
            for (place, bytes) in configs_in(doc) {
                here += 1;
                let verdict = bytes.and_then(|b| Warden::from_json(&b).map_err(|e| format!("{}: {}", e.field, e.message.trim())));
                match verdict {
                    Ok(w) => println!("{} (document {}): {place}: valid (policy version {})", path.display(), n + 1, w.policy_version()),
                    Err(e) => {
                        bad += 1;
                        println!("{} (document {}): {place}: invalid: {e}", path.display(), n + 1);
                    }
                }
            }
        }
        if here == 0 {
            println!("{}: no plugin configuration in it", path.display());
        }
        found += here;
    }
    if found == 0 {
        return Err("no plugin configuration found in the files given".into());
    }
    println!("{found} plugin configuration(s), {bad} invalid");
    Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
}
