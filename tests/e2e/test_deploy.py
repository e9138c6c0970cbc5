"""Deploying it as README says: Envoy booted from `warden config --format bootstrap` (the quick
start's own settings file), and a JWKS reached through the cluster the settings name."""

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
