"""Many proxies, many state replicas, one Redis (and the same on a local 3-master Redis
Cluster): two Envoys with the filter, two warden-state replicas sharing the store, each Envoy's
`warden-state` cluster listing both replicas (health checks on /readyz, outlier detection).
A session alternating between the proxies keeps one step sequence and one trail; a revocation
through either replica stops it at both proxies; a replica killed mid-traffic or Redis
restarted (AOF, fsync always) loses no acknowledged step."""

import json
import time
import uuid
from dataclasses import dataclass

import pytest
import requests

import harness as h
from conftest import base_config


def config(keys, mode="sync", degraded=False) -> dict:
    cfg = base_config(keys, state=h.state_config(mode=mode))
    # The baseline module would (rightly) terminate a session refused again and again while its
    # store is away; these tests are about the store, so it is off.
    settings = {"limits": {"max_steps": 10_000, "rate_burst": 10_000, "max_steps_per_minute": 100_000}, "allow_degraded": degraded,
                "modules": {"baseline": False}}
    return h.deep_merge(cfg, {"policy": {"data": {"warden": {"config": settings}}}})


@dataclass
class Mesh:
    kind: str
    store: object
    replicas: list
    envoys: list


@pytest.fixture(scope="module", params=["redis", "cluster"])
def mesh(request, runtime, keys, echo, tmpdir_session):
    d = tmpdir_session / f"mesh-{request.param}-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    store = h.durable_redis(d / "redis") if request.param == "redis" else h.RedisCluster(d / "cluster")
    replicas, envoys = [], []
    try:
        for i in range(2):
            replicas.append(h.StateService(d / f"replica{i}.db", store=store.url, key=d / "log.key"))
        listeners = [
            h.listener("closed", [h.wasm_filter(config(keys), runtime)]),
            h.listener("degraded", [h.wasm_filter(config(keys, degraded=True), runtime)]),
            h.listener("cached", [h.wasm_filter(config(keys, mode="cached"), runtime)]),
        ]
        clusters = [h.cluster("echo", echo.port), h.replicas_cluster("warden-state", [r.port for r in replicas])]
        for _ in range(2):
            envoys.append(h.Envoy(h.bootstrap(listeners, clusters)).wait_ready())
        yield Mesh(request.param, store, replicas, envoys)
    finally:
        for e in envoys:
            e.stop()
        for r in replicas:
            r.stop()
        store.stop()


def send(envoy, listener, token, sid):
    return requests.get(envoy.url(listener, "/tickets"), headers={"authorization": f"Bearer {token}", "x-session-id": sid}, timeout=10)


