"""A real MCP client (official Python SDK) against a real MCP server behind Envoy and the
filter, in both eras of the protocol: a 2025-11-25 client session (the `initialize` handshake,
`Mcp-Session-Id`) is one governed session with one trail; a 2026-07-28 client (no protocol
session: `Mcp-Method` / `Mcp-Name` headers, `_meta` in every body) keeps its governed session
through `x-session-id` or a token claim, is refused on its headers before anything moves, and
its bodies are held to its headers."""

import asyncio
import base64
import json

import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import Implementation

import harness as h
from conftest import base_config, envoy_with_state


@pytest.fixture(scope="module")
def mcp_upstream(tmpdir_session):
    server = h.McpServer(log=tmpdir_session / "mcp-upstream.jsonl")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mcp_stack(runtime, keys, tmpdir_session, mcp_upstream):
    cfg = base_config(keys, state=h.state_config())
    allowed = ["search", "ticket.*", "secrets.*", "søk"]
    cfg = h.deep_merge(cfg, {"policy": {"data": {"warden": {"config": {
        "limits": {"max_steps": 1000},
        "tools": {"allow": {"mcp-agent": allowed, "agent-2026": allowed}},
    }}}}})
    listeners = [
        h.listener("mcp", [h.wasm_filter(cfg, runtime), h.buffer_filter()], cluster="mcp"),
        # No buffer filter: what the warden lets go reaches the upstream at once, so a refusal on
        # the headers is seen to forward nothing by itself.
        h.listener("mcp_unbuffered", [h.wasm_filter(cfg, runtime)], cluster="mcp"),
    ]
    with envoy_with_state(tmpdir_session, "mcp", listeners, [h.cluster("mcp", mcp_upstream.port)]) as stack:
        yield stack


async def agent_session(url: str, token: str) -> dict:
    seen: dict = {}
    async with httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=10) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = await session.list_tools()
                seen["tools"] = sorted(t.name for t in tools.tools)
                r = await session.call_tool("search", {"q": "printer"})
                seen["search"] = r.content[0].text
                r = await session.call_tool("ticket.create", {"title": "printer on fire"})
                seen["ticket"] = r.content[0].text
                try:
                    await session.call_tool("shell.exec", {"cmd": "rm -rf /"})
                    seen["shell"] = "ran"
                except MCPError as e:
                    seen["shell"] = e.error
                # After a ticketing workflow, secrets need a step-up (HTTP 401): the SDK reports it.
                try:
                    await session.call_tool("secrets.read", {"name": "db"})
                    seen["secrets"] = "ran"
                except MCPError as e:
                    seen["secrets"] = e.error
    return seen


def test_an_mcp_client_session_is_one_governed_session(mcp_stack, keys):
    envoy, state = mcp_stack
    token = keys.token(sub="mcp-agent")
    seen = asyncio.run(agent_session(envoy.url("mcp", "/mcp"), token))

    assert "shell.exec" in seen["tools"]
    assert seen["search"] == "3 results for printer"
    assert seen["ticket"].startswith("ticket T-1 created")
    refused = seen["shell"]
    assert refused != "ran", "the forbidden tool ran"
    assert refused.code == -32001 and "tool_not_allowed" in refused.message
    assert refused.data["reasons"] == ["tool_not_allowed"] and refused.data["decision_id"].startswith("dec_")
    assert seen["secrets"] != "ran", "secrets after a ticketing workflow must be stepped up"

    found = state.admin("/v1/sessions?subject=mcp-agent").json()["sessions"]
    assert len(found) == 1, f"one MCP session is one governed session, got {found}"
    sid = found[0]["id"]
    # The client's GET event stream is a step too; its record comes when the stream closes.
    view = state.wait_complete_timeline(sid, 7)
    steps = sorted(view["timeline"], key=lambda e: e["record"]["step"])
    methods = [(e["record"]["step"], e["record"]["mcp_method"], e["record"]["tool"], e["record"]["action"]) for e in steps]
    assert [m[0] for m in methods] == list(range(1, len(methods) + 1)), methods
    assert methods[0][1] == "initialize"
    # initialize is counted by the proxy (the server names the session in its answer); the
    # service counts the steps after it, and the trail's invariants refused nothing.
    assert [e["record"]["begun"] for e in steps[:2]] == ["proxy", "service"], [e["record"]["begun"] for e in steps]
    assert view["audit"] == []
    calls = [(m[2], m[3]) for m in methods if m[1] == "tools/call"]
    assert calls == [("search", "allow"), ("ticket.create", "allow"), ("shell.exec", "deny"), ("secrets.read", "step_up")], methods
    secrets = [e["record"] for e in steps if e["record"]["tool"] == "secrets.read"][0]
    assert "secrets_after_ticketing" in secrets["signals"] and secrets["risk"] > secrets["risk_before"]
    assert all(e["record"]["arguments_digest"].startswith("sha256:") for e in steps if e["record"]["tool"])
    assert "rm -rf" not in str(view), "tool arguments are digested, never stored"
    assert h.warden_cli("session", "verify", sid, url=state.url).returncode == 0


