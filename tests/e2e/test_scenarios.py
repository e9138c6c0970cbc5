"""The "Examples and Use Cases" of ../shared/seeds/ that concern a proxy, each as a scripted
scenario through a real Envoy, the filter with the shipped policy library, and the real state
service. Each test names its seed: 000 tracking, 001 monitoring, 002 security, 003 risk,
004 attribution."""

import json
import sqlite3
import time
import uuid

import pytest
import requests

import harness as h
from conftest import API_KEY, base_config, envoy_with_state

NOW_HOUR = time.gmtime().tm_hour
# A schedule that excludes the hour the tests run in.
OFF_HOURS = [(NOW_HOUR + 2) % 24, (NOW_HOUR + 4) % 24]


@pytest.fixture(scope="module")
def stack(runtime, keys, echo, tmpdir_session):
    cfg = base_config(keys, state=h.state_config(), identity={"spiffe": {"trust_domains": ["example.org"], "trusted_xfcc_hops": ["127.0.0.1"]}})
    cfg = h.deep_merge(cfg, {"policy": {"input_headers": ["user-agent"], "data": {"warden": {"config": {
        "limits": {"max_steps": 1000, "rate_burst": 10, "max_steps_per_minute": 120, "schedules": {"night-batch": OFF_HOURS}},
        "tools": {"allow": {"scoped-agent": ["search", "ticket.*"]}},
        # Profiles speak after five recorded steps here (the shipped library waits for 50 and 3 days).
        "baseline": {"learning": {"min_steps": 5, "min_seconds": 0}},
    }}}}})
    # The test client plays the trusted front proxy that sends x-forwarded-client-cert; Envoy only
    # passes that header on from a plaintext downstream when told to (it sanitizes it by default).
    listeners = [h.listener("s", [h.wasm_filter(cfg, runtime), h.buffer_filter()], hcm={"forward_client_cert_details": "ALWAYS_FORWARD_ONLY"})]
    with envoy_with_state(tmpdir_session, "scenarios", listeners, [h.cluster("echo", echo.port)]) as stack:
        yield stack


class Agent:
    """One non-human identity working in one session."""

    def __init__(self, stack, token, sid=None, workload=None, region="eu-west", device=None):
        self.envoy, self.state = stack
        self.token, self.sid = token, sid or "s-" + uuid.uuid4().hex[:12]
        self.workload, self.region, self.device = workload, region, device

    def headers(self, token=None):
        hs = {"authorization": f"Bearer {token or self.token}", "x-session-id": self.sid, "x-client-region": self.region}
        if self.workload:
            hs["x-forwarded-client-cert"] = f"By=spiffe://example.org/gw;URI={self.workload}"
        if self.device:
            hs["x-device-id"] = self.device
        return hs

    def get(self, path="/tickets", token=None, host=None):
        hs = self.headers(token)
        if host:
            hs["host"] = host
        return requests.get(self.envoy.url("s", path), headers=hs, timeout=5)

    def tool(self, name, args=None, token=None):
        body = {"jsonrpc": "2.0", "id": uuid.uuid4().hex[:6], "method": "tools/call", "params": {"name": name, "arguments": args or {}}}
        hs = dict(self.headers(token), **{"content-type": "application/json", "mcp-session-id": self.sid})
        return requests.post(self.envoy.url("s", "/mcp"), data=json.dumps(body), headers=hs, timeout=5)

    def trail(self, n):
        view = self.state.wait_timeline(self.sid, n)
        return view, [e["record"] for e in sorted(view["timeline"], key=lambda e: e["record"]["step"])]

    def age(self, seconds):
        """Move the session's start back in the store, as time would."""
        db = sqlite3.connect(self.state.db)
        db.execute(
            "UPDATE sessions SET state = json_set(state, '$.started_at_ms', json_extract(state, '$.started_at_ms') - ?) WHERE id = ?",
            (seconds * 1000, self.sid),
        )
        db.commit()
        db.close()


def reasons(r):
    body = r.json()
    return body["error"]["data"]["reasons"] if "jsonrpc" in body else body.get("reasons")


# ---------------------------------------------------------------- 000 session tracking


