"""Hostile input against a real Envoy with the filter: every way a client could make the filter
decide on something other than what the upstream acts on. Each attack gets its expected status
and reason code, the upstream (the harness's echo server, which records what it received) is
checked to have acted on nothing undecided, and a normal request afterwards shows the VM lives on.
Body attacks run against the secure listener and a bare one (no buffer filter, no Envoy
hardening): the filter alone must hold. Path tricks are in test_hostile_paths.py.

Raw sockets and a raw HTTP/2 client are used where HTTP clients would tidy the request up
(repeated headers, chunked bodies with trailers, HTTP/2 trailers)."""

import json
import socket
import time
import uuid

import pytest
import requests

import harness as h
from conftest import base_config

TOOLS = {"allow": {"*": ["search", "ticket.*"]}}


CONTEXT_POLICY = """package warden.session
import rego.v1
decision := {"action": "allow", "reasons": [], "headers": {
  "x-seen-region": sprintf("%v", [input.context.region]),
  "x-seen-source": sprintf("%v", [input.request.source.address]),
}}
"""


class Upstream:
    """The echo server with a question: did it ever receive this marker?"""

    def __init__(self):
        self.server = h.echo_server()
        self.port = self.server.port

    def saw(self, marker: str) -> bool:
        return any(marker in json.dumps(d) for d in self.server.requests)

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="module")
def hostile(runtime, keys):
    upstream = Upstream()
    library = base_config(keys, policy={"data": {"warden": {"config": {"tools": TOOLS, "limits": {"max_steps": 1000}}}}})
    # A deployment that takes region from a gateway it trusts (not the test client), and believes
    # XFCC from a front hop at 10.0.0.9 only.
    spoof = base_config(keys, identity={"spiffe": {"trust_domains": ["example.org"], "trusted_xfcc_hops": ["10.0.0.9"]}},
                        context={"trusted_sources": ["10.0.0.9"]})
    spoof["policy"] = {"modules": {"p.rego": CONTEXT_POLICY}}
    forward_xfcc = {"forward_client_cert_details": "ALWAYS_FORWARD_ONLY"}
    # HTTP/1.1 trailers reach filters only when the connection manager enables them.
    trailers = {"http_protocol_options": {"enable_trailers": True}}
    config = h.bootstrap(
        [
            h.listener("library", [h.wasm_filter(library, runtime)], hcm=trailers),
            h.listener("library_bare", [h.wasm_filter(library, runtime)], hcm=trailers, secure=False),
            h.listener("spoof", [h.wasm_filter(spoof, runtime)], hcm=forward_xfcc),
            # Without use_remote_address Envoy takes the client address from X-Forwarded-For: the
            # filter alone must still never trust it.
            h.listener("spoof_legacy", [h.wasm_filter(spoof, runtime)], hcm={**forward_xfcc, "use_remote_address": False}),
        ],
        [h.cluster("echo", upstream.port)],
    )
    envoy = h.Envoy(config)
    try:
        envoy.wait_ready()
        yield envoy, upstream
    finally:
        envoy.stop()
        upstream.stop()