# --- MCP 2026-07-28: no protocol session -------------------------------------------------------

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "hand-written", "version": "0"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def keep_governed_session(http: httpx2.AsyncClient):
    """What an agent does to keep one governed session without a protocol session: the first
    answer names the session the proxy minted (`x-warden-session`); every later request sends it
    back as `x-session-id`."""

    async def hook(response):
        if "x-session-id" not in http.headers and response.headers.get("x-warden-session"):
            http.headers["x-session-id"] = response.headers["x-warden-session"]

    http.event_hooks["response"].append(hook)


async def stateless_agent(url: str, token: str, session_id: str | None = None) -> dict:
    seen: dict = {}
    headers = {"authorization": f"Bearer {token}"} | ({"x-session-id": session_id} if session_id else {})
    async with httpx2.AsyncClient(headers=headers, timeout=10) as http:
        keep_governed_session(http)
        agent = Implementation(name="warden-e2e-agent", version="2026.1")
        # "auto" probes `server/discover` and adopts 2026-07-28: no initialize, no Mcp-Session-Id.
        async with Client(streamable_http_client(url, http_client=http), mode="auto", client_info=agent) as client:
            seen["version"] = client.protocol_version
            seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
            seen["search"] = (await client.call_tool("search", {"q": "printer"})).content[0].text
            seen["ticket"] = (await client.call_tool("ticket.create", {"title": "printer on fire"})).content[0].text
            try:
                await client.call_tool("shell.exec", {"cmd": "rm -rf /"})
                seen["shell"] = "ran"
            except MCPError as e:
                seen["shell"] = e.error
        seen["session"] = http.headers.get("x-session-id")
    return seen


def upstream_saw(server, needle: str) -> list[dict]:
    return [r for r in server.seen() if needle in r["body"] or any(needle in v for _, v in r["headers"])]


