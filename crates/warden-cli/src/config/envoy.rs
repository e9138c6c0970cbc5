//! The Envoy side of `warden config`: the filter entry, a complete standalone bootstrap and the
//! ECDS resource file. This is the one place the project writes an Envoy configuration: the demo
//! and the end-to-end harness take theirs (or its secure connection-manager settings) from here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value as Json};

pub const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// The filter's name: the `name` and `root_id` of its plugin, and the ECDS resource name.
pub const FILTER_NAME: &str = "session-warden";
const UPSTREAM: &str = "upstream";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    /// HOST:PORT the listener binds (port 0: any free port, read back from the admin API).
    #[serde(default = "default_listen")]
    listen: String,
    /// HOST:PORT of Envoy's admin API: loopback only.
    #[serde(default = "default_admin")]
    admin: String,
    /// The service the warden protects.
    upstream: Option<Endpoint>,
    /// Every cluster the plugin configuration names (`state.cluster`, `jwks_uri.cluster`) and
    /// the module's, by name.
    #[serde(default)]
    clusters: BTreeMap<String, Endpoint>,
    #[serde(default)]
    module: Module,
    #[serde(default = "default_runtime")]
    runtime: String,
    /// Trusted proxies in front of Envoy that append to X-Forwarded-For.
    #[serde(default)]
    xff_num_trusted_hops: u32,
    /// When set, the filter's configuration is not inline: Envoy reads it from this file
    /// (extension config discovery on a watched directory) and picks up every replacement of it.
    #[serde(default)]
    ecds: Option<String>,
    /// Keep false: a VM that fails to start then refuses requests (500) instead of letting them
    /// through ungoverned (README, "fail_open and failStrategy").
    #[serde(default)]
    fail_open: bool,
}

fn default_listen() -> String {
    "0.0.0.0:10000".into()
}
fn default_admin() -> String {
    "127.0.0.1:9901".into()
}
fn default_runtime() -> String {
    "envoy.wasm.runtime.v8".into()
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Endpoint {
    Address(String),
    Full(FullEndpoint),
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct FullEndpoint {
    address: String,
    /// TLS to it, the server's certificate checked against `ca_file` for the host name.
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default = "default_ca")]
    ca_file: String,
}

fn default_ca() -> String {
    "/etc/ssl/certs/ca-certificates.crt".into()
}

impl Endpoint {
    fn full(&self) -> FullEndpoint {
        match self {
            Endpoint::Address(a) => FullEndpoint { address: a.clone(), tls: false, sni: None, ca_file: default_ca() },
            Endpoint::Full(f) => f.clone(),
        }
    }
}

/// Where Envoy gets the module: a local file, or an HTTP(S) URL with its SHA-256 (how Istio's
/// agent and Envoy Gateway hand it over), fetched through a cluster.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Module {
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    /// The cluster that serves `url` (one of `envoy.clusters`).
    #[serde(default)]
    cluster: Option<String>,
}

pub struct EnvoySettings {
    raw: Raw,
    base: PathBuf,
}

impl EnvoySettings {
    pub fn parse(raw: Json, base: &Path) -> Result<Self, String> {
        let raw: Raw = serde_json::from_value(raw).map_err(|e| format!("envoy: {e}"))?;
        Ok(Self { raw, base: base.to_path_buf() })
    }

