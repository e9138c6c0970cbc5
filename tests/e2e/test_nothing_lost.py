"""Hostile values through a real Envoy, the built filter and a real warden-state on SQLite: no
value a client sends can make its step invalid at the service (so no batch is refused and no
other session's step goes with it), and none can switch session binding off."""

import json
import time
import uuid

import pytest
import requests

import harness as h
from conftest import base_config, envoy_with_state

MARK = "...[sha256:"


def config(keys, degraded=False, **state):
    cfg = base_config(keys, state=h.state_config(**state), mcp={"max_body_bytes": 2 * 1024 * 1024})
    settings = {"limits": {"max_steps": 10_000, "rate_burst": 10_000, "max_steps_per_minute": 100_000}, "allow_degraded": degraded}
    return h.deep_merge(cfg, {"policy": {"data": {"warden": {"config": settings}}}})


def roomy(listener: dict) -> dict:
    """A 58 KB header is within Envoy's default 60 KiB header limit only just: the test listener
    raises it to 96 KiB (and the connection buffer to 4 MiB for a 1 MB MCP body), so what is
    tested is the filter, not Envoy's own limits."""
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["max_request_headers_kb"] = 96
    listener["per_connection_buffer_limit_bytes"] = 4 * 1024 * 1024
    return listener


@pytest.fixture(scope="module")
def stack(runtime, keys, echo, tmpdir_session):
    # Records gather for 3 s before a flush, so one batch would hold many hostile records: the
    # batches must be bounded in bytes (the default max_batch_bytes) to fit the service's limit.
    listeners = [
        roomy(h.listener("hostile", [h.wasm_filter(config(keys, flush_interval_ms=3000), runtime), h.buffer_filter(4 * 1024 * 1024)])),
        roomy(h.listener("degraded", [h.wasm_filter(config(keys, degraded=True), runtime)])),
    ]
    with envoy_with_state(tmpdir_session, "lost", listeners, [h.cluster("echo", echo.port)]) as stack:
        yield stack


def sid():
    return "nl-" + uuid.uuid4().hex[:12]


def get(envoy, listener, token, session, path="/tickets", **headers):
    hs = {"authorization": f"Bearer {token}", "x-session-id": session}
    hs.update(headers)
    return requests.get(envoy.url(listener, path), headers=hs, timeout=10)


def is_marked(value: str) -> bool:
    i = value.rfind(MARK)
    return i >= 0 and len(value) - i == len(MARK) + 17 and value.endswith("]")


def records(state, session, n) -> list[dict]:
    view = state.wait_timeline(session, n, timeout=20)
    return [e["record"] for e in view["timeline"]]