def test_a_stateless_mcp_client_is_one_governed_session_refused_on_its_headers(mcp_stack, mcp_upstream, keys):
    envoy, state = mcp_stack
    token = keys.token(sub="agent-2026")
    seen = asyncio.run(stateless_agent(envoy.url("mcp_unbuffered", "/mcp"), token))

    assert seen["version"] == "2026-07-28"
    assert seen["search"] == "3 results for printer" and seen["ticket"].startswith("ticket T-1 created")
    refused = seen["shell"]
    assert refused != "ran", "the forbidden tool ran"
    assert refused.code == -32001 and refused.data["reasons"] == ["tool_not_allowed"], refused
    # Refused on the headers, without the buffer filter: nothing of it reached the server.
    assert upstream_saw(mcp_upstream, "shell.exec") == [], "the upstream saw the denied call"
    assert "rm -rf" not in json.dumps(mcp_upstream.seen())
    # What did reach it carries the step, known on the headers.
    calls = [r for r in mcp_upstream.seen() if dict(r["headers"]).get("x-warden-session") == seen["session"]]
    assert [dict(r["headers"])["mcp-method"] for r in calls] == ["server/discover", "tools/list", "tools/call", "tools/call"]
    assert [dict(r["headers"])["x-warden-step"] for r in calls] == ["1", "2", "3", "4"]

    # The minted session, sent back by the agent, holds every step: one trail.
    sid = seen["session"]
    assert sid and sid.startswith("ses_"), seen
    minted = [s["id"] for s in state.admin("/v1/sessions?subject=agent-2026").json()["sessions"] if s["id"].startswith("ses_")]
    assert minted == [sid], "the agent kept the session minted for its first request"
    view = state.wait_complete_timeline(sid, 5)
    steps = sorted((e["record"] for e in view["timeline"]), key=lambda r: r["step"])
    assert [(r["step"], r["mcp_method"], r["tool"], r["action"]) for r in steps] == [
        (1, "server/discover", None, "allow"),
        (2, "tools/list", None, "allow"),
        (3, "tools/call", "search", "allow"),
        (4, "tools/call", "ticket.create", "allow"),
        (5, "tools/call", "shell.exec", "deny"),
    ], steps
    # The recorded inputs carry what `_meta` said (the body phase), or the headers (a refusal on them).
    allowed = steps[2]["input"]["request"]["mcp"]
    assert (allowed["phase"], allowed["protocol_version"]) == ("body", "2026-07-28")
    assert allowed["client"] == {"name": "warden-e2e-agent", "version": "2026.1"}
    denied = steps[4]["input"]["request"]["mcp"]
    assert (denied["phase"], denied["protocol_version"], denied["tool"]) == ("headers", "2026-07-28", "shell.exec")
    assert view["audit"] == []
    assert h.warden_cli("session", "verify", sid, url=state.url).returncode == 0