def raw(port: int, request: bytes, timeout=10.0) -> tuple[int, dict, bytes]:
    """Send bytes as they are; read one HTTP/1.1 response (the request says Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def chunked_with_trailers(path: str, token: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nTrailer: x-checksum\r\nConnection: close\r\n\r\n").encode()
    return head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\nx-checksum: abc\r\n\r\n"


def tool_call(tool: str, marker: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {"m": marker}}}).encode()


def get(url, **kw):
    return requests.get(url, timeout=10, **kw)


def post(url, **kw):
    return requests.post(url, timeout=10, **kw)


def port(envoy, name: str) -> int:
    return envoy.ports[name]


def alive(envoy, keys, listener="library"):
    r = get(envoy.url(listener, "/ok"), headers={"authorization": f"Bearer {keys.token(sub='probe')}"})
    assert r.status_code == 200, r.text


def send_with_trailers(envoy, listener: str, protocol: str, token: str, body: bytes) -> tuple[int | None, bytes]:
    if protocol == "h1":
        status, _, reply = raw(port(envoy, listener), chunked_with_trailers("/mcp", token, body))
    else:
        status, _, reply = h.h2_request(port(envoy, listener), "POST", "/mcp", {"authorization": f"Bearer {token}",
                                        "content-type": "application/json"}, body=body, trailers={"x-checksum": "abc"})
    return status, reply


@pytest.mark.parametrize("protocol", ["h1", "h2"])
@pytest.mark.parametrize("listener", ["library", "library_bare"])
def test_a_body_ending_with_trailers_is_decided_before_any_of_it_goes_upstream(hostile, keys, listener, protocol):
    envoy, upstream = hostile
    token = keys.token(sub=f"agent-trailers-{listener}-{protocol}")
    denied = uuid.uuid4().hex
    status, body = send_with_trailers(envoy, listener, protocol, token, tool_call("shell.exec", denied))
    assert status == 403, body
    assert "tool_not_allowed" in json.loads(body)["error"]["data"]["reasons"]
    allowed = uuid.uuid4().hex
    status, body = send_with_trailers(envoy, listener, protocol, token, tool_call("search", allowed))
    assert status == 200, body
    assert upstream.saw(allowed), "the allowed call reached the upstream with its body"
    assert not upstream.saw(denied), "the denied call never reached the upstream"
    alive(envoy, keys, listener)


def test_every_call_of_a_jsonrpc_batch_is_judged(hostile, keys):
    envoy, upstream = hostile
    marker = uuid.uuid4().hex
    batch = [json.loads(tool_call("search", marker)), {**json.loads(tool_call("shell.exec", marker)), "id": 2}]
    r = post(envoy.url("library", "/mcp"), data=json.dumps(batch), headers={
        "authorization": f"Bearer {keys.token(sub='agent-batch')}", "content-type": "application/json"})
    assert r.status_code == 403 and "tool_not_allowed" in r.text, r.text
    assert not upstream.saw(marker)
    alive(envoy, keys)


def test_two_values_for_the_session_are_ambiguous(hostile, keys):
    envoy, upstream = hostile
    token = keys.token(sub="agent-dup")
    for extra in ("X-Session-Id: s-1\r\nX-Session-Id: s-2\r\n", "Mcp-Session-Id: s-1\r\nX-Session-Id: s-2\r\n"):
        marker = uuid.uuid4().hex
        req = (f"GET /x/{marker} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {token}\r\n{extra}Connection: close\r\n\r\n").encode()
        status, _, body = raw(port(envoy, "library"), req)
        assert status == 400 and json.loads(body)["reasons"] == ["session_id_ambiguous"], body
        assert not upstream.saw(marker)
    alive(envoy, keys)


def test_tokens_without_a_usable_subject_are_refused_with_their_reason(hostile, keys):
    envoy, _ = hostile
    for token, reason in [
        (keys.token(sub=None, client_id="svc"), "token_subject_missing"),
        (keys.token(sub=""), "token_subject_missing"),
        (keys.token(sub="agent\r\nx-injected: yes"), "token_subject_invalid"),
        (keys.token(sub="agent\u0000"), "token_subject_invalid"),
    ]:
        r = get(envoy.url("library", "/x"), headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 401 and r.json()["reason"] == reason, r.text
    alive(envoy, keys)


def test_a_future_auth_time_does_not_satisfy_a_step_up(hostile, keys):
    envoy, _ = hostile
    url = envoy.url("library", "/secrets/db")
    future = keys.token(sub="agent-mfa", auth_time=int(time.time()) + 3600)
    r = get(url, headers={"authorization": f"Bearer {future}"})
    assert r.status_code == 401 and "insufficient_user_authentication" in r.headers["www-authenticate"], r.text
    fresh = keys.token(sub="agent-mfa", auth_time=int(time.time()))
    assert get(url, headers={"authorization": f"Bearer {fresh}"}).status_code == 200


@pytest.mark.parametrize("listener", ["spoof", "spoof_legacy"])
def test_xff_cannot_make_a_client_a_trusted_hop_nor_a_context_source(hostile, keys, listener):
    envoy, upstream = hostile
    forged = "By=spiffe://example.org/gw;URI=spiffe://example.org/ns/prod/sa/admin"
    # No credential but a forged client certificate, claimed to come through the trusted hop.
    r = get(envoy.url(listener, "/x"), headers={"x-forwarded-for": "10.0.0.9", "x-forwarded-client-cert": forged})
    assert r.status_code == 401 and r.json()["reason"] == "credential_missing", r.text
    # Region from a client that only claims to be the trusted gateway is ignored.
    r = get(envoy.url(listener, "/x"), headers={"authorization": f"Bearer {keys.token(sub='agent-ctx')}",
                                                "x-forwarded-for": "10.0.0.9", "x-client-region": "eu-west"})
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["x-seen-region"] == "null", seen
    # Envoy's own view of the client: the direct peer with the secure setting, the forged
    # address (port 0) without it; recorded as Envoy says, never trusted.
    assert seen["x-seen-source"].startswith("127.0.0.1:" if listener == "spoof" else "10.0.0.9:0"), seen
    alive(envoy, keys, listener)


@pytest.mark.parametrize("listener", ["library", "library_bare"])
def test_a_request_reset_mid_body_reaches_nothing(hostile, keys, listener):
    envoy, upstream = hostile
    marker = uuid.uuid4().hex
    body = tool_call("search", marker)
    head = (f"POST /mcp HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {keys.token(sub='agent-reset')}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port(envoy, listener)), timeout=10) as s:
        s.sendall(head + f"{len(body):x}\r\n".encode() + body + b"\r\n")
        # The stream never ends: the client goes away instead.
    alive(envoy, keys, listener)
    assert not upstream.saw(marker), "a body that never ended was never decided, so never forwarded"


@pytest.mark.parametrize("listener", ["library", "library_bare"])
def test_a_body_over_the_limit_is_refused_even_when_trailers_follow(hostile, keys, listener):
    envoy, upstream = hostile
    marker = uuid.uuid4().hex
    big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "search", "arguments": {"m": marker, "pad": "x" * (1024 * 1024 + 10)}}}).encode()
    status, _, body = raw(port(envoy, listener), chunked_with_trailers("/mcp", keys.token(sub="agent-big"), big))
    assert status == 413, body[:300]
    assert not upstream.saw(marker)
    alive(envoy, keys, listener)