def test_hostile_values_are_decided_recorded_cut_and_nothing_else_is_lost(stack, keys):
    envoy, state = stack
    normal_token = keys.token(sub="bystander")
    bystanders = [sid() for _ in range(5)]
    sent = {s: 0 for s in bystanders}

    def bystander_step():
        s = bystanders[sum(sent.values()) % len(bystanders)]
        r = get(envoy, "hostile", normal_token, s)
        assert r.status_code == 200, r.text
        sent[s] += 1

    # A 1 MB JSON-RPC method in an MCP body (within mcp.max_body_bytes).
    mcp_sid = sid()
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "m" * 1_000_000})
    r = requests.post(
        envoy.url("hostile", "/mcp"),
        data=body,
        headers={"authorization": f"Bearer {keys.token(sub='mcp-agent')}", "x-session-id": mcp_sid, "content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code < 500, r.text
    mcp_decision = r.headers["x-warden-decision"]
    bystander_step()

    # 150 steps with a 58 KB user-agent: 9 MB of records, more than the service takes in one body.
    ua_sid, ua_token = sid(), keys.token(sub="ua-agent")
    for i in range(150):
        r = get(envoy, "hostile", ua_token, ua_sid, **{"user-agent": "u" * (58 * 1024)})
        assert r.status_code == 200, r.text
        if i % 10 == 0:
            bystander_step()

    # A 2,000-character subject in a valid token.
    long_sid, long_subject = sid(), "s" * 2000
    r = get(envoy, "hostile", keys.token(sub=long_subject), long_sid)
    assert r.status_code == 200, r.text
    bystander_step()

    # Over-long context headers, even from a trusted source, are refused where they arrive: they
    # never reach the service, so they cannot make a valid step invalid there.
    ctx_sid = sid()
    r = get(envoy, "hostile", keys.token(sub="roamer"), ctx_sid, **{"x-client-region": "r" * 5000, "x-device-id": "d" * 3000})
    assert r.status_code == 400 and r.json()["reasons"] == ["context_header_invalid"], r.text
    bystander_step()

    [mcp] = records(state, mcp_sid, 1)
    assert mcp["decision_id"] == mcp_decision
    assert is_marked(mcp["mcp_method"]) and len(mcp["mcp_method"].encode()) <= 1024
    assert set(mcp["input"]) == {"warden_input_cut"}, "a 1 MB input is kept as its size and hash"
    assert mcp["input"]["warden_input_cut"]["bytes"] > 1_000_000

    ua = records(state, ua_sid, 150)
    assert sorted(r["step"] for r in ua) == list(range(1, 151)), "every step once"
    ua_in_input = ua[0]["input"].get("request", {}).get("headers", {}).get("user-agent")
    assert ua_in_input == "u" * (58 * 1024) or set(ua[0]["input"]) == {"warden_input_cut"}

    [long] = records(state, long_sid, 1)
    assert is_marked(long["subject"]) and long["subject"].startswith("s" * 900)
    assert state.session(long_sid)["state"]["subject"] == long["subject"], "the session is bound to the cut subject"

    assert state.session(ctx_sid) is None, "a refused request took no step"

    for s in bystanders:
        got = records(state, s, sent[s])
        assert sorted(r["step"] for r in got) == list(range(1, sent[s] + 1)), f"{s}: a bystander's step is missing"

    stats = envoy.stats()
    assert stats.get("wasmcustom.warden.records.dropped", 0) == 0
    assert stats.get("wasmcustom.warden.records.rejected", 0) == 0
    assert stats.get("wasmcustom.warden.state.refused", 0) == 0
    for s in [mcp_sid, ua_sid, long_sid, *bystanders]:
        out = h.warden_cli("session", "verify", s, url=state.url)
        assert out.returncode == 0 and "trail intact" in out.stdout, out.stdout + out.stderr
    assert get(envoy, "hostile", normal_token, bystanders[0]).status_code == 200, "still live"


def test_an_intruder_with_over_long_headers_never_gets_a_degraded_allow(stack, keys):
    envoy, state = stack
    session, owner = sid(), "o" * 1500
    assert get(envoy, "degraded", keys.token(sub=owner), session).status_code == 200
    bound, refused_at_source = (403, ["session_bound_to_other_subject"]), (400, ["context_header_invalid"])
    attempts = [
        # Another subject, with context headers that once made begin-step answer 400: refused
        # where they arrive now, before any step.
        (keys.token(sub="intruder"), {"x-client-region": "r" * 5000, "x-device-id": "d" * 40_000}, refused_at_source),
        (keys.token(sub="intruder"), {"x-client-region": "eu-west"}, bound),
        # A subject equal to the owner's over the first 1,500 characters: cut alike, still another.
        (keys.token(sub=owner + "x"), {"x-client-region": "r" * 5000}, refused_at_source),
        (keys.token(sub=owner + "x"), {}, bound),
        (keys.token(sub=owner + "x", scope=" ".join(f"scope-{i}" for i in range(300))), {}, bound),
    ]
    for token, headers, (status, reasons) in attempts:
        r = get(envoy, "degraded", token, session, **headers)
        assert r.status_code == status and r.json()["reasons"] == reasons, r.text
    view = state.wait_timeline(session, 1)
    assert [a["kind"] for a in view["audit"]] == ["subject_mismatch"] * sum(1 for a in attempts if a[2] == bound)
    stats = envoy.stats()
    assert stats.get("wasmcustom.warden.state.unavailable", 0) == 0, "no attempt reached degraded mode"
    assert get(envoy, "degraded", keys.token(sub=owner), session).status_code == 200