def post(url: str, token: str, sid: str, body, headers: list[tuple[str, str]] | None = None) -> httpx2.Response:
    base = [("authorization", f"Bearer {token}"), ("x-session-id", sid), ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream")]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(url, headers=base + (headers or []), content=content, timeout=10)


def call(id_, method: str, **params) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": {**params, "_meta": META}}


def routing(method: str, name: str | None = None, version: str = "2026-07-28") -> list[tuple[str, str]]:
    return [("mcp-method", method), ("mcp-protocol-version", version)] + ([("mcp-name", name)] if name else [])


def b64(name: str) -> str:
    return f"=?base64?{base64.b64encode(name.encode()).decode()}?="


def test_headers_and_bodies_that_disagree_are_refused_recorded_and_never_forwarded(mcp_stack, mcp_upstream, keys):
    envoy, state = mcp_stack
    token, url = keys.token(sub="agent-2026"), envoy.url("mcp", "/mcp")
    search = call(1, "tools/call", name="search", arguments={"q": "x"})
    shell = call(2, "tools/call", name="shell.exec", arguments={"cmd": "mismatch-marker-1"})
    # Each in a session of its own: the library terminates a session refused again and again.
    cases = [
        # The headers say something harmless; the body calls a denied tool.
        ("method", routing("tools/list"), shell, 400, -32020, 2, "shell.exec"),
        ("name", routing("tools/call", "search"), shell, 400, -32020, 2, "shell.exec"),
        ("protocol_version", routing("tools/call", "search", version="2025-11-25"), search, 400, -32020, 1, "search"),
        ("name", routing("tools/call", b64("søk")), call(3, "tools/call", name="sok", arguments={"q": "mismatch-marker-2"}), 400, -32020, 3, "sok"),
        # 2026-07-28 has no batches: a batch never agrees with one message's headers.
        ("batch", routing("tools/call", "search"), [search, shell], 400, -32600, None, "search"),
        # Two Mcp-Name headers: a first-copy and a last-copy reader would disagree. Refused on the headers.
        ("duplicate_header", routing("tools/call", "search") + [("mcp-name", "shell.exec")], shell, 400, -32020, None, None),
    ]
    for i, (rule, headers, body, status, code, id_, tool) in enumerate(cases):
        sid = f"run-mismatch-{i}"
        r = post(url, token, sid, body, headers)
        assert r.status_code == status, (rule, r.status_code, r.text)
        err = r.json()
        assert (err["error"]["code"], err["id"]) == (code, id_), (rule, err)
        assert err["error"]["data"]["reasons"] == ["mcp_header_mismatch", rule], (rule, err)
        # Recorded as what it is, with what the body asked for.
        rec = state.wait_complete_timeline(sid, 1)["timeline"][0]["record"]
        assert (rec["action"], rec["reasons"], rec["status"], rec["tool"]) == ("deny", ["mcp_header_mismatch", rule], 400, tool), rec

    sid = "run-mismatch-other"
    # The other direction: headers that name a denied tool are refused on them, whatever the body says.
    r = post(url, token, sid, call(4, "tools/list"), routing("tools/call", "shell.exec"))
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["data"]["reasons"]) == (403, -32001, ["tool_not_allowed"])
    # A declared method without a body is no MCP request.
    r = httpx2.post(url, headers=[("authorization", f"Bearer {token}"), ("x-session-id", sid)] + routing("tools/list"), timeout=10)
    assert (r.status_code, r.json()["reasons"]) == (400, ["mcp_body_not_json"]), r.text
    # Agreeing headers go through: a non-ASCII name as the SDK encodes it, and a plain call.
    r = post(url, token, sid, call(5, "tools/call", name="søk", arguments={"q": "agreed-marker"}), routing("tools/call", b64("søk")))
    assert r.status_code == 200 and r.json()["result"]["content"][0]["text"] == "søkte etter agreed-marker", r.text
    r = post(url, token, sid, search, routing("tools/call", "search"))
    assert r.status_code == 200 and "3 results for x" in r.text, r.text
    view = state.wait_complete_timeline(sid, 3)
    steps = sorted((e["record"] for e in view["timeline"]), key=lambda r: r["step"])
    assert [(r["tool"], r["action"]) for r in steps] == [("shell.exec", "deny"), ("søk", "allow"), ("search", "allow")], steps

    for marker in ("shell.exec", "mismatch-marker-1", "mismatch-marker-2"):
        assert upstream_saw(mcp_upstream, marker) == [], f"the upstream saw {marker}"
    assert len(upstream_saw(mcp_upstream, "agreed-marker")) == 1
    for sid in [f"run-mismatch-{i}" for i in range(len(cases))] + ["run-mismatch-other"]:
        assert h.warden_cli("session", "verify", sid, url=state.url).returncode == 0, sid


def test_a_revoked_stateless_session_is_refused_on_the_headers(mcp_stack, mcp_upstream, keys):
    envoy, state = mcp_stack
    # The session from a token claim: every request of this run carries it, no header needed.
    token = keys.token(sub="agent-2026", sid="run-revoked-1")

    async def run() -> dict:
        out = {}
        async with httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=10) as http:
            async with Client(streamable_http_client(envoy.url("mcp_unbuffered", "/mcp"), http_client=http), mode="2026-07-28") as client:
                out["before"] = (await client.call_tool("search", {"q": "before-revocation"})).content[0].text
                assert state.admin("/v1/sessions/run-revoked-1/revoke", method="POST", json={"reason": "incident"}).json()["changed"] is True
                try:
                    await client.call_tool("search", {"q": "after-revocation"})
                    out["after"] = "ran"
                except MCPError as e:
                    out["after"] = e.error
        return out

    out = asyncio.run(run())
    assert out["before"] == "3 results for before-revocation"
    assert out["after"] != "ran" and out["after"].code == -32001 and out["after"].data["reasons"] == ["session_revoked"], out
    assert upstream_saw(mcp_upstream, "before-revocation") and not upstream_saw(mcp_upstream, "after-revocation")
