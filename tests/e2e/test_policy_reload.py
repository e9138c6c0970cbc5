"""Policy changes without a restart and without dropped requests: Envoy reads the filter's
configuration from a watched file (extension config discovery, ECDS, the way Istio pushes a
WasmPlugin change), `warden config --format ecds --out FILE` replaces it atomically, and steady
traffic flows through the change. A configuration the filter refuses is refused by Envoy while
the old one keeps serving. And what `fail_open` does when the VM cannot start."""

import json
import subprocess
import threading
import time
import uuid

import pytest
import requests

import harness as h

DEMO_KEY = "demo-key-0123456789"
KEY_SHA = "507636717dd889c4aca6e55fac6880c0e096f0160c1c940da0564f39301c6537"
ECDS_STATS = "extension_config_discovery.http_filter.session-warden"


def settings(ecds_file, echo_port, state_port, forbidden: list[str]) -> dict:
    return {
        # The limits module is off: one session takes hundreds of steps here.
        "policy": {"dir": str(h.ROOT / "policies"),
                   "data": {"warden": {"config": {"modules": {"limits": False}, "forbidden_paths": forbidden}}}},
        "identity": {"api_keys": {"keys": [{"sha256": KEY_SHA, "subject": "reload-client", "scopes": ["tickets:read"]}]}},
        "state": {"cluster": "warden-state", "mode": "sync", "token_env": "WARDEN_PROXY_TOKEN", "flush_interval_ms": 100},
        "envoy": {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "upstream": f"127.0.0.1:{echo_port}",
                  "clusters": {"warden-state": f"127.0.0.1:{state_port}"}, "module": {"file": str(h.WASM)},
                  "ecds": str(ecds_file)},
    }


