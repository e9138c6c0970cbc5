"""Deploying it as README says: Envoy booted from `warden config --format bootstrap` (the quick
start's own settings file), a JWKS reached through the cluster the settings name, and the module
loaded from an HTTP URL with its sha256 (how Istio's agent and Envoy Gateway hand it to Envoy),
a wrong checksum refused."""

import hashlib
import json
import subprocess
import time
import uuid

import pytest
import requests

import harness as h

QUICK_START = h.ROOT / "deploy" / "envoy" / "warden.yaml"
DEMO_KEY = "demo-key-0123456789"


def cli_bootstrap(*sets: str, settings=QUICK_START) -> dict:
    """`warden config --settings deploy/envoy/warden.yaml --format bootstrap`, the ports and the
    module path set for this machine: README's quick start, run by a test."""
    args = [str(h.CLI_BIN), "config", "--settings", str(settings), "--format", "bootstrap"]
    for s in ("envoy.listen=127.0.0.1:0", "envoy.admin=127.0.0.1:0", *sets):
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env={"WARDEN_PROXY_TOKEN": h.PROXY_TOKEN, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture()
def state(tmp_path):
    s = h.StateService(tmp_path / f"deploy-{uuid.uuid4().hex[:6]}.db")
    yield s
    s.stop()


def test_the_quick_start_bootstrap_governs_a_request_end_to_end(echo, state):
    config = cli_bootstrap(f"envoy.upstream=127.0.0.1:{echo.port}", f"envoy.clusters.warden-state=127.0.0.1:{state.port}",
                           f"envoy.module.file={h.WASM}")
    with h.Envoy(config) as envoy:
        envoy.wait_ready()
        url = envoy.url("warden", "/tickets")
        r = requests.get(url, headers={"x-api-key": DEMO_KEY}, timeout=5)
        assert r.status_code == 200, r.text
        seen = r.json()["headers"]
        assert seen["x-warden-subject"] == "demo-client"
        sid = r.headers["x-warden-session"]
        r2 = requests.get(envoy.url("warden", "/admin/users"), headers={"x-api-key": DEMO_KEY, "x-session-id": sid}, timeout=5)
        assert r2.status_code == 403 and r2.json()["reasons"] == ["path_forbidden"]
        assert requests.get(url, timeout=5).status_code == 401
        # the secure connection-manager settings are live: an escaped slash never reaches the filter
        status, _, _ = h.http1_request(envoy.ports["warden"], "GET", "/tickets%2F..%2Fadmin", {"x-api-key": DEMO_KEY})
        assert status == 400
        view = state.wait_timeline(sid, 2)
        assert [e["record"]["action"] for e in sorted(view["timeline"], key=lambda e: e["record"]["step"])] == ["allow", "deny"]


def test_a_jwks_is_fetched_through_the_cluster_the_settings_name(keys, echo, jwks_server, state):
    settings = {
        "policy": {"dir": str(h.ROOT / "policies")},
        "identity": {"jwt": {"providers": [{"name": "corp", "issuer": h.ISSUER, "audiences": [h.AUDIENCE], "algorithms": ["RS256"],
                                            "jwks_uri": {"cluster": "idp", "path": "/.well-known/jwks.json", "refresh_seconds": 5}}]}},
        "state": {"cluster": "warden-state", "mode": "cached", "token_env": "WARDEN_PROXY_TOKEN"},
        "envoy": {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "upstream": f"127.0.0.1:{echo.port}",
                  "clusters": {"warden-state": f"127.0.0.1:{state.port}", "idp": f"127.0.0.1:{jwks_server.port}"},
                  "module": {"file": str(h.WASM)}},
    }
    with h.Envoy(h.warden_config(settings, "bootstrap", env={"WARDEN_PROXY_TOKEN": h.PROXY_TOKEN})) as envoy:
        envoy.wait_ready()
        hs = {"authorization": f"Bearer {keys.token(sub='jwks-agent')}"}
        # the first fetch happens on the filter's first ticks
        deadline = time.time() + 10
        while (status := requests.get(envoy.url("warden", "/tickets"), headers=hs, timeout=5).status_code) != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert status == 200
        assert envoy.stats()["wasmcustom.warden.jwks.fetch_ok"] >= 1


class ModuleServer(h.Server):
    """Serves the module over HTTP, counting fetches."""

    def __init__(self, body: bytes):
        outer = self
        self.hits = 0

        class H(h._Quiet):
            def do_GET(self):
                outer.hits += 1
                self._send(200, body, "application/wasm")

        super().__init__(H)


@pytest.fixture()
def module_server():
    s = ModuleServer(h.WASM.read_bytes())
    yield s
    s.stop()


def remote_module_bootstrap(echo, module_server, sha256: str) -> dict:
    return cli_bootstrap(
        f"envoy.upstream=127.0.0.1:{echo.port}",
        "envoy.module.file=null",
        "envoy.module.url=http://modules.warden.test/session_warden.wasm",
        f"envoy.module.sha256={sha256}",
        "envoy.module.cluster=modules",
        f"envoy.clusters.modules=127.0.0.1:{module_server.port}",
        "state=null",  # sessions kept in the proxy: this test is about the module
    )


def test_the_module_is_loaded_from_an_http_url_with_its_sha256(echo, module_server):
    sha = hashlib.sha256(h.WASM.read_bytes()).hexdigest()
    config = remote_module_bootstrap(echo, module_server, sha)
    code = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]["config"]["vm_config"]["code"]
    assert code["remote"]["sha256"] == sha and "local" not in code
    with h.Envoy(config) as envoy:
        envoy.wait_ready()
        assert module_server.hits >= 1
        r = requests.get(envoy.url("warden", "/tickets"), headers={"x-api-key": DEMO_KEY}, timeout=5)
        assert r.status_code == 200 and r.json()["headers"]["x-warden-subject"] == "demo-client"
        assert requests.get(envoy.url("warden", "/tickets"), timeout=5).status_code == 401


def test_a_module_whose_sha256_differs_is_refused(echo, module_server):
    """What really happens (Envoy 1.40): the fetch is retried (3 retries, about 3.5 s), counted as
    a fetch failure, the plugin is not loaded, and the listener comes up failing closed: every
    request gets 503 and the upstream sees none. The module never runs."""
    wrong = hashlib.sha256(b"another module").hexdigest()
    config = remote_module_bootstrap(echo, module_server, wrong)
    seen = len(echo.requests)
    with h.Envoy(config) as envoy:
        envoy.wait_ready()
        assert module_server.hits >= 1
        stats = envoy.stats("wasm|listener_manager")
        assert stats["wasm.remote_load_fetch_failures"] == 1
        assert stats["listener_manager.total_listeners_active"] == 1
        assert "Plugin session-warden failed to load" in envoy.log()
        for path in ("/tickets", "/admin"):
            r = requests.get(envoy.url("warden", path), headers={"x-api-key": DEMO_KEY}, timeout=5)
            assert r.status_code == 503
        assert len(echo.requests) == seen, "nothing reached the upstream"