    /// The module's `code` source.
    fn code(&self) -> Result<Json, String> {
        let m = &self.raw.module;
        match (&m.file, &m.url) {
            (Some(_), Some(_)) => Err("envoy.module: give either `file` or `url`, not both".into()),
            (_, Some(url)) => {
                let sha = m.sha256.as_deref().ok_or("envoy.module.sha256: required with `url` (sha256sum of the .wasm): Envoy refuses a module whose checksum differs")?;
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err("envoy.module.sha256: 64 hex digits (sha256sum of the .wasm)".into());
                }
                let cluster = m.cluster.as_deref().ok_or("envoy.module.cluster: required with `url`: the cluster (in envoy.clusters) that serves it")?;
                Ok(json!({"remote": {
                    "http_uri": {"uri": url, "cluster": cluster, "timeout": "10s"},
                    "sha256": sha.to_ascii_lowercase(),
                    "retry_policy": {"num_retries": 3},
                }}))
            }
            (file, None) => {
                let file = file.clone().unwrap_or_else(|| "target/session_warden.wasm".into());
                let path = self.base.join(&file);
                // Absolute when it exists, so Envoy finds it whatever its working directory.
                let path = match path.canonicalize() {
                    Ok(p) => p,
                    Err(_) => {
                        eprintln!("warden config: note: envoy.module.file {} is not on this machine (make build makes it); Envoy must find it there", path.display());
                        path
                    }
                };
                Ok(json!({"local": {"filename": path.display().to_string()}}))
            }
        }
    }

    /// The filter's `Wasm` typed config with this plugin configuration.
    pub fn wasm_config(&self, plugin: &Json) -> Result<Json, String> {
        let value = serde_json::to_string(plugin).map_err(|e| e.to_string())?;
        Ok(json!({
            "@type": WASM_TYPE,
            "config": {
                "name": FILTER_NAME,
                "root_id": FILTER_NAME,
                "fail_open": self.raw.fail_open,
                "vm_config": {"vm_id": FILTER_NAME, "runtime": self.raw.runtime, "code": self.code()?},
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value},
            }
        }))
    }

    /// The ECDS file: a discovery response with the filter as its one resource.
    pub fn ecds_resource(&self, plugin: &Json) -> Result<Json, String> {
        Ok(json!({"resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": FILTER_NAME,
            "typed_config": self.wasm_config(plugin)?,
        }]}))
    }

    /// A complete bootstrap: admin on loopback, one listener with the secure connection-manager
    /// settings, the warden (inline or from the ECDS file), the buffer filter and the router,
    /// the upstream, and every cluster the plugin configuration names.
    pub fn bootstrap(&self, plugin: &Json) -> Result<Json, String> {
        let r = &self.raw;
        let (admin_host, admin_port) = split_address(&r.admin, "envoy.admin")?;
        if !is_loopback(&admin_host) {
            return Err(format!("envoy.admin: {} is not a loopback address: Envoy's admin API can stop it and change its logging, keep it on 127.0.0.1", r.admin));
        }
        let upstream = r.upstream.as_ref().ok_or("envoy.upstream: required: HOST:PORT of the service the warden protects")?;
        if r.clusters.contains_key(UPSTREAM) {
            return Err(format!("envoy.clusters.{UPSTREAM}: the name is taken by the upstream; pick another"));
        }
        for (field, name) in referenced_clusters(plugin, r.module.url.is_some().then_some(r.module.cluster.as_deref()).flatten()) {
            if !r.clusters.contains_key(&name) {
                return Err(format!("{field} names the cluster `{name}`, which envoy.clusters does not define: add `{name}: HOST:PORT` under envoy.clusters"));
            }
        }
        let warden = match &r.ecds {
            None => json!({"name": "envoy.filters.http.wasm", "typed_config": self.wasm_config(plugin)?}),
            Some(path) => {
                let path = self.base.join(path);
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                json!({"name": FILTER_NAME, "config_discovery": {
                    "config_source": {"path_config_source": {
                        "path": path.display().to_string(),
                        "watched_directory": {"path": dir.display().to_string()},
                    }},
                    "type_urls": [WASM_TYPE],
                }})
            }
        };
        let max_body = plugin.pointer("/mcp/max_body_bytes").and_then(Json::as_u64).unwrap_or(1024 * 1024);
        let mut hcm = secure_hcm(r.xff_num_trusted_hops);
        let extra = json!({
            "@type": HCM_TYPE,
            "stat_prefix": "warden",
            "codec_type": "AUTO",
            "route_config": {"name": "local", "virtual_hosts": [{"name": UPSTREAM, "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": UPSTREAM}}]}]},
            "http_filters": [warden, buffer_filter(max_body), router()],
        });
        if let (Some(h), Some(e)) = (hcm.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                h.insert(k.clone(), v.clone());
            }
        }
        let (host, port) = split_address(&r.listen, "envoy.listen")?;
        let mut clusters = vec![cluster(UPSTREAM, &upstream.full(), "envoy.upstream")?];
        for (name, ep) in &r.clusters {
            clusters.push(cluster(name, &ep.full(), &format!("envoy.clusters.{name}"))?);
        }
        Ok(json!({
            // A node id and cluster: extension config discovery (envoy.ecds) needs them.
            "node": {"id": FILTER_NAME, "cluster": FILTER_NAME},
            "admin": {"address": socket(&admin_host, admin_port)},
            "static_resources": {
                "listeners": [{
                    "name": "warden",
                    "address": socket(&host, port),
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                }],
                "clusters": clusters,
            }
        }))
    }
}

/// The HttpConnectionManager settings a secure deployment must have in front of the warden
/// (README, "Deploying securely", says why each).
pub fn secure_hcm(xff_num_trusted_hops: u32) -> Json {
    json!({
        "normalize_path": true,
        "merge_slashes": true,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "use_remote_address": true,
        "xff_num_trusted_hops": xff_num_trusted_hops,
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
    })
}

/// Envoy's buffer filter, right after the warden: the upstream sees nothing of a request whose
/// body the warden reads (MCP, JSON POSTs), not even its headers, before the decision.
pub fn buffer_filter(max_bytes: u64) -> Json {
    json!({"name": "envoy.filters.http.buffer", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": max_bytes}})
}

fn router() -> Json {
    json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

/// Every cluster the plugin configuration calls, with the field that names it.
pub fn referenced_clusters(plugin: &Json, module_cluster: Option<&str>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(c) = plugin.pointer("/state/cluster").and_then(Json::as_str) {
        out.push(("state.cluster".to_string(), c.to_string()));
    }
    if let Some(providers) = plugin.pointer("/identity/jwt/providers").and_then(Json::as_array) {
        for (i, p) in providers.iter().enumerate() {
            if let Some(c) = p.pointer("/jwks_uri/cluster").and_then(Json::as_str) {
                out.push((format!("identity.jwt.providers[{i}].jwks_uri.cluster"), c.to_string()));
            }
        }
    }
    if let Some(c) = module_cluster {
        out.push(("envoy.module.cluster".to_string(), c.to_string()));
    }
    out
}

fn cluster(name: &str, ep: &FullEndpoint, field: &str) -> Result<Json, String> {
    let (host, port) = split_address(&ep.address, field)?;
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    let mut c = json!({
        "name": name,
        "type": if is_ip { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(&host, port)}}]}]},
    });
    if ep.tls {
        let sni = ep.sni.clone().unwrap_or_else(|| host.clone());
        c["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": sni,
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": ep.ca_file},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": sni}}],
            }},
        }});
    }
    Ok(c)
}

fn socket(host: &str, port: u16) -> Json {
    json!({"socket_address": {"address": host, "port_value": port}})
}

/// `HOST:PORT` or `[V6]:PORT`.
fn split_address(addr: &str, field: &str) -> Result<(String, u16), String> {
    let bad = || format!("{field}: `{addr}` is not HOST:PORT");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
