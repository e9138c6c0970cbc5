//! `warden oci build | push`: the filter as a Wasm OCI image, and a small client of the OCI
//! distribution API to push it.
//!
//! The image is the *OCI variant* of the Wasm image format Istio's and Envoy Gateway's fetchers
//! read (Istio's `pkg/wasm/imagefetcher.go`, `extractOCIArtifactImage`; Envoy Gateway's fetcher
//! is the same code): an OCI image manifest whose layers are exactly two, the module itself
//! uncompressed (`application/vnd.module.wasm.content.layer.v1+wasm`, so the layer's digest is
//! the module's sha256 and the layer is the module byte for byte) and a small runtime
//! description (`application/vnd.module.wasm.config.v1+json`). The manifest's own config is an
//! ordinary OCI image config (architecture `wasm`, os `wasip1`, the layers' diff ids), so
//! generic tools (skopeo, crane, registries' UIs) read it as an image. The *compat* variant (a
//! tar+gzip layer holding `/plugin.wasm`) is not produced: both fetchers accept the OCI variant,
//! whose layer can be checked against the module without unpacking anything.
//!
//! Nothing in it depends on the time or the machine: the same module gives the same digests.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ct_codecs::{Base64, Encoder};
use serde_json::{json, Value as Json};

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const IMAGE_CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const WASM_LAYER_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const WASM_CONFIG_LAYER_TYPE: &str = "application/vnd.module.wasm.config.v1+json";

#[derive(Subcommand)]
pub enum OciCommand {
    /// Package the module as a Wasm OCI image in an OCI image layout directory.
    Build(BuildArgs),
    /// Push an image layout to a registry (OCI distribution API) and print the digests to pin.
    Push(PushArgs),
}

#[derive(Args)]
pub struct BuildArgs {
    /// The module (`make build` makes it).
    #[arg(long, default_value = "target/session_warden.wasm")]
    pub wasm: PathBuf,
    /// The OCI image layout directory to write (created or replaced).
    #[arg(long, default_value = "target/oci")]
    pub out: PathBuf,
    /// The tag recorded in the layout's index (`org.opencontainers.image.ref.name`).
    #[arg(long, default_value = "latest")]
    pub tag: String,
}

#[derive(Args)]
pub struct PushArgs {
    /// The registry: `https://registry.example.com`, `http://127.0.0.1:5000` (no scheme: https).
    #[arg(long)]
    pub registry: String,
    /// The repository, e.g. `warden/session-warden`.
    #[arg(long)]
    pub repo: String,
    #[arg(long, default_value = "latest")]
    pub tag: String,
    /// The image layout `warden oci build` wrote.
    #[arg(long, default_value = "target/oci")]
    pub layout: PathBuf,
    /// User name for the registry; the password is read from WARDEN_REGISTRY_PASSWORD.
    #[arg(long)]
    pub username: Option<String>,
}