def write_ecds(path, s: dict) -> str:
    """`warden config --format ecds --out PATH` (an atomic rename); returns the policy version."""
    f = path.parent / f"settings-{uuid.uuid4().hex[:6]}.json"
    f.write_text(json.dumps(s))
    out = subprocess.run([str(h.CLI_BIN), "config", "--settings", str(f), "--format", "ecds", "--out", str(path)],
                         capture_output=True, text=True, timeout=60, env={"WARDEN_PROXY_TOKEN": h.PROXY_TOKEN, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stderr.split("policy version ")[1].split(",")[0]


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Traffic(threading.Thread):
    """Requests one after another in one session, every answer kept, until stopped."""

    def __init__(self, url: str, sid: str):
        super().__init__(daemon=True)
        self.url, self.sid = url, sid
        self.results: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self):
        s = requests.Session()
        while not self.halt.is_set():
            try:
                r = s.get(self.url, headers={"x-api-key": DEMO_KEY, "x-session-id": self.sid}, timeout=5)
                self.results.append((r.status_code, r.headers.get("x-warden-decision", "")))
            except requests.RequestException as e:
                self.errors.append(repr(e))

    def stop(self):
        self.halt.set()
        self.join(timeout=10)


@pytest.fixture()
def stack(tmp_path, echo):
    state = h.StateService(tmp_path / "reload.db")
    ecds = tmp_path / "ecds" / "session-warden.json"
    ecds.parent.mkdir()
    envoy = None
    try:
        v1 = write_ecds(ecds, settings(ecds, echo.port, state.port, ["/admin"]))
        boot = h.warden_config(settings(ecds, echo.port, state.port, ["/admin"]), "bootstrap", env={"WARDEN_PROXY_TOKEN": h.PROXY_TOKEN})
        envoy = h.Envoy(boot).wait_ready()
        yield envoy, state, ecds, v1
    finally:
        if envoy:
            envoy.stop()
        state.stop()


def test_a_new_policy_version_is_picked_up_under_steady_traffic_with_no_request_failing(stack, echo):
    """One session's requests, one after another, while the configuration file is replaced:
    every request is answered 200, the trail holds every step (the replaced configuration
    sends the records still queued in it before it lets go), each decided by v1 up to one step
    and by v2 from it on; and v2 is in force (it forbids /exports, which v1 allowed)."""
    envoy, state, ecds, v1 = stack
    sid = "reload-" + uuid.uuid4().hex[:10]
    probe = envoy.url("warden", "/exports/q3")
    assert requests.get(probe, headers={"x-api-key": DEMO_KEY}, timeout=5).status_code == 200, "v1 allows /exports"

    traffic = Traffic(envoy.url("warden", "/tickets"), sid)
    traffic.start()
    try:
        wait_for(lambda: len(traffic.results) >= 30, what="traffic before the change")
        before = stat(envoy, "config_reload")
        v2 = write_ecds(ecds, settings(ecds, echo.port, state.port, ["/admin", "/exports"]))
        assert v2 != v1
        wait_for(lambda: stat(envoy, "config_reload") > before, what="Envoy to load the new configuration")
        n = len(traffic.results)
        wait_for(lambda: len(traffic.results) >= n + 30, what="traffic after the change")
    finally:
        traffic.stop()
    assert requests.get(probe, headers={"x-api-key": DEMO_KEY}, timeout=5).status_code == 403, "v2 forbids /exports"
    assert not traffic.errors, traffic.errors[:3]
    assert {s for s, _ in traffic.results} == {200}, "no request failed"

    # The trail: a record for every step, by v1 up to one step and by v2 from it on.
    view = state.wait_complete_timeline(sid, len(traffic.results))
    records = sorted((e["record"] for e in view["timeline"]), key=lambda r: r["step"])
    assert [r["step"] for r in records] == list(range(1, len(traffic.results) + 1))
    assert [r["decision_id"] for r in records] == [d for _, d in traffic.results], "in the order they were answered"
    versions = [r["policy_version"] for r in records]
    first_v2 = versions.index(v2)
    assert set(versions[:first_v2]) == {v1} and set(versions[first_v2:]) == {v2}, "the version switches at one step"
    assert envoy.stats("records").get("wasmcustom.warden.records.dropped", 0) == 0
    print(f"{len(versions)} requests, policy {v1} -> {v2} at step {first_v2 + 1}, none failed, every step in the trail")


def stat(envoy, name: str) -> int:
    return envoy.stats(ECDS_STATS).get(f"{ECDS_STATS}.{name}", 0)


def test_a_configuration_the_filter_refuses_is_refused_and_the_old_one_keeps_serving(stack, echo):
    """A file `warden config` would never write (it validates first): invalid Rego, put there by
    hand. Envoy asks the filter, on_configure refuses it, Envoy rejects the update
    (`config_fail`, `update_rejected`) and every request is still decided by the old policy."""
    envoy, state, ecds, v1 = stack
    bad = json.loads(ecds.read_text())
    cfg = bad["resources"][0]["typed_config"]["config"]
    plugin = json.loads(cfg["configuration"]["value"])
    plugin["policy"]["modules"]["session.rego"] += "\nthis is not rego {"
    cfg["configuration"]["value"] = json.dumps(plugin)
    sid = "refused-" + uuid.uuid4().hex[:10]
    fail, rejected = stat(envoy, "config_fail"), stat(envoy, "update_rejected")
    traffic = Traffic(envoy.url("warden", "/tickets"), sid)
    traffic.start()
    try:
        wait_for(lambda: len(traffic.results) >= 20, what="traffic before the change")
        tmp = ecds.parent / ".bad.tmp"
        tmp.write_text(json.dumps(bad))
        tmp.rename(ecds)
        wait_for(lambda: stat(envoy, "config_fail") > fail, what="Envoy to refuse the configuration")
        n = len(traffic.results)
        wait_for(lambda: len(traffic.results) >= n + 20, what="traffic after the refusal")
    finally:
        traffic.stop()
    assert stat(envoy, "update_rejected") == rejected + 1
    log = envoy.log()
    assert "session-warden: invalid configuration: policy: module session.rego" in log
    assert "Filesystem config update rejected: Unable to create Wasm plugin session-warden" in log
    assert not traffic.errors and {s for s, _ in traffic.results} == {200}
    view = state.wait_complete_timeline(sid, len(traffic.results))
    assert {e["record"]["policy_version"] for e in view["timeline"]} == {v1}, "the old policy decided every step"


# ---------------------------------------------------------------- when the VM cannot start


def static_bootstrap(echo, plugin: dict, fail_open: bool, **module) -> dict:
    clusters = module.pop("clusters", {})
    s = {"policy": {"modules": {"allow.rego": 'package warden.session\nimport rego.v1\ndefault decision := {"action": "allow"}'}},
         "identity": {"allow_anonymous": True},
         "envoy": {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "upstream": f"127.0.0.1:{echo.port}",
                   "module": module or {"file": str(h.WASM)}, "fail_open": fail_open, "clusters": clusters}}
    boot = h.warden_config(s, "bootstrap")
    cfg = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]["config"]
    if plugin:
        cfg["configuration"]["value"] = json.dumps(plugin)
    return boot


