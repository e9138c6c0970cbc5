use std::path::Path;

use serde_json::json;

use super::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn settings() -> Json {
    json!({
        "mode": "shadow",
        "policy": {"dir": "policies", "data": {"warden": {"config": {"limits": {"max_steps": 7}}}}},
        "identity": {"jwt": {"providers": [{"name": "idp", "issuer": "https://idp.test",
            "jwks_uri": {"cluster": "idp", "path": "/jwks.json"}}]}},
        "state": {"cluster": "warden-state", "token_env": "WARDEN_CONFIG_TEST_TOKEN"},
        "envoy": {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "upstream": "127.0.0.1:8080",
            "clusters": {"warden-state": "127.0.0.1:7070", "idp": {"address": "idp.test:443", "tls": true}}},
    })
}

#[test]
fn a_policy_directory_and_settings_become_the_plugin_configuration_the_filter_accepts() {
    std::env::set_var("WARDEN_CONFIG_TEST_TOKEN", "proxy-token-0123456789");
    let built = resolve(settings(), &root(), None).unwrap();
    let p = &built.plugin;
    assert_eq!(p["state"]["token"], "proxy-token-0123456789");
    assert!(p["state"].get("token_env").is_none());
    assert!(p["policy"].get("dir").is_none());
    assert!(p["policy"]["modules"]["session.rego"].as_str().unwrap().contains("package warden.session"));
    assert!(p["policy"]["modules"].as_object().unwrap().keys().all(|k| !k.ends_with("_test.rego") && !k.contains('/')));
    // data.json with the settings' data merged over it
    assert_eq!(p["policy"]["data"]["warden"]["config"]["limits"]["max_steps"], 7);
    assert!(p["policy"]["data"]["warden"]["config"]["actions"].is_object());
    assert!(p.get("envoy").is_none());
    // the version is the one `warden policy check` gives the directory's policy
    let dir = PolicyDir::load(&root().join("policies")).unwrap();
    let mut data = dir.data.clone().unwrap();
    merge(&mut data, &json!({"warden": {"config": {"limits": {"max_steps": 7}}}}));
    assert_eq!(built.version, dir.compile_with_data(Some(&data), warden_core::policy::DEFAULT_ENTRYPOINT).unwrap().version);
}

#[test]
fn a_bootstrap_has_the_secure_listener_the_filter_and_every_named_cluster() {
    std::env::set_var("WARDEN_CONFIG_TEST_TOKEN", "proxy-token-0123456789");
    let built = resolve(settings(), &root(), None).unwrap();
    let b = built.envoy().unwrap().bootstrap(&built.plugin).unwrap();
    assert_eq!(b["admin"]["address"]["socket_address"]["address"], "127.0.0.1");
    let hcm = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    for (k, v) in envoy::secure_hcm(0).as_object().unwrap() {
        assert_eq!(&hcm[k], v, "{k}");
    }
    let names: Vec<&str> = hcm["http_filters"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["envoy.filters.http.wasm", "envoy.filters.http.buffer", "envoy.filters.http.router"]);
    let wasm = &hcm["http_filters"][0]["typed_config"]["config"];
    assert_eq!(wasm["fail_open"], false);
    let value: Json = serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(value, built.plugin);
    let clusters: Vec<&str> = b["static_resources"]["clusters"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(clusters, ["upstream", "idp", "warden-state"]);
    let idp = &b["static_resources"]["clusters"][1];
    assert_eq!(idp["type"], "STRICT_DNS");
    assert_eq!(idp["transport_socket"]["typed_config"]["sni"], "idp.test");
}

#[test]
fn mistakes_are_named_with_what_to_do() {
    std::env::set_var("WARDEN_CONFIG_TEST_TOKEN", "proxy-token-0123456789");
    let mut s = settings();
    s["mode"] = json!("loud");
    let e = resolve(s, &root(), None).err().unwrap();
    assert!(e.contains("mode: unknown variant `loud`"), "{e}");

    let mut s = settings();
    s["envoy"]["clusters"].as_object_mut().unwrap().remove("idp");
    let built = resolve(s, &root(), None).unwrap();
    let e = built.envoy().unwrap().bootstrap(&built.plugin).err().unwrap();
    assert!(e.contains("identity.jwt.providers[0].jwks_uri.cluster names the cluster `idp`") && e.contains("add `idp: HOST:PORT`"), "{e}");

    let mut s = settings();
    s["envoy"]["admin"] = json!("0.0.0.0:9901");
    let built = resolve(s, &root(), None).unwrap();
    assert!(built.envoy().unwrap().bootstrap(&built.plugin).err().unwrap().contains("not a loopback address"));

    let mut s = settings();
    s["state"]["token_env"] = json!("WARDEN_CONFIG_TEST_UNSET");
    assert!(resolve(s, &root(), None).err().unwrap().contains("WARDEN_CONFIG_TEST_UNSET is not set"));

    let mut s = settings();
    s["policy"]["dir"] = json!("no-such-dir");
    assert!(resolve(s, &root(), None).err().unwrap().starts_with("policy.dir: "));
}

#[test]
fn ecds_bootstraps_read_the_filter_from_a_watched_file() {
    std::env::set_var("WARDEN_CONFIG_TEST_TOKEN", "proxy-token-0123456789");
    let mut s = settings();
    s["envoy"]["ecds"] = json!("/etc/envoy/warden/filter.json");
    let built = resolve(s, &root(), None).unwrap();
    let e = built.envoy().unwrap();
    let b = e.bootstrap(&built.plugin).unwrap();
    let f = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0];
    assert_eq!(f["name"], "session-warden");
    assert_eq!(f["config_discovery"]["config_source"]["path_config_source"]["watched_directory"]["path"], "/etc/envoy/warden");
    let r = e.ecds_resource(&built.plugin).unwrap();
    assert_eq!(r["resources"][0]["name"], "session-warden");
    // what --check finds in either
    assert_eq!(check::configs_in(&r).len(), 1);
    assert_eq!(check::configs_in(&built.wasm_plugin_for_test()).len(), 1);
}

#[test]
fn set_overrides_one_value_by_its_path() {
    let mut s = settings();
    apply_set(&mut s, "envoy.upstream=10.0.0.7:8080").unwrap();
    apply_set(&mut s, "envoy.clusters.warden-state=127.0.0.1:17070").unwrap();
    apply_set(&mut s, "state.timeout_ms=500").unwrap();
    apply_set(&mut s, "mcp.paths=[/mcp, /rpc]").unwrap();
    assert_eq!(s["envoy"]["upstream"], "10.0.0.7:8080");
    assert_eq!(s["envoy"]["clusters"]["warden-state"], "127.0.0.1:17070");
    assert_eq!(s["state"]["timeout_ms"], 500);
    assert_eq!(s["mcp"]["paths"], json!(["/mcp", "/rpc"]));
    assert!(apply_set(&mut s, "novalue").is_err());
}
