//! The manifests and settings in deploy/ can never drift from the code: every plugin
//! configuration in them goes through the filter's own parser (`warden config --check`, which
//! calls `Warden::from_json`, what `on_configure` runs), every settings file builds, and every
//! YAML document has the structure its kind needs, the cluster names the filter calls included.

// Test code: a failure to run the binary or read a file should fail loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value as Json;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root().join("deploy")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 6, "deploy/ holds the manifests: {out:?}");
    out
}

fn documents(path: &Path) -> Vec<Json> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_docs(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn serde_yaml_docs(text: &str) -> Result<Vec<Json>, String> {
    let mut docs = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(text) {
        let v = Json::deserialize(doc).map_err(|e| e.to_string())?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Settings files for `warden config` (no `kind`), and Kubernetes manifests.
fn is_settings(docs: &[Json]) -> bool {
    docs.len() == 1 && docs[0].get("kind").is_none()
}

fn warden(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(args)
        .env("WARDEN_PROXY_TOKEN", "deploy-test-proxy-token-0123456789")
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn every_plugin_configuration_in_the_manifests_is_valid_for_the_filter() {
    let manifests: Vec<PathBuf> = yaml_files().into_iter().filter(|p| !is_settings(&documents(p))).collect();
    let mut args = vec!["config".to_string(), "--check".to_string()];
    args.extend(manifests.iter().map(|p| p.display().to_string()));
    let (code, out, err) = warden(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}\n{err}");
    // Every WasmPlugin and every EnvoyExtensionPolicy wasm entry was found and checked.
    let mut expected = 0;
    for p in &manifests {
        for d in documents(p) {
            match d["kind"].as_str() {
                Some("WasmPlugin") => expected += 1,
                Some("EnvoyExtensionPolicy") => expected += d["spec"]["wasm"].as_array().unwrap().len(),
                _ => {}
            }
        }
    }
    assert!(expected >= 4);
    assert!(out.contains(&format!("{expected} plugin configuration(s), 0 invalid")), "{out}");
}

#[test]
fn a_broken_plugin_configuration_in_a_manifest_is_named() {
    let good = std::fs::read_to_string(root().join("deploy/istio/wasmplugin-1-shadow.yaml")).unwrap();
    let dir = std::env::temp_dir().join(format!("warden-deploy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, good.replace("mode: shadow", "mode: loud")).unwrap();
    let (code, out, _) = warden(&["config", "--check", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(out.contains("WasmPlugin session-warden spec.pluginConfig: invalid: mode: unknown variant `loud`"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_settings_file_builds_every_format_it_is_for() {
    let settings: Vec<PathBuf> = yaml_files().into_iter().filter(|p| is_settings(&documents(p))).collect();
    assert!(settings.len() >= 2);
    for s in settings {
        let doc = &documents(&s)[0];
        let mut formats = vec!["json", "yaml"];
        if doc.get("envoy").is_some() {
            formats.extend(["bootstrap", "ecds"]);
        }
        if doc.get("istio").is_some() {
            formats.push("istio");
        }
        for f in formats {
            let (code, out, err) = warden(&["config", "--settings", s.to_str().unwrap(), "--format", f]);
            assert_eq!(code, 0, "{} --format {f}: {err}", s.display());
            assert!(err.contains("warden config: valid (policy version"), "{err}");
            if f == "istio" {
                // what it prints is itself a manifest whose pluginConfig the filter accepts
                let docs = serde_yaml_docs(&out).unwrap();
                assert_eq!(docs[0]["kind"], "WasmPlugin");
                check_structure(&docs[0], "generated");
            }
        }
    }
}

fn req<'a>(doc: &'a Json, pointer: &str, at: &str) -> &'a Json {
    let v = doc.pointer(pointer).unwrap_or(&Json::Null);
    assert!(!v.is_null(), "{at}: {pointer} is required");
    v
}

fn hex64(v: &Json) -> bool {
    v.as_str().is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn check_structure(d: &Json, at: &str) {
    let kind = req(d, "/kind", at).as_str().unwrap();
    let api = req(d, "/apiVersion", at).as_str().unwrap().to_string();
    req(d, "/metadata/name", at);
    let at = &format!("{at}: {kind} {}", d["metadata"]["name"]);
    match kind {
        "WasmPlugin" => {
            assert_eq!(api, "extensions.istio.io/v1alpha1", "{at}");
            assert!(req(d, "/spec/url", at).as_str().unwrap().starts_with("oci://"), "{at}: url is oci://");
            assert!(hex64(req(d, "/spec/sha256", at)), "{at}: sha256 is 64 hex digits");
            assert!(["AUTHN", "AUTHZ"].contains(&req(d, "/spec/phase", at).as_str().unwrap()), "{at}: phase");
            assert!(req(d, "/spec/priority", at).is_i64(), "{at}: priority");
            assert_eq!(req(d, "/spec/failStrategy", at), "FAIL_CLOSE", "{at}");
            assert!(!req(d, "/spec/selector/matchLabels", at).as_object().unwrap().is_empty(), "{at}: per workload");
            assert!(req(d, "/spec/pluginConfig", at).is_object(), "{at}");
        }
        "EnvoyExtensionPolicy" => {
            assert_eq!(api, "gateway.envoyproxy.io/v1alpha1", "{at}");
            for t in req(d, "/spec/targetRefs", at).as_array().unwrap() {
                for k in ["group", "kind", "name"] {
                    assert!(t.get(k).is_some(), "{at}: targetRefs[].{k}");
                }
            }
            for w in req(d, "/spec/wasm", at).as_array().unwrap() {
                assert_eq!(req(w, "/code/type", at), "Image", "{at}");
                req(w, "/code/image/url", at);
                assert!(hex64(req(w, "/code/image/sha256", at)), "{at}: code.image.sha256");
                assert_eq!(w["failOpen"], false, "{at}: failOpen false");
                assert!(req(w, "/config", at).is_object(), "{at}");
            }
        }
        "EnvoyPatchPolicy" => {
            assert_eq!(api, "gateway.envoyproxy.io/v1alpha1", "{at}");
            req(d, "/spec/targetRef/name", at);
            assert_eq!(req(d, "/spec/type", at), "JSONPatch", "{at}");
            assert!(!req(d, "/spec/jsonPatches", at).as_array().unwrap().is_empty(), "{at}");
        }
        "Deployment" => {
            assert_eq!(api, "apps/v1", "{at}");
            let sel = req(d, "/spec/selector/matchLabels", at).as_object().unwrap();
            let labels = req(d, "/spec/template/metadata/labels", at).as_object().unwrap();
            assert!(sel.iter().all(|(k, v)| labels.get(k) == Some(v)), "{at}: the selector matches the pod labels");
            for c in req(d, "/spec/template/spec/containers", at).as_array().unwrap() {
                req(c, "/image", at);
                req(c, "/ports/0/containerPort", at);
            }
        }
        "Service" => {
            assert_eq!(api, "v1", "{at}");
            req(d, "/spec/selector", at);
            req(d, "/spec/ports/0/port", at);
        }
        "ServiceEntry" | "DestinationRule" => {
            assert!(api.starts_with("networking.istio.io/"), "{at}");
            req(d, if kind == "ServiceEntry" { "/spec/hosts/0" } else { "/spec/host" }, at);
        }
        "EnvoyFilter" => {
            assert!(api.starts_with("networking.istio.io/"), "{at}");
            req(d, "/spec/workloadSelector/labels", at);
            for p in req(d, "/spec/configPatches", at).as_array().unwrap() {
                req(p, "/applyTo", at);
                req(p, "/patch/operation", at);
            }
        }
        "Namespace" | "Secret" | "PersistentVolumeClaim" => assert_eq!(api, "v1", "{at}"),
        other => panic!("{at}: unexpected kind {other}: add its structure check"),
    }
}

#[test]
fn every_manifest_has_the_structure_its_kind_needs() {
    let mut kinds = BTreeSet::new();
    for p in yaml_files() {
        let docs = documents(&p);
        if is_settings(&docs) {
            continue;
        }
        for d in &docs {
            check_structure(d, &p.display().to_string());
            kinds.insert(d["kind"].as_str().unwrap().to_string());
        }
    }
    for k in ["WasmPlugin", "EnvoyExtensionPolicy", "Deployment", "Service", "ServiceEntry"] {
        assert!(kinds.contains(k), "deploy/ has a {k}");
    }
}

/// Istio names an outbound cluster `outbound|PORT||HOST`: every cluster a WasmPlugin's
/// configuration calls must be a Service or ServiceEntry of deploy/istio, on that port.
#[test]
fn the_clusters_the_istio_plugin_calls_are_services_the_manifests_define() {
    let mut known = BTreeSet::new();
    let mut plugins = Vec::new();
    for p in yaml_files().into_iter().filter(|p| p.starts_with(root().join("deploy/istio"))) {
        for d in documents(&p) {
            match d["kind"].as_str() {
                Some("Service") => {
                    let host = format!("{}.{}.svc.cluster.local", d["metadata"]["name"].as_str().unwrap(), d["metadata"]["namespace"].as_str().unwrap());
                    for port in d["spec"]["ports"].as_array().unwrap() {
                        known.insert(format!("outbound|{}||{host}", port["port"]));
                    }
                }
                Some("ServiceEntry") => {
                    for host in d["spec"]["hosts"].as_array().unwrap() {
                        for port in d["spec"]["ports"].as_array().unwrap() {
                            known.insert(format!("outbound|{}||{}", port["number"], host.as_str().unwrap()));
                        }
                    }
                }
                Some("WasmPlugin") => plugins.push((p.display().to_string(), d["spec"]["pluginConfig"].clone())),
                _ => {}
            }
        }
    }
    assert!(plugins.len() >= 3);
    for (at, cfg) in plugins {
        let mut named = vec![cfg["state"]["cluster"].as_str().unwrap().to_string()];
        for p in cfg["identity"]["jwt"]["providers"].as_array().into_iter().flatten() {
            if let Some(c) = p["jwks_uri"]["cluster"].as_str() {
                named.push(c.to_string());
            }
        }
        for c in named {
            assert!(known.contains(&c), "{at}: the cluster {c} is no Service or ServiceEntry of deploy/istio (known: {known:?})");
        }
    }
}

/// Envoy Gateway creates no cluster for the filter's calls: every cluster an
/// EnvoyExtensionPolicy's configuration calls is added by an EnvoyPatchPolicy of deploy/envoy-gateway.
#[test]
fn the_clusters_the_envoy_gateway_plugin_calls_are_patched_in() {
    let (mut added, mut named) = (BTreeSet::new(), Vec::new());
    for p in yaml_files().into_iter().filter(|p| p.starts_with(root().join("deploy/envoy-gateway"))) {
        for d in documents(&p) {
            match d["kind"].as_str() {
                Some("EnvoyPatchPolicy") => {
                    for patch in d["spec"]["jsonPatches"].as_array().unwrap() {
                        if patch["type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster" && patch["operation"]["op"] == "add" {
                            assert_eq!(patch["name"], patch["operation"]["value"]["name"]);
                            added.insert(patch["name"].as_str().unwrap().to_string());
                        }
                    }
                }
                Some("EnvoyExtensionPolicy") => {
                    for w in d["spec"]["wasm"].as_array().unwrap() {
                        let cfg = &w["config"];
                        named.extend(cfg["state"]["cluster"].as_str().map(str::to_string));
                        for p in cfg["identity"]["jwt"]["providers"].as_array().into_iter().flatten() {
                            named.extend(p["jwks_uri"]["cluster"].as_str().map(str::to_string));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    assert!(!named.is_empty());
    for c in named {
        assert!(added.contains(&c), "the cluster {c} is not added by an EnvoyPatchPolicy (added: {added:?})");
    }
}