pub fn run(command: OciCommand, as_json: bool) -> Result<ExitCode, String> {
    match command {
        OciCommand::Build(a) => {
            let module = std::fs::read(&a.wasm).map_err(|e| format!("{}: {e}: build the module first (make build)", a.wasm.display()))?;
            let image = Image::new(module)?;
            image.write_layout(&a.out, &a.tag)?;
            report(as_json, &json!({"layout": a.out.display().to_string(), "tag": a.tag}), &image, None);
            Ok(ExitCode::SUCCESS)
        }
        OciCommand::Push(a) => {
            let image = Image::read_layout(&a.layout)?;
            let password = std::env::var("WARDEN_REGISTRY_PASSWORD").ok();
            if a.username.is_some() && password.is_none() {
                return Err("--username needs the password in WARDEN_REGISTRY_PASSWORD".into());
            }
            let registry = Registry::new(&a.registry, &a.repo, a.username.zip(password));
            let pushed = registry.push(&image, &a.tag)?;
            let reference = format!("{}/{}", registry.host(), a.repo);
            report(
                as_json,
                &json!({"pushed": format!("{reference}:{}", a.tag), "pin": format!("oci://{reference}@{}", pushed)}),
                &image,
                Some(&reference),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report(as_json: bool, extra: &Json, image: &Image, reference: Option<&str>) {
    let mut doc = json!({
        "manifest_digest": image.manifest_digest(),
        "module_sha256": image.module_sha256(),
        "module_bytes": image.module.len(),
    });
    if let (Some(d), Some(e)) = (doc.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    if as_json {
        println!("{doc}");
        return;
    }
    for (k, v) in extra.as_object().into_iter().flatten() {
        println!("{k:16}{}", v.as_str().unwrap_or_default());
    }
    println!("manifest digest {}", image.manifest_digest());
    println!("module sha256   {} ({} bytes)", image.module_sha256(), image.module.len());
    if let Some(r) = reference {
        let hex = image.manifest_digest().trim_start_matches("sha256:").to_string();
        println!("Istio WasmPlugin:            url: oci://{r}@{}   (sha256: {hex}, the image digest)", image.manifest_digest());
        println!("Envoy Gateway (Image):       url: {r}@{}", image.manifest_digest());
        println!("Envoy vm_config remote/HTTP: sha256: {}   (the module's)", image.module_sha256());
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hmac_sha256::Hash::hash(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// The image: its blobs (module, runtime-config layer, image config) and its manifest.
pub struct Image {
    pub module: Vec<u8>,
    wasm_config: Vec<u8>,
    config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl Image {
    pub fn new(module: Vec<u8>) -> Result<Self, String> {
        if !module.starts_with(b"\0asm") {
            return Err("not a WebAssembly module (no \\0asm header): build it with make build".into());
        }
        // The runtime description of the OCI variant: which ABI and root ids the module has.
        let wasm_config = serde_json::to_vec(&json!({"type": "envoy_proxy", "abiVersions": ["proxy_abi_version_0_2_1"], "rootIds": ["session-warden"]}))
            .map_err(|e| e.to_string())?;
        let config = serde_json::to_vec(&json!({
            "architecture": "wasm",
            "os": "wasip1",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [digest(&module), digest(&wasm_config)]},
        }))
        .map_err(|e| e.to_string())?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": IMAGE_CONFIG_TYPE, "digest": digest(&config), "size": config.len()},
            "layers": [
                {"mediaType": WASM_LAYER_TYPE, "digest": digest(&module), "size": module.len(),
                 "annotations": {"org.opencontainers.image.title": "session_warden.wasm"}},
                {"mediaType": WASM_CONFIG_LAYER_TYPE, "digest": digest(&wasm_config), "size": wasm_config.len()},
            ],
            "annotations": {"org.opencontainers.image.title": "session-warden",
                            "org.opencontainers.image.description": "Session Warden: a proxy-wasm filter for Envoy and Istio"},
        }))
        .map_err(|e| e.to_string())?;
        Ok(Self { module, wasm_config, config, manifest })
    }

    pub fn manifest_digest(&self) -> String {
        digest(&self.manifest)
    }

    pub fn module_sha256(&self) -> String {
        sha256_hex(&self.module)
    }

    fn blobs(&self) -> [&[u8]; 3] {
        [&self.module, &self.wasm_config, &self.config]
    }

    /// An OCI image layout (image-spec `image-layout.md`): `oci-layout`, `index.json`, `blobs/`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<(), String> {
        let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| err(dir, e))?;
        }
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| err(&blobs, e))?;
        for blob in self.blobs().into_iter().chain([self.manifest.as_slice()]) {
            let p = blobs.join(sha256_hex(blob));
            std::fs::write(&p, blob).map_err(|e| err(&p, e))?;
        }
        let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{
            "mediaType": MANIFEST_TYPE, "digest": self.manifest_digest(), "size": self.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}}]});
        let write = |name: &str, v: &Json| -> Result<(), String> {
            let p = dir.join(name);
            std::fs::write(&p, v.to_string()).map_err(|e| err(&p, e))
        };
        write("oci-layout", &json!({"imageLayoutVersion": "1.0.0"}))?;
        write("index.json", &index)
    }

    /// The image of a layout `write_layout` wrote (its one manifest), every blob checked
    /// against its digest.
    pub fn read_layout(dir: &Path) -> Result<Self, String> {
        let blob = |d: &str| -> Result<Vec<u8>, String> {
            let hex = d.strip_prefix("sha256:").ok_or_else(|| format!("{}: digest {d} is not sha256", dir.display()))?;
            let p = dir.join("blobs/sha256").join(hex);
            let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            if sha256_hex(&bytes) != hex {
                return Err(format!("{}: the content does not match its digest: rebuild with `warden oci build`", p.display()));
            }
            Ok(bytes)
        };
        let index_path = dir.join("index.json");
        let index: Json = std::fs::read(&index_path)
            .map_err(|e| format!("{}: {e}: write the image first with `warden oci build`", index_path.display()))
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", index_path.display())))?;
        let manifest_digest = index.pointer("/manifests/0/digest").and_then(Json::as_str).ok_or(format!("{}: no manifest", index_path.display()))?;
        let manifest_bytes = blob(manifest_digest)?;
        let manifest: Json = serde_json::from_slice(&manifest_bytes).map_err(|e| format!("manifest: {e}"))?;
        let layer = |i: usize, want: &str| -> Result<Vec<u8>, String> {
            let l = manifest.pointer(&format!("/layers/{i}")).ok_or(format!("manifest: layer {i} missing"))?;
            if l.get("mediaType").and_then(Json::as_str) != Some(want) {
                return Err(format!("manifest: layer {i} is not {want}: not an image `warden oci build` wrote"));
            }
            blob(l.get("digest").and_then(Json::as_str).unwrap_or_default())
        };
        let image = Self::new(layer(0, WASM_LAYER_TYPE)?)?;
        if image.manifest != manifest_bytes || image.wasm_config != layer(1, WASM_CONFIG_LAYER_TYPE)? {
            return Err(format!("{}: not the image `warden oci build` writes for this module: rebuild it", dir.display()));
        }
        Ok(image)
    }
}

