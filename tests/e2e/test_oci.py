"""OCI distribution: `warden oci build` packages the module as a Wasm OCI image, `warden oci push`
pushes it to a real registry on loopback (Debian's docker-registry, the CNCF distribution
server), and skopeo (Debian) reads it back: the digest printed is the registry's, and the
layer is the module byte for byte."""

import hashlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

import harness as h

REGISTRY_BIN = Path("/usr/bin/docker-registry")
REPO = "warden/session-warden"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """docker-registry serving a filesystem store under `directory`, on a free loopback port."""

    def __init__(self, directory: Path):
        if not REGISTRY_BIN.exists() or not shutil.which("skopeo"):
            pytest.fail("docker-registry or skopeo is missing: run 'make setup' (scripts/setup.sh installs both from Debian)")
        self.proc = None
        for _ in range(5):  # the port is chosen here, then bound by the registry: retried if taken meanwhile
            self.port = free_port()
            cfg = directory / "registry.yml"
            cfg.write_text(
                "version: 0.1\nlog: {level: warn}\n"
                f"storage: {{filesystem: {{rootdirectory: {directory / 'storage'}}}}}\n"
                f"http: {{addr: 127.0.0.1:{self.port}}}\n"
            )
            self.log = open(directory / "registry.log", "w")
            self.proc = subprocess.Popen([str(REGISTRY_BIN), "serve", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
            deadline = time.time() + 15
            while time.time() < deadline and self.proc.poll() is None:
                try:
                    if requests.get(f"http://127.0.0.1:{self.port}/v2/", timeout=1).status_code == 200:
                        return
                except requests.RequestException:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"docker-registry did not come up: {(directory / 'registry.log').read_text()[-2000:]}")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self):
        h.stop_process(self.proc)
        self.log.close()


@pytest.fixture()
def registry(tmp_path):
    r = Registry(tmp_path)
    yield r
    r.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([str(h.CLI_BIN), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def skopeo(*args: str) -> str:
    out = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_module_is_pushed_as_a_wasm_image_and_reads_back_byte_for_byte(registry, tmp_path):
    module = h.WASM.read_bytes()
    module_sha = hashlib.sha256(module).hexdigest()
    layout = tmp_path / "layout"
    built = json.loads(cli("--json", "oci", "build", "--wasm", str(h.WASM), "--out", str(layout), "--tag", "0.1.0").stdout)
    assert built["module_sha256"] == module_sha
    assert (layout / "blobs/sha256" / module_sha).read_bytes() == module

    pushed = json.loads(cli("--json", "oci", "push", "--registry", f"http://{registry.host}", "--repo", REPO, "--tag", "0.1.0",
                            "--layout", str(layout)).stdout)
    digest = pushed["manifest_digest"]
    assert digest == built["manifest_digest"]
    assert pushed["pin"] == f"oci://{registry.host}/{REPO}@{digest}"
    # Again: every blob is already there, nothing changes.
    again = json.loads(cli("--json", "oci", "push", "--registry", f"http://{registry.host}", "--repo", REPO, "--tag", "0.1.0",
                           "--layout", str(layout)).stdout)
    assert again["manifest_digest"] == digest

    ref = f"docker://{registry.host}/{REPO}:0.1.0"
    info = json.loads(skopeo("inspect", "--tls-verify=false", ref))
    assert info["Digest"] == digest
    assert f"sha256:{module_sha}" in info["Layers"]
    raw = json.loads(skopeo("inspect", "--tls-verify=false", "--raw", ref))
    assert [l["mediaType"] for l in raw["layers"]] == ["application/vnd.module.wasm.content.layer.v1+wasm", "application/vnd.module.wasm.config.v1+json"]
    assert raw["layers"][0]["digest"] == f"sha256:{module_sha}" and raw["layers"][0]["size"] == len(module)
    # By digest too, the way a WasmPlugin pins it.
    assert json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/{REPO}@{digest}"))["Digest"] == digest

    out = tmp_path / "copied"
    skopeo("copy", "--src-tls-verify=false", ref, f"oci:{out}:0.1.0")
    index = json.loads((out / "index.json").read_text())
    copied = index["manifests"][0]["digest"]
    assert copied == digest, "copied unchanged"
    manifest = json.loads((out / "blobs/sha256" / copied.split(":")[1]).read_bytes())
    layer = manifest["layers"][0]["digest"].split(":")[1]
    assert (out / "blobs/sha256" / layer).read_bytes() == module, "the layer is the module byte for byte"
