"""A real MCP client session (official Python SDK) against a real MCP server behind Envoy and
the filter: allowed tools pass, a forbidden tool is refused as a JSON-RPC error, and the whole
MCP session is one governed session with one trail."""

import asyncio

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

import harness as h
from conftest import base_config, envoy_with_state


@pytest.fixture(scope="module")
def mcp_stack(runtime, keys, tmpdir_session):
    server = h.McpServer()
    try:
        cfg = base_config(keys, state=h.state_config())
        cfg = h.deep_merge(cfg, {"policy": {"data": {"warden": {"config": {
            "limits": {"max_steps": 1000},
            "tools": {"allow": {"mcp-agent": ["search", "ticket.*", "secrets.*"]}},
        }}}}})
        listeners = [h.listener("mcp", [h.wasm_filter(cfg, runtime), h.buffer_filter()], cluster="mcp")]
        with envoy_with_state(tmpdir_session, "mcp", listeners, [h.cluster("mcp", server.port)]) as stack:
            yield stack
    finally:
        server.stop()


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
