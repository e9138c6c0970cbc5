"""The state service failing in every way it can, between a real Envoy with the built filter and
a real warden-state: outcomes as configured (fail closed, or degraded where the policy allows),
no request left hanging, and once the service is back every step that passed the proxy is in
its trail exactly once. Faults are injected by a small HTTP hop in front of the service."""

import contextlib
import http.client
import json
import time
import uuid

import pytest
import requests

import harness as h
from conftest import base_config

DEADLINE_S = 0.5  # h.state_config's timeout_ms
MARGIN_S = 1.5
BEGIN = "/v1/steps/begin"
RECORDS = "/v1/records"


class FaultHop(h.Server):
    """Forwards to the real service unless a fault is set for a path: `slow` (answers late),
    `garbage` (200 that is not JSON), `5xx`, `4xx`. When the service is down, the hop resets
    the connection, as a dead service would."""

    def __init__(self, upstream: int):
        outer = self
        self.upstream = upstream
        self.faults: dict[str, str] = {}
        self.delay_s = 1.5

        class H(h._Quiet):
            def _handle(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                fault = outer.faults.get(self.path.split("?")[0])
                if fault == "garbage":
                    return self._send(200, b"<html>not json", "text/html")
                if fault == "5xx":
                    return self._send(503, json.dumps({"error": "internal", "message": "injected"}).encode())
                if fault == "4xx":
                    return self._send(400, json.dumps({"error": "bad_request", "message": "injected refusal"}).encode())
                if fault == "slow":
                    time.sleep(outer.delay_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "content-length")}
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", outer.upstream, timeout=10)
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                except OSError:
                    self.close_connection = True
                    return
                try:
                    self._send(resp.status, data, resp.getheader("content-type") or "application/json")
                except OSError:
                    pass  # the proxy gave up waiting (a slow answer past its deadline)

            do_GET = do_POST = _handle

        super().__init__(H)


def config(keys, degraded: bool) -> dict:
    cfg = base_config(keys, state=h.state_config())
    settings = {"limits": {"max_steps": 10_000, "rate_burst": 10_000, "max_steps_per_minute": 100_000}, "allow_degraded": degraded}
    return h.deep_merge(cfg, {"policy": {"data": {"warden": {"config": settings}}}})


@pytest.fixture(scope="module")
def stack(runtime, keys, echo, tmpdir_session):
    state = h.StateService(tmpdir_session / f"faults-{uuid.uuid4().hex[:6]}.db")
    hop = envoy = None
    try:
        hop = FaultHop(state.port)
        listeners = [
            h.listener("closed", [h.wasm_filter(config(keys, degraded=False), runtime)]),
            h.listener("degraded", [h.wasm_filter(config(keys, degraded=True), runtime)]),
        ]
        envoy = h.Envoy(h.bootstrap(listeners, [h.cluster("echo", echo.port), h.cluster("warden-state", hop.port)])).wait_ready()
        yield envoy, state, hop
    finally:
        if envoy:
            envoy.stop()
        if hop:
            hop.stop()
        state.stop()


class Agent:
    """One session on one listener: sends steps, times each, and remembers the decision id of
    every step that passed the proxy (allowed, or decided by the policy in degraded mode)."""

    def __init__(self, envoy, listener: str, token: str):
        self.envoy, self.listener, self.token = envoy, listener, token
        self.sid = "ft-" + uuid.uuid4().hex[:12]
        self.passed: list[str] = []

    def step(self) -> requests.Response:
        started = time.monotonic()
        r = requests.get(
            self.envoy.url(self.listener, "/tickets"),
            headers={"authorization": f"Bearer {self.token}", "x-session-id": self.sid},
            timeout=10,
        )
        took = time.monotonic() - started
        assert took < DEADLINE_S + MARGIN_S, f"{self.listener}: a request took {took:.2f} s"
        refused_by_service = r.status_code == 403 and r.json().get("reasons") == ["session_state_refused"]
        if not refused_by_service:
            self.passed.append(r.headers["x-warden-decision"])
        return r

    def trail_is_exact(self, state):
        """Every step that passed is in the trail once: no more, no fewer."""
        view = state.wait_timeline(self.sid, len(self.passed), timeout=20)
        ids = [e["record"]["decision_id"] for e in view["timeline"]]
        assert sorted(ids) == sorted(self.passed), f"{self.sid}: trail {len(ids)} records, {len(self.passed)} steps passed"
        steps = [e["record"]["step"] for e in view["timeline"]]
        assert len(set(steps)) == len(steps), f"{self.sid}: a step number twice: {steps}"
        out = h.warden_cli("session", "verify", self.sid, url=state.url)
        assert out.returncode == 0 and "trail intact" in out.stdout, out.stdout + out.stderr


