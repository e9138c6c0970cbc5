"""Governed sessions through a real Envoy, the real session-state service and real SQLite."""

import sqlite3
import time
import uuid

import pytest
import requests

import harness as h
from conftest import base_config, envoy_with_state


def config_with_state(keys, mode="sync", degraded=False):
    cfg = base_config(keys, state=h.state_config(mode=mode))
    settings = {"limits": {"max_steps": 1000}, "allow_degraded": degraded}
    return h.deep_merge(cfg, {"policy": {"data": {"warden": {"config": settings}}}})


@pytest.fixture(scope="module")
def stack(runtime, keys, echo, tmpdir_session):
    listeners = [
        h.listener("sync", [h.wasm_filter(config_with_state(keys), runtime)]),
        h.listener("degraded", [h.wasm_filter(config_with_state(keys, degraded=True), runtime)]),
        h.listener("cached", [h.wasm_filter(config_with_state(keys, mode="cached"), runtime)]),
    ]
    with envoy_with_state(tmpdir_session, "state", listeners, [h.cluster("echo", echo.port)]) as stack:
        yield stack


def send(envoy, listener, token, sid, path="/tickets", **headers):
    hs = {"authorization": f"Bearer {token}", "x-session-id": sid}
    hs.update({k.replace("_", "-"): v for k, v in headers.items()})
    return requests.get(envoy.url(listener, path), headers=hs, timeout=5)


def new_sid():
    return "wf-" + uuid.uuid4().hex[:12]


def test_a_20_step_agent_workflow_is_one_ordered_session(stack, keys):
    envoy, state = stack
    sid = new_sid()
    token = keys.token(sub="ticket-agent", scope="tickets:read")
    plan = ["/tickets"] * 20
    plan[6] = "/admin/users"  # a denied step is a step too
    plan[13] = "/secrets/db"  # so is a challenged one
    statuses = []
    for i, path in enumerate(plan, start=1):
        r = send(envoy, "sync", token, sid, path)
        statuses.append(r.status_code)
        if r.status_code == 200:
            assert r.json()["headers"]["x-warden-step"] == str(i)
    assert statuses.count(200) == 18 and statuses[6] == 403 and statuses[13] == 401

    view = state.wait_timeline(sid, 20)
    steps = [e["record"]["step"] for e in view["timeline"]]
    assert sorted(steps) == list(range(1, 21)), "every step once: none lost, none duplicated"
    by_step = {e["record"]["step"]: e["record"] for e in view["timeline"]}
    for i, path in enumerate(plan, start=1):
        rec = by_step[i]
        assert rec["path"] == path and rec["subject"] == "ticket-agent"
        assert rec["status"] == statuses[i - 1]
        assert rec["decision_id"].startswith("dec_")
        assert rec["credential"].startswith("sha256:") and token not in str(rec)
    assert by_step[7]["action"] == "deny" and by_step[7]["reasons"] == ["path_forbidden"]
    assert by_step[14]["action"] == "step_up"
    assert view["state"]["steps"] == 20

    cli = h.warden_cli("session", "verify", sid, url=state.url)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "trail intact (20 records" in cli.stdout
    show = h.warden_cli("session", "show", sid, url=state.url)
    assert show.returncode == 0 and "ticket-agent" in show.stdout and "path_forbidden" in show.stdout
    found = h.warden_cli("sessions", "--subject", "ticket-agent", "--json", url=state.url)
    assert sid in found.stdout


def test_rotation_mid_session_is_recorded_at_the_right_steps(stack, keys):
    envoy, state = stack
    sid = new_sid()
    first, second = keys.token(sub="rotator"), keys.token(sub="rotator", alg="ES256")
    for t in [first, first, second, second]:
        assert send(envoy, "sync", t, sid).status_code == 200
    view = state.wait_timeline(sid, 4)
    creds = {e["record"]["step"]: e["record"]["credential"] for e in view["timeline"]}
    assert creds[1] == creds[2] != creds[3] == creds[4]
    assert view["state"]["credentials"] == [creds[1], creds[3]]


def test_another_subject_reusing_the_session_is_refused_and_audited(stack, keys):
    envoy, state = stack
    sid = new_sid()
    assert send(envoy, "sync", keys.token(sub="owner"), sid).status_code == 200
    r = send(envoy, "sync", keys.token(sub="intruder"), sid)
    assert r.status_code == 403 and r.json()["reasons"] == ["session_bound_to_other_subject"]
    view = state.wait_timeline(sid, 1)
    assert [a["kind"] for a in view["audit"]] == ["subject_mismatch"]
    assert view["audit"][0]["subject"] == "intruder"


def test_revocation_refuses_the_next_request_in_sync_mode(stack, keys):
    envoy, state = stack
    sid, token = new_sid(), keys.token(sub="revokee")
    assert send(envoy, "sync", token, sid).status_code == 200
    out = h.warden_cli("session", "revoke", sid, "--reason", "incident 7", url=state.url)
    assert out.returncode == 0, out.stderr
    r = send(envoy, "sync", token, sid)
    assert r.status_code == 403 and r.json()["reasons"] == ["session_revoked"]