/// A registry, spoken to over the OCI distribution API (distribution-spec, "Push"):
/// blobs by monolithic upload (`POST /v2/<name>/blobs/uploads/` then `PUT <location>?digest=`),
/// skipped when `HEAD` finds them; then the manifest by tag.
struct Registry {
    base: String,
    repo: String,
    basic: Option<String>,
    agent: ureq::Agent,
    bearer: std::cell::RefCell<Option<String>>,
}

type Response = ureq::http::Response<ureq::Body>;

impl Registry {
    fn new(url: &str, repo: &str, creds: Option<(String, String)>) -> Self {
        let base = if url.contains("://") { url.trim_end_matches('/').to_string() } else { format!("https://{}", url.trim_end_matches('/')) };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build()
            .new_agent();
        let basic = creds.and_then(|(u, p)| Base64::encode_to_string(format!("{u}:{p}")).ok()).map(|b| format!("Basic {b}"));
        Self { base, repo: repo.trim_matches('/').to_string(), basic, agent, bearer: Default::default() }
    }

    fn host(&self) -> &str {
        self.base.split_once("://").map(|(_, h)| h).unwrap_or(&self.base)
    }

    fn push(&self, image: &Image, tag: &str) -> Result<String, String> {
        for blob in image.blobs() {
            self.put_blob(blob)?;
        }
        let url = format!("{}/v2/{}/manifests/{tag}", self.base, self.repo);
        let resp = self.send("PUT", &url, Some(MANIFEST_TYPE), Some(&image.manifest))?;
        let status = resp.status().as_u16();
        let said = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
        if status != 201 {
            return Err(format!("the registry refused the manifest: {}", describe(resp)));
        }
        let ours = image.manifest_digest();
        if let Some(said) = said {
            if said != ours {
                return Err(format!("the registry stored the manifest as {said}, not {ours}: it rewrote it; pin {said} only after checking it"));
            }
        }
        Ok(ours)
    }

    fn put_blob(&self, blob: &[u8]) -> Result<(), String> {
        let d = digest(blob);
        let url = format!("{}/v2/{}/blobs/{d}", self.base, self.repo);
        if self.send("HEAD", &url, None, None)?.status().as_u16() == 200 {
            return Ok(());
        }
        let start = self.send("POST", &format!("{}/v2/{}/blobs/uploads/", self.base, self.repo), None, Some(b""))?;
        if start.status().as_u16() != 202 {
            return Err(format!("the registry refused to start an upload: {}", describe(start)));
        }
        let location = start.headers().get("location").and_then(|v| v.to_str().ok()).ok_or("the registry gave no upload location")?.to_string();
        let location = if location.starts_with('/') { format!("{}{location}", self.base) } else { location };
        let sep = if location.contains('?') { '&' } else { '?' };
        let done = self.send("PUT", &format!("{location}{sep}digest={d}"), Some("application/octet-stream"), Some(blob))?;
        if done.status().as_u16() != 201 {
            return Err(format!("the registry refused blob {d}: {}", describe(done)));
        }
        Ok(())
    }