BAD_PLUGIN = {"policy": {"modules": {"p.rego": "package warden.session\nthis is not rego {"}}}


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_configuration_refused_at_start_stops_envoy_whatever_fail_open_says(echo, fail_open):
    """on_configure refusing a static configuration: Envoy refuses the whole bootstrap and
    exits, with fail_open false and true alike (fail_open is about a VM that fails, not a
    configuration the filter refuses)."""
    with h.Envoy(static_bootstrap(echo, BAD_PLUGIN, fail_open)) as e:
        with pytest.raises(h.EnvoyError):
            e.wait_ready(timeout=15)
        assert e.wait_exit(timeout=10) != 0
        assert "Unable to create Wasm plugin session-warden" in e.log()


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_first_ecds_configuration_refused_leaves_the_route_answering_500(echo, tmp_path, fail_open):
    """Through ECDS, a first configuration the filter refuses: the listener is up, the update
    is rejected, and with no configuration at all the filter answers 500 to everything (with
    fail_open false and true): nothing passes ungoverned."""
    ecds = tmp_path / "ecds" / "session-warden.json"
    ecds.parent.mkdir()
    s = {"policy": {"modules": {"allow.rego": 'package warden.session\nimport rego.v1\ndefault decision := {"action": "allow"}'}},
         "identity": {"allow_anonymous": True},
         "envoy": {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "upstream": f"127.0.0.1:{echo.port}",
                   "module": {"file": str(h.WASM)}, "fail_open": fail_open, "ecds": str(ecds)}}
    res = h.warden_config(s, "ecds")
    res["resources"][0]["typed_config"]["config"]["configuration"]["value"] = json.dumps(BAD_PLUGIN)
    ecds.write_text(json.dumps(res))
    seen = len(echo.requests)
    with h.Envoy(h.warden_config(s, "bootstrap")) as e:
        e.wait_ready()
        assert requests.get(e.url("warden", "/x"), timeout=5).status_code == 500
        assert stat(e, "config_fail") == 1
    assert len(echo.requests) == seen


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_module_that_cannot_be_loaded_fails_closed_only_with_fail_open_false(echo, fail_open):
    """The one case fail_open decides: the VM cannot be created (here: the module's checksum
    is wrong). fail_open false: 503, nothing reaches the upstream. fail_open true: requests go
    through ungoverned (no x-warden-* stamps). Ship fail_open false (Istio: FAIL_CLOSE)."""
    served = h.Server(type("M", (h._Quiet,), {"do_GET": lambda self: self._send(200, h.WASM.read_bytes(), "application/wasm")}))
    try:
        boot = static_bootstrap(echo, {}, fail_open, url="http://modules.test/session_warden.wasm", sha256="0" * 64,
                                cluster="modules", clusters={"modules": f"127.0.0.1:{served.port}"})
        seen = len(echo.requests)
        with h.Envoy(boot) as e:
            e.wait_ready()
            r = requests.get(e.url("warden", "/x"), timeout=5)
            if fail_open:
                assert r.status_code == 200 and "x-warden-decision" not in r.headers
                assert not any(k.startswith("x-warden-") for k in r.json()["headers"]), "ungoverned"
            else:
                assert r.status_code == 503 and len(echo.requests) == seen
    finally:
        served.stop()