def test_000_dataset_transform_ticket_is_one_governed_session(stack, keys):
    a = Agent(stack, keys.token(sub="etl-agent"))
    for tool in ["dataset.fetch", "data.transform", "ticket.update"]:
        assert a.tool(tool, {"id": 42}).status_code == 200
    _, recs = a.trail(3)
    assert [(r["step"], r["tool"], r["action"]) for r in recs] == [(1, "dataset.fetch", "allow"), (2, "data.transform", "allow"), (3, "ticket.update", "allow")]
    assert len({r["session_id"] for r in recs}) == 1


def test_000_lateral_use_of_an_api_key_is_reconstructed(stack):
    envoy, state = stack
    fp = None
    for workload in ["spiffe://example.org/ns/batch/sa/exporter", "spiffe://example.org/ns/dev/sa/laptop"]:
        a = Agent(stack, None, workload=workload)
        hs = a.headers()
        del hs["authorization"]
        hs["x-api-key"] = API_KEY
        assert requests.get(envoy.url("s", "/tickets"), headers=hs, timeout=5).status_code == 200
        _, recs = a.trail(1)
        fp = recs[0]["credential"]
        assert recs[0]["workload"] == workload
    out = h.warden_cli("sessions", "--credential", fp, "--json", url=state.url)
    assert len(json.loads(out.stdout)["sessions"]) >= 2, "both uses of the key are found by its fingerprint"


# ---------------------------------------------------------------- 001 continuous monitoring


def test_001_service_account_moving_region_mid_session_is_throttled_and_flagged(stack, keys):
    a = Agent(stack, keys.token(sub="svc-payments", scope="admin"))
    assert a.get().status_code == 200
    a.region = "ap-south"
    r = a.get("/payments/refunds")
    assert r.status_code == 429 and "region_changed" in reasons(r)
    view, recs = a.trail(2)
    assert recs[1]["signals"] == ["region_changed"] and recs[1]["risk"] > recs[1]["risk_before"]
    assert "region_changed" in view["state"]["flags"]


def learn(stack, token, n=6, path="/tickets"):
    """A first session of ordinary steps, recorded: what the subject's profile learns from."""
    a = Agent(stack, token)
    for _ in range(n):
        assert a.get(path).status_code == 200
    a.trail(n)
    return a


def test_001_an_admin_api_called_from_a_region_unusual_for_this_identity_is_throttled_and_flagged(stack, keys):
    token = keys.token(sub="svc-admin-ops", scope="admin")
    learn(stack, token, path="/api/admin/users")
    profile = json.loads(h.warden_cli("profile", "show", "svc-admin-ops", "--json", url=stack[1].url).stdout)
    assert profile["regions"]["eu-west"]["count"] >= 5.9, profile
    # A new session, from its first step in a region this account never uses: nothing changed
    # within the session, yet it is unusual for the identity.
    b = Agent(stack, token, region="sa-east")
    r = b.get("/api/admin/users")
    assert r.status_code == 429 and reasons(r) == ["region_unusual"], r.text
    view, recs = b.trail(1)
    assert recs[0]["signals"] == ["region_unusual"] and "region_unusual" in view["state"]["flags"]
    # The habitual region is still fine for the same account.
    assert Agent(stack, token).get("/api/admin/users").status_code == 200


def test_001_agent_outside_its_approved_workflow_is_refused(stack, keys):
    a = Agent(stack, keys.token(sub="scoped-agent"))
    assert a.tool("ticket.create", {"title": "x"}).status_code == 200
    r = a.tool("payments.refund", {"amount": 10_000})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == -32001 and reasons(r) == ["tool_not_allowed"]


def test_001_a_device_change_forces_revalidation(stack, keys):
    a = Agent(stack, keys.token(sub="operator-bot"), device="laptop-1")
    assert a.get().status_code == 200
    a.device = "phone-7"
    r = a.get()
    assert r.status_code == 401 and reasons(r) == ["device_changed"]
    assert 'error="insufficient_user_authentication"' in r.headers["www-authenticate"]
    assert a.get(token=keys.token(sub="operator-bot", acr="phr")).status_code == 200