def new_sid(prefix="mesh"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_ready(replica, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(replica.url + "/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise AssertionError(f"replica {replica.url} not ready again in {timeout}s:\n{replica.log_path.read_text()[-1500:]}")


class Agent:
    """One session on one listener of both proxies in turn; remembers the decision id of every
    step that passed a proxy (allowed, or decided in degraded mode)."""

    def __init__(self, mesh, listener, token):
        self.mesh, self.listener, self.token = mesh, listener, token
        self.sid = new_sid(listener)
        self.passed: list[str] = []
        self.decided: list[str] = []  # every step's decision id, passed or refused
        self.statuses: list[int] = []
        self.n = 0

    def step(self):
        self.n += 1
        r = send(self.mesh.envoys[self.n % 2], self.listener, self.token, self.sid)
        self.statuses.append(r.status_code)
        self.decided.append(r.headers["x-warden-decision"])
        if r.status_code == 200:
            self.passed.append(r.headers["x-warden-decision"])
        else:
            assert r.status_code == 403 and r.json()["reasons"] == ["session_state_unavailable"], r.text
        return r

    def trail_is_exact(self, replica, timeout=30, collisions=False):
        """Every step that passed is in the trail once, no more, no fewer; the chain verifies.
        With `collisions` (a phase where the service was unreachable from one proxy): every
        step that passed is once in the trail or once in the audit events, refused as
        `step_already_recorded`, and nothing else is in either but this agent's steps. A step
        decided without the service (degraded, or failed closed) is numbered by its proxy from
        what it last knew, so two proxies serving one session then can give two steps one
        number; the service keeps the first record in the trail and the other, whole, in the
        audit: refused, never lost."""
        deadline = time.time() + timeout
        ids, kept = [], []
        while time.time() < deadline:
            view = replica.session(self.sid)
            ids = [e["record"]["decision_id"] for e in view["timeline"]] if view else []
            kept = [json.loads(a["record"])["decision_id"] for a in (view or {}).get("audit", [])
                    if collisions and a["kind"] == "step_already_recorded"]
            if set(self.passed) <= set(ids + kept) and len(ids) >= len(self.passed) - len(kept):
                break
            time.sleep(0.1)
        kinds = [a["kind"] for a in (view or {}).get("audit", [])]
        what = f"{self.sid}: trail {len(ids)} records + {len(kept)} refused, {len(self.passed)} steps passed; audit {kinds}"
        if collisions:
            both = ids + kept
            assert len(set(both)) == len(both), f"a record twice: {what}"
            assert set(self.passed) <= set(both), f"a step that passed is lost: {what}"
            assert set(both) <= set(self.decided), f"a record of no step of this agent: {what}"
        else:
            assert sorted(ids) == sorted(self.passed), what
        if kept:
            print(f"{self.sid}: {len(kept)} degraded step(s) collided on a step number and were kept in the audit")
        steps = [e["record"]["step"] for e in view["timeline"]]
        assert len(set(steps)) == len(steps), f"{self.sid}: a step number twice: {steps}"
        out = h.warden_cli("session", "verify", self.sid, "--key", replica.vkey, url=replica.url)
        assert out.returncode == 0 and "trail intact" in out.stdout, out.stdout + out.stderr


def test_a_session_alternating_between_proxies_keeps_one_step_sequence_and_one_trail(mesh, keys):
    token = keys.token(sub="mesh-agent")
    sid = new_sid()
    for i in range(1, 13):
        r = send(mesh.envoys[i % 2], "closed", token, sid)
        assert r.status_code == 200, r.text
        assert r.json()["headers"]["x-warden-step"] == str(i), "one step sequence across both proxies"
    view = mesh.replicas[1].wait_timeline(sid, 12)
    assert sorted(e["record"]["step"] for e in view["timeline"]) == list(range(1, 13))
    for replica in mesh.replicas:
        out = h.warden_cli("session", "verify", sid, "--key", replica.vkey, url=replica.url)
        assert out.returncode == 0 and "trail intact (12 records" in out.stdout, out.stdout + out.stderr
    # Another subject presenting the session is refused at either proxy, and audited once per try.
    for e in mesh.envoys:
        r = send(e, "closed", keys.token(sub="intruder"), sid)
        assert r.status_code == 403 and "session_bound_to_other_subject" in r.text, r.text
    audit = mesh.replicas[0].session(sid)["audit"]
    assert [a["kind"] for a in audit] == ["subject_mismatch", "subject_mismatch"]


@pytest.mark.parametrize("mode", ["sync", "cached"])
def test_revoking_through_either_replica_stops_the_session_at_both_proxies(mesh, keys, mode):
    listener = "closed" if mode == "sync" else "cached"
    for via in mesh.replicas:
        token = keys.token(sub=f"revoked-{mode}")
        sid = new_sid(f"rv-{mode}")
        for e in mesh.envoys:
            assert send(e, listener, token, sid).status_code == 200
        revoked_at = time.monotonic()
        assert via.admin(f"/v1/sessions/{sid}/revoke", method="POST", json={"reason": "incident"}).json()["changed"] is True
        for e in mesh.envoys:
            while True:
                r = send(e, listener, token, sid)
                if r.status_code == 403:
                    break
                assert time.monotonic() - revoked_at < 1.0, f"{mode}: still allowed 1 s after the revocation"
                time.sleep(0.05)
            assert "session_revoked" in r.text, r.text
        took = time.monotonic() - revoked_at
        assert took < 1.0, f"{mode}: {took:.2f} s"
        # The feed's cursor is the same at every replica.
        feeds = [r.admin("/v1/revocations?after=0&limit=5000").json() for r in mesh.replicas]
        assert feeds[0] == feeds[1] and sid in [x["session_id"] for x in feeds[0]["revocations"]]


def test_killing_a_replica_mid_traffic_loses_no_step(mesh, keys):
    token = keys.token(sub="mesh-kill")
    closed, degraded = Agent(mesh, "closed", token), Agent(mesh, "degraded", token)
    for _ in range(6):
        closed.step()
        degraded.step()
    victim, survivor = mesh.replicas
    victim.kill()
    killed_at = time.monotonic()
    late = []  # the fail-closed agent's statuses from 1 s after the kill
    try:
        while time.monotonic() - killed_at < 2.0:
            r = closed.step()
            if time.monotonic() - killed_at > 1.0:
                late.append(r.status_code)
            degraded.step()
    finally:
        victim.start()
    wait_ready(victim)
    for _ in range(6):
        closed.step()
        degraded.step()
    assert degraded.statuses.count(200) == len(degraded.statuses), "degraded mode serves throughout"
    # The proxies move to the surviving replica: a callout carries no retry policy, so the steps
    # sent to the replica as it died fail closed, until its health check (every 0.25 s) or its
    # first failures take it out of the proxies' clusters; from then on every step is served.
    assert late and late == [200] * len(late), f"steps refused a second after the kill: {late}"
    print(f"fail-closed steps while a replica was killed: {closed.statuses.count(403)} of {len(closed.statuses)}")
    closed.trail_is_exact(survivor, collisions=True)
    degraded.trail_is_exact(victim, collisions=True)


def test_redis_restarted_mid_traffic_fails_closed_or_degrades_and_keeps_every_acknowledged_step(mesh, keys):
    token = keys.token(sub="mesh-redis")
    closed, degraded = Agent(mesh, "closed", token), Agent(mesh, "degraded", token)
    for _ in range(4):
        closed.step()
        degraded.step()
    nodes = [mesh.store] if mesh.kind == "redis" else mesh.store.nodes
    for n in nodes:
        n.kill()
    try:
        for _ in range(4):
            r = closed.step()
            assert r.status_code == 403, "fails closed while its store is gone"
            assert degraded.step().status_code == 200, "degrades while its store is gone"
    finally:
        for n in nodes:
            n.start()
    if mesh.kind == "cluster":
        mesh.store.wait_ok()
    for r in mesh.replicas:
        wait_ready(r)
    # Back: the sessions go on (the first step after may still find a replica reconnecting).
    deadline = time.time() + 15
    while closed.step().status_code != 200:
        assert time.time() < deadline, "the fail-closed agent is not served again"
        time.sleep(0.1)
    for _ in range(4):
        closed.step()
        degraded.step()
    closed.trail_is_exact(mesh.replicas[0], collisions=True)
    degraded.trail_is_exact(mesh.replicas[1], collisions=True)