@contextlib.contextmanager
def fault(hop: FaultHop, kind: str, paths=(BEGIN, RECORDS)):
    for p in paths:
        hop.faults[p] = kind
    try:
        yield
    finally:
        hop.faults.clear()


def expect_unavailable(closed: Agent, degraded: Agent):
    r = closed.step()
    assert r.status_code == 403 and r.json()["reasons"] == ["session_state_unavailable"], r.text
    r = degraded.step()
    assert r.status_code == 200, r.text


def expect_refused(closed: Agent, degraded: Agent):
    for a in (closed, degraded):
        r = a.step()
        assert r.status_code == 403 and r.json()["reasons"] == ["session_state_refused"], r.text


@pytest.mark.parametrize("kind", ["down", "slow", "garbage", "5xx", "4xx", "restart"])
def test_a_state_service_fault(stack, keys, kind):
    envoy, state, hop = stack
    token = keys.token(sub=f"fault-{kind}")
    closed, degraded = Agent(envoy, "closed", token), Agent(envoy, "degraded", token)
    for _ in range(2):
        assert closed.step().status_code == 200
        assert degraded.step().status_code == 200
    before = envoy.stats()

    if kind == "down":
        closed.trail_is_exact(state)
        state.kill()
        try:
            for _ in range(2):
                expect_unavailable(closed, degraded)
        finally:
            state.start()
    elif kind == "restart":
        # Killed with records still queued or in flight: they arrive after the restart, once.
        state.kill()
        try:
            expect_unavailable(closed, degraded)
        finally:
            state.start()
    elif kind == "4xx":
        # A refusal of the begin-step call only: records are the service's to take.
        with fault(hop, "4xx", paths=(BEGIN,)):
            for _ in range(2):
                expect_refused(closed, degraded)
        refused = envoy.stats()["wasmcustom.warden.state.refused"] - before.get("wasmcustom.warden.state.refused", 0)
        assert refused == 4
    else:
        with fault(hop, kind):
            for _ in range(2):
                expect_unavailable(closed, degraded)

    # Back: the sessions go on where they were.
    for _ in range(2):
        assert closed.step().status_code == 200
        assert degraded.step().status_code == 200
    closed.trail_is_exact(state)
    degraded.trail_is_exact(state)
    stats = envoy.stats()
    assert stats.get("wasmcustom.warden.records.dropped", 0) == 0
    assert stats.get("wasmcustom.warden.records.rejected", 0) == 0
    if kind != "4xx":
        assert stats["wasmcustom.warden.state.unavailable"] > before.get("wasmcustom.warden.state.unavailable", 0)


def test_a_session_begun_while_the_service_was_down_keeps_its_whole_trail(stack, keys):
    """Its first steps are counted by the proxy alone (degraded): their records are the first the
    service hears of the session, and the trail's invariants take them (`begun: proxy`), then
    the steps the service counts after them."""
    envoy, state, _ = stack
    agent = Agent(envoy, "degraded", keys.token(sub="fault-first-steps"))
    before = envoy.stats()
    state.kill()
    try:
        for _ in range(3):
            assert agent.step().status_code == 200
    finally:
        state.start()
    for _ in range(2):
        assert agent.step().status_code == 200
    agent.trail_is_exact(state)
    view = state.session(agent.sid)
    begun = [(e["record"]["step"], e["record"]["begun"]) for e in sorted(view["timeline"], key=lambda e: e["record"]["step"])]
    assert begun == [(1, "proxy"), (2, "proxy"), (3, "proxy"), (4, "service"), (5, "service")], begun
    assert view["audit"] == [], view["audit"]
    stats = envoy.stats()
    assert stats.get("wasmcustom.warden.records.rejected", 0) == before.get("wasmcustom.warden.records.rejected", 0)