def test_001_step_up_clears_the_challenge_for_the_session_and_is_in_the_trail(stack, keys):
    a = Agent(stack, keys.token(sub="vault-reader"))
    assert a.get("/secrets/db").status_code == 401
    assert a.get("/secrets/db", token=keys.token(sub="vault-reader", acr="phr")).status_code == 200
    # Back on the ordinary token: the session stays cleared for step_up.valid_seconds.
    assert a.get("/secrets/db").status_code == 200
    _, recs = a.trail(3)
    assert [(r["action"], r["step_up"]) for r in recs] == [("step_up", False), ("allow", True), ("allow", False)]


# ---------------------------------------------------------------- 002 session security


def test_002_unusual_data_extraction_terminates_the_session(stack, keys):
    token = keys.token(sub="report-exporter")
    learn(stack, token)
    a = Agent(stack, token)
    assert a.get("/bytes/3000000").status_code == 200
    # Far above what this identity's steps return: its next step ends the session.
    r = a.get()
    assert r.status_code == 403 and reasons(r) == ["data_volume"], r.text
    view, recs = a.trail(2)
    assert recs[0]["response_bytes"] == 3_000_000 and recs[1]["signals"] == ["data_volume"]
    assert view["state"]["bytes_out"] >= 3_000_000 and view["revoked_at_ms"], view["state"]
    assert a.get().json()["reasons"] == ["session_revoked"]


def test_002_repeated_failed_step_ups_terminate_the_session(stack, keys):
    a = Agent(stack, keys.token(sub="approval-bot"))
    for _ in range(3):
        r = a.get("/secrets/db")
        assert r.status_code == 401 and reasons(r) == ["sensitive_path"], r.text
    r = a.get("/tickets")
    assert r.status_code == 403 and reasons(r) == ["refusals_repeated"], r.text
    view, recs = a.trail(4)
    assert [x["action"] for x in recs] == ["step_up", "step_up", "step_up", "terminate"]
    assert view["revoked_at_ms"] and "refusals_repeated" in view["state"]["flags"]


def test_002_privileged_sessions_are_shorter(stack, keys):
    a = Agent(stack, keys.token(sub="deployer", scope="admin"))
    assert a.get().status_code == 200
    a.age(1000)  # past the privileged limit (900 s), well within the ordinary one (3600 s)
    r = a.get()
    assert r.status_code == 403 and reasons(r) == ["session_too_long"]
    assert a.get().json()["reasons"] == ["session_revoked"]


def test_002_a_token_bound_to_a_workload_is_invalidated_when_the_workload_changes(stack, keys):
    a = Agent(stack, keys.token(sub="ci-runner"), workload="spiffe://example.org/ns/ci/sa/runner")
    assert a.get().status_code == 200
    a.workload = "spiffe://example.org/ns/dev/sa/laptop"
    r = a.get()
    assert r.status_code == 403 and reasons(r) == ["workload_changed"]
    assert a.get().json()["reasons"] == ["session_revoked"]


def test_002_scope_escalation_mid_session_ends_the_session(stack, keys):
    a = Agent(stack, keys.token(sub="report-bot", scope="tickets:read"))
    assert a.get().status_code == 200
    r = a.get(token=keys.token(sub="report-bot", scope="tickets:read tickets:write"))
    assert r.status_code == 403 and reasons(r) == ["scope_escalation"]


# ---------------------------------------------------------------- 003 session-level risk


def test_003_ticketing_then_secrets_is_stepped_up(stack, keys):
    a = Agent(stack, keys.token(sub="helpdesk-agent"))
    assert a.tool("ticket.create", {"title": "printer"}).status_code == 200
    r = a.tool("secrets.read", {"name": "prod-db"})
    assert r.status_code == 401 and reasons(r) == ["secrets_after_ticketing"]
    _, recs = a.trail(2)
    assert recs[1]["signals"] == ["secrets_after_ticketing"] and recs[1]["risk"] == 30


def test_003_high_volume_calls_raise_risk_are_throttled_then_terminated(stack, keys):
    a = Agent(stack, keys.token(sub="scraper-svc"))
    codes = []
    while len(codes) < 60 and (not codes or codes[-1] != 403):
        codes.append((r := a.get()).status_code)
    first = codes.index(429)
    assert first >= 10 and all(c == 200 for c in codes[:first]), codes
    # It keeps hammering while throttled: each step adds risk until the session is terminated.
    assert codes[-1] == 403 and reasons(r) == ["risk_critical"], codes
    _, recs = a.trail(len(codes))
    risks = [rec["risk"] for rec in recs]
    assert risks[first] > 0 and risks == sorted(risks) and risks[-1] >= 95
    assert a.get().json()["reasons"] == ["session_revoked"]