def test_revocation_reaches_cached_proxies_within_a_second(stack, keys):
    envoy, state = stack
    sid, token = new_sid(), keys.token(sub="cached-agent")
    for i in range(3):
        r = send(envoy, "cached", token, sid)
        assert r.status_code == 200 and r.json()["headers"]["x-warden-step"] == str(i + 1)
    state.wait_timeline(sid, 3)
    revoked_at = time.time()
    assert h.warden_cli("session", "revoke", sid, url=state.url).returncode == 0
    while (r := send(envoy, "cached", token, sid)).status_code == 200:
        assert time.time() - revoked_at < 1.0, "a cached proxy kept serving a revoked session for over 1 s"
        time.sleep(0.02)
    assert r.status_code == 403 and r.json()["reasons"] == ["session_revoked"]
    print(f"cached proxy refused the revoked session after {1000 * (time.time() - revoked_at):.0f} ms")


def test_terminate_revokes_at_the_service(stack, keys):
    envoy, state = stack
    sid, token = new_sid(), keys.token(sub="long-runner")
    assert send(envoy, "sync", token, sid).status_code == 200
    # Age the session past max_session_seconds in the store itself, as time would.
    db = sqlite3.connect(state.db)
    db.execute("UPDATE sessions SET state = json_set(state, '$.started_at_ms', 0) WHERE id = ?", (sid,))
    db.commit()
    db.close()
    r = send(envoy, "sync", token, sid)
    assert r.status_code == 403 and r.json()["reasons"] == ["session_too_long"]
    deadline = time.time() + 5
    while not (state.session(sid) or {}).get("revoked_at_ms") and time.time() < deadline:
        time.sleep(0.05)
    assert state.session(sid)["revoke_reason"].startswith("terminated by policy")


def test_an_altered_record_fails_verification_naming_the_step(stack, keys):
    envoy, state = stack
    sid, token = new_sid(), keys.token(sub="audited-agent")
    for _ in range(5):
        assert send(envoy, "sync", token, sid).status_code == 200
    state.wait_timeline(sid, 5)
    assert h.warden_cli("session", "verify", sid, url=state.url).returncode == 0
    db = sqlite3.connect(state.db)
    changed = db.execute(
        "UPDATE records SET body = replace(body, '\"path\":\"/tickets\"', '\"path\":\"/innocent\"') WHERE session_id = ? AND step = 3", (sid,)
    ).rowcount
    db.commit()
    db.close()
    assert changed == 1
    out = h.warden_cli("session", "verify", sid, url=state.url)
    assert out.returncode == 1
    assert "TRAIL BROKEN at step 3" in out.stdout, out.stdout
    # Removing a record is caught too.
    db = sqlite3.connect(state.db)
    db.execute("DELETE FROM records WHERE session_id = ? AND step = 3", (sid,))
    db.execute("UPDATE records SET body = replace(body, '\"path\":\"/innocent\"', '\"path\":\"/tickets\"') WHERE session_id = ?", (sid,))
    db.commit()
    db.close()
    out = h.warden_cli("session", "verify", sid, url=state.url)
    assert out.returncode == 1 and "TRAIL BROKEN at step 4" in out.stdout, out.stdout


def test_state_service_down_fails_closed_degraded_is_honoured_and_history_survives(stack, keys):
    envoy, state = stack
    sid, token = new_sid(), keys.token(sub="resilient-agent")
    dsid = new_sid()
    for _ in range(2):
        assert send(envoy, "sync", token, sid).status_code == 200
        assert send(envoy, "degraded", token, dsid).status_code == 200
    state.wait_timeline(sid, 2)
    state.wait_timeline(dsid, 2)
    state.kill()
    try:
        r = send(envoy, "sync", token, sid)
        assert r.status_code == 403 and r.json()["reasons"] == ["session_state_unavailable"]
        r = send(envoy, "degraded", token, dsid)
        assert r.status_code == 200, r.text
        assert r.json()["headers"]["x-warden-step"] == "3", "degraded steps continue the session's count"
        assert envoy.stats()["wasmcustom.warden.state.unavailable"] >= 2
    finally:
        state.start()
    # The same sessions continue with their history; what happened meanwhile is in the trail.
    r = send(envoy, "sync", token, sid)
    assert r.status_code == 200 and r.json()["headers"]["x-warden-step"] == "4"
    view = state.wait_timeline(sid, 4)
    recs = sorted((e["record"]["step"], e["record"]["action"], e["record"]["degraded"]) for e in view["timeline"])
    assert recs == [(1, "allow", False), (2, "allow", False), (3, "deny", True), (4, "allow", False)]
    dview = state.wait_timeline(dsid, 3)
    assert [e["record"]["degraded"] for e in dview["timeline"]] == [False, False, True]
    assert h.warden_cli("session", "verify", sid, url=state.url).returncode == 0