    /// One request; on a 401, the registry's challenge is answered once (Basic, or a Bearer
    /// token from its token service, RFC 6750 / the distribution token flow) and the request
    /// repeated.
    fn send(&self, method: &str, url: &str, ctype: Option<&str>, body: Option<&[u8]>) -> Result<Response, String> {
        let resp = self.send_once(method, url, ctype, body)?;
        if resp.status().as_u16() != 401 {
            return Ok(resp);
        }
        let challenge = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        self.authenticate(&challenge)?;
        let again = self.send_once(method, url, ctype, body)?;
        if again.status().as_u16() == 401 {
            return Err(format!("the registry refused the credentials for {}: set --username and WARDEN_REGISTRY_PASSWORD", self.repo));
        }
        Ok(again)
    }

    fn send_once(&self, method: &str, url: &str, ctype: Option<&str>, body: Option<&[u8]>) -> Result<Response, String> {
        let auth = self.bearer.borrow().clone().or_else(|| self.basic.clone());
        let unreachable = |e: ureq::Error| format!("cannot reach the registry at {} ({e}): check --registry (http:// for a plain-HTTP registry)", self.base);
        let mut builder = ureq::http::Request::builder().method(method).uri(url);
        if let Some(a) = auth {
            builder = builder.header("authorization", a);
        }
        if let Some(c) = ctype {
            builder = builder.header("content-type", c);
        }
        match body {
            Some(b) => self.agent.run(builder.body(b.to_vec()).map_err(|e| e.to_string())?).map_err(unreachable),
            None => self.agent.run(builder.body(()).map_err(|e| e.to_string())?).map_err(unreachable),
        }
    }

    fn authenticate(&self, challenge: &str) -> Result<(), String> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return if self.basic.is_some() { Ok(()) } else { Err("the registry asks for a user name and password: set --username and WARDEN_REGISTRY_PASSWORD".into()) };
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(format!("the registry asks for `{scheme}` authentication, which warden oci push does not speak"));
        }
        let param = |name: &str| {
            params.split(',').filter_map(|p| p.trim().split_once('=')).find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim_matches('"').to_string())
        };
        let realm = param("realm").ok_or("the registry's Bearer challenge has no realm")?;
        let mut url = format!("{realm}?scope={}", crate::client::escape(&format!("repository:{}:pull,push", self.repo)));
        if let Some(service) = param("service") {
            url.push_str(&format!("&service={}", crate::client::escape(&service)));
        }
        let mut req = self.agent.get(&url);
        if let Some(b) = &self.basic {
            req = req.header("authorization", b);
        }
        let mut resp = req.call().map_err(|e| format!("cannot reach the registry's token service {realm}: {e}"))?;
        let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
        if resp.status().as_u16() != 200 {
            return Err(format!("the registry's token service refused ({}): set --username and WARDEN_REGISTRY_PASSWORD", resp.status()));
        }
        let doc: Json = serde_json::from_str(&text).map_err(|e| format!("the token service's answer: {e}"))?;
        let token = doc.get("token").or_else(|| doc.get("access_token")).and_then(Json::as_str).ok_or("the token service's answer has no token")?;
        *self.bearer.borrow_mut() = Some(format!("Bearer {token}"));
        Ok(())
    }
}

fn describe(mut resp: Response) -> String {
    let status = resp.status();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    format!("HTTP {status}: {}", text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_the_module_byte_for_byte_and_its_digests_are_stable() {
        let module = b"\0asm\x01\0\0\0 pretend module".to_vec();
        let a = Image::new(module.clone()).unwrap();
        let b = Image::new(module.clone()).unwrap();
        assert_eq!(a.manifest_digest(), b.manifest_digest(), "no time or machine in it");
        let m: Json = serde_json::from_slice(&a.manifest).unwrap();
        let layers = m["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "Istio's OCI variant: exactly two layers");
        assert_eq!(layers[0]["mediaType"], WASM_LAYER_TYPE);
        assert_eq!(layers[0]["digest"], format!("sha256:{}", a.module_sha256()));
        assert_eq!(layers[1]["mediaType"], WASM_CONFIG_LAYER_TYPE);

        let dir = std::env::temp_dir().join(format!("warden-oci-test-{}", std::process::id()));
        a.write_layout(&dir, "v1").unwrap();
        let back = Image::read_layout(&dir).unwrap();
        assert_eq!(back.module, module);
        assert_eq!(back.manifest_digest(), a.manifest_digest());
        // a blob edited in place is named
        std::fs::write(dir.join("blobs/sha256").join(a.module_sha256()), b"\0asm tampered").unwrap();
        assert!(Image::read_layout(&dir).err().unwrap().contains("does not match its digest"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Image::new(b"not wasm".to_vec()).is_err());
    }
}