def test_003_calls_across_unfamiliar_tenants_raise_the_risk_then_require_a_step_up(stack, keys):
    a = Agent(stack, keys.token(sub="fanout-agent"))
    tenants = [f"tenant-{i}.example" for i in range(1, 7)]
    codes = [a.get(host=t).status_code for t in tenants]
    # Three tenants are fine; each further one it has never called adds risk, until step-up.
    assert codes == [200] * 5 + [401], codes
    _, recs = a.trail(6)
    assert [r["signals"] for r in recs] == [[]] * 3 + [["tenant_spread"]] * 3
    risks = [r["risk"] for r in recs]
    assert risks[:3] == [0, 0, 0] and risks[3] < risks[4] < risks[5] and risks[5] >= 59, risks
    assert recs[5]["reasons"] == ["risk_high"] and "tenant_spread" in recs[5]["flags"]


def test_003_a_delegated_session_that_touched_secrets_is_shortened(stack, keys):
    token = keys.token(sub="user-1", act={"sub": "research-agent"}, acr="phr")
    a = Agent(stack, token)
    assert a.tool("secrets.read", {"name": "k"}).status_code == 200
    a.age(700)  # past the delegated-sensitive limit (600 s)
    r = a.get()
    assert r.status_code == 403 and reasons(r) == ["session_too_long"]


def test_003_automation_outside_its_schedule_must_revalidate(stack, keys):
    a = Agent(stack, keys.token(sub="night-batch"))
    r = a.get()
    assert r.status_code == 401 and reasons(r) == ["outside_schedule"]


def test_003_privilege_escalation_inside_a_session_gets_a_new_decision(stack, keys):
    a = Agent(stack, keys.token(sub="ops-bot", scope="tickets:read"))
    assert a.get().status_code == 200
    r = a.get("/tickets/write/9", token=keys.token(sub="ops-bot", scope="tickets:read tickets:write"))
    assert r.status_code == 403 and reasons(r) == ["scope_escalation"]


# ---------------------------------------------------------------- 004 session attribution


def test_004_which_account_from_which_workload_host_and_device_when(stack, keys):
    a = Agent(stack, keys.token(sub="case-reader"), workload="spiffe://example.org/ns/cjis/sa/reader", device="host-17")
    before = int(time.time() * 1000)
    assert a.get("/cases/2024-118").status_code == 200
    _, (rec,) = a.trail(1)
    assert rec["subject"] == "case-reader" and rec["path"] == "/cases/2024-118"
    assert rec["workload"] == "spiffe://example.org/ns/cjis/sa/reader" and rec["device"] == "host-17"
    assert rec["source_address"].startswith("127.0.0.1:")
    assert before - 1000 <= rec["at_ms"] <= int(time.time() * 1000)
    assert rec["credential"].startswith("sha256:") and rec["status"] == 200 and rec["trace_id"]


def test_004_a_brokered_agent_call_keeps_its_delegation_chain(stack, keys):
    a = Agent(stack, keys.token(sub="alice", act={"sub": "planner-agent", "act": {"sub": "broker"}}))
    assert a.tool("search", {"q": "x"}).status_code == 200
    _, (rec,) = a.trail(1)
    assert rec["subject"] == "alice" and rec["delegation"] == ["planner-agent", "broker"]


def test_004_a_shared_account_is_told_apart_by_workload(stack, keys):
    envoy, state = stack
    token = keys.token(sub="shared-job")
    wl_a, wl_b = "spiffe://example.org/ns/jobs/sa/nightly", "spiffe://example.org/ns/jobs/sa/adhoc"
    a, b = Agent(stack, token, workload=wl_a), Agent(stack, token, workload=wl_b)
    assert a.get().status_code == 200 and b.get().status_code == 200
    a.trail(1)
    b.trail(1)
    found = json.loads(h.warden_cli("sessions", "--workload", wl_b, "--json", url=state.url).stdout)["sessions"]
    assert [s["id"] for s in found] == [b.sid]
