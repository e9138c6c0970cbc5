"""Hostile paths (issue 11, item 2) against a real Envoy, the built filter and the shipped policy
library, over HTTP/1.1 and HTTP/2 (raw: client libraries normalize paths before sending).

Every trick is sent to two listeners: `secure`, with the listener settings README's "Deploying
securely" requires (Envoy normalizes first, the filter then sees the canonical path), and `bare`,
an HttpConnectionManager without them and without the buffer filter (the filter alone must hold:
it decides on the canonical path, sends the upstream that path, or refuses). For each: the status
and reason code, what the upstream (the recording echo server) received, and a normal request
answered 200 right after it.
"""

import json
import time

import pytest

import harness as h
from conftest import base_config

FORBIDDEN = (403, ["path_forbidden"])
ENVOY_400 = (400, None)  # Envoy's own refusal: no filter reason


def ambiguous(code: str) -> tuple:
    return (400, ["path_ambiguous", code])


# (id, raw :path, on `secure`, on `bare`, the path the upstream acts on if it is let through)
GET_CASES = [
    ("plain", "/admin/x", FORBIDDEN, FORBIDDEN, None),
    ("double-slash", "//admin/x", FORBIDDEN, FORBIDDEN, None),
    ("many-slashes", "///admin//x", FORBIDDEN, FORBIDDEN, None),
    ("encoded-unreserved", "/%61dmin/x", FORBIDDEN, FORBIDDEN, None),
    ("dot", "/./admin/x", FORBIDDEN, FORBIDDEN, None),
    ("dot-dot", "/x/../admin/x", FORBIDDEN, FORBIDDEN, None),
    ("encoded-dot", "/%2e/admin/x", FORBIDDEN, FORBIDDEN, None),
    ("encoded-dot-dot", "/x/%2e%2E/admin/x", FORBIDDEN, FORBIDDEN, None),
    ("above-root", "/../admin/x", FORBIDDEN, FORBIDDEN, None),
    ("trailing-slash", "/admin/", FORBIDDEN, FORBIDDEN, None),
    ("trailing-dot", "/admin/x/.", FORBIDDEN, FORBIDDEN, None),
    ("query", "/admin?next=/tickets", FORBIDDEN, FORBIDDEN, None),
    ("path-param", "/a;b/../admin", FORBIDDEN, FORBIDDEN, None),
    # Envoy's normalize_path reads `\` as `/`; the filter alone refuses it.
    ("backslash", "/x\\..\\admin", FORBIDDEN, ambiguous("path_backslash"), None),
    ("encoded-slash", "/admin%2Fx", ENVOY_400, ambiguous("path_encoded_slash"), None),
    ("encoded-slash-dot-dot", "/x/..%2fadmin", ENVOY_400, ambiguous("path_encoded_slash"), None),
    ("encoded-backslash", "/admin%5Cx", ENVOY_400, ambiguous("path_encoded_backslash"), None),
    ("encoded-nul", "/admin%00", ENVOY_400, ambiguous("path_nul"), None),
    # Envoy passes an invalid escape on; the filter refuses it behind either listener.
    ("bad-escape", "/admin%zz", ambiguous("path_bad_escape"), ambiguous("path_bad_escape"), None),
    ("truncated-escape", "/tickets%4", ambiguous("path_bad_escape"), ambiguous("path_bad_escape"), None),
    ("encoded-control", "/tickets%0d%0ax", ambiguous("path_encoded_control"), ambiguous("path_encoded_control"), None),
    ("fragment", "/tickets#admin", ENVOY_400, ENVOY_400, None),
    # Allowed paths reach the upstream canonical, whoever canonicalized them.
    ("allowed-dot", "/tickets/./42", (200, None), (200, None), "/tickets/42"),
    ("allowed-slashes", "//tickets//42", (200, None), (200, None), "/tickets/42"),
    ("allowed-encoded", "/%74ickets/%34%32", (200, None), (200, None), "/tickets/42"),
    ("allowed-out-of-admin", "/admin/../tickets", (200, None), (200, None), "/tickets"),
    ("allowed-root", "/..", (200, None), (200, None), "/"),
    ("allowed-trailing-slash", "/tickets/42/", (200, None), (200, None), "/tickets/42/"),
    ("allowed-query-untouched", "/tickets?next=/../admin%2F", (200, None), (200, None), "/tickets?next=/../admin%2F"),
]

SHELL = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "shell.exec", "arguments": {"cmd": "id"}}}).encode()
SEARCH = json.dumps({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "search", "arguments": {"q": "x"}}}).encode()
TOOL_REFUSED = (403, ["tool_not_allowed"])

# (id, raw :path, extra headers, body, expected on both listeners, the path the upstream acts on)
POST_CASES = [
    # No content type, no session header: MCP only by its (canonical) path.
    ("mcp-encoded", "/%6dcp", {}, SHELL, TOOL_REFUSED, None),
    ("mcp-dot-dot", "/x/../mcp", {}, SHELL, TOOL_REFUSED, None),
    ("mcp-double-slash", "//mcp/", {}, SHELL, TOOL_REFUSED, None),
    ("mcp-encoded-not-jsonrpc", "/%6D%63%70", {}, b"not json", (400, ["mcp_body_not_json"]), None),
    # Anywhere, a JSON-RPC body sent as JSON, or with Mcp-Method, is MCP.
    ("jsonrpc-elsewhere", "/rpc", {"content-type": "application/json"}, SHELL, TOOL_REFUSED, None),
    # Mcp-Method makes it a 2026-07-28 request: refused on its headers, or held to them.
    ("mcp-method-header", "/rpc", {"mcp-method": "tools/call", "mcp-name": "shell.exec"}, SHELL, TOOL_REFUSED, None),
    ("mcp-method-header-unnamed", "/rpc", {"mcp-method": "tools/call"}, SHELL, (400, ["mcp_header_mismatch", "name"]), None),
    ("mcp-method-header-lying", "/rpc", {"mcp-method": "tools/call", "mcp-name": "search"}, SHELL, (400, ["mcp_header_mismatch", "name"]), None),
    ("mcp-allowed", "/%6dcp", {"content-type": "application/json"}, SEARCH, (200, None), "/mcp"),
    ("mcp-encoded-slash", "/mcp%2F..%2Fadmin", {"content-type": "application/json"}, SHELL, None, None),
]


@pytest.fixture(scope="module")
def upstream():
    s = h.echo_server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stack(runtime, keys, upstream):
    cfg = base_config(keys)
    cfg = h.deep_merge(cfg, {"policy": {"data": {"warden": {"config": {
        "limits": {"max_steps": 1000},
        "tools": {"allow": {"agent-7": ["search"]}},
    }}}}})
    listeners = [
        h.listener("secure", [h.wasm_filter(cfg, runtime)]),
        h.listener("bare", [h.wasm_filter(cfg, runtime)], secure=False),
    ]
    envoy = h.Envoy(h.bootstrap(listeners, [h.cluster("echo", upstream.port)])).wait_ready()
    try:
        yield envoy
    finally:
        envoy.stop()


def send(proto: str, port: int, method: str, path: str, headers: dict, body: bytes = b""):
    if proto == "h1":
        return h.http1_request(port, method, path, headers, body)
    return h.h2_request(port, method, path, headers, body)


def reasons_of(body: bytes):
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if "jsonrpc" in doc:
        return doc["error"]["data"]["reasons"]
    return doc.get("reasons")


def upstream_after(upstream, refused: bool) -> list[dict]:
    # A refused request's upstream stream (if it ever had one) is reset: give the echo server a
    # moment to record what it got before it.
    if refused:
        time.sleep(0.1)
    return list(upstream.requests)


def still_alive(proto: str, port: int, token: str):
    status, _, body = send(proto, port, "GET", "/tickets", {"authorization": f"Bearer {token}"})
    assert status == 200, f"liveness after the trick: {status} {body[:200]!r}"


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("listener", ["secure", "bare"])
@pytest.mark.parametrize("case", GET_CASES, ids=[c[0] for c in GET_CASES])
def test_path_tricks(stack, upstream, keys, proto, listener, case):
    _, path, on_secure, on_bare, canonical = case
    want_status, want_reasons = on_secure if listener == "secure" else on_bare
    token = keys.token()
    port = stack.ports[listener]
    upstream.requests.clear()

    status, _, body = send(proto, port, "GET", path, {"authorization": f"Bearer {token}"})

    assert status == want_status, f"{listener}/{proto} {path}: {status} {body[:300]!r}"
    if want_reasons is not None:
        assert reasons_of(body) == want_reasons, body
    seen = upstream_after(upstream, refused=status != 200)
    if status == 200:
        assert [r["target"] for r in seen] == [canonical], "the upstream acts on the path the policy decided on"
        assert seen[0]["headers"].get("x-warden-decision", "").startswith("dec_"), "decided before it went upstream"
    else:
        assert seen == [], f"a refused path reached the upstream: {seen}"
    still_alive(proto, port, token)


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("listener", ["secure", "bare"])
@pytest.mark.parametrize("case", POST_CASES, ids=[c[0] for c in POST_CASES])
def test_mcp_is_inspected_whatever_the_path_spelling(stack, upstream, keys, proto, listener, case):
    _, path, extra, body_sent, want, canonical = case
    if want is None:  # an encoded slash: Envoy's refusal with the settings, the filter's without
        want = ENVOY_400 if listener == "secure" else ambiguous("path_encoded_slash")
    token = keys.token()
    port = stack.ports[listener]
    upstream.requests.clear()

    status, _, body = send(proto, port, "POST", path, dict(extra, authorization=f"Bearer {token}"), body_sent)

    assert status == want[0], f"{listener}/{proto} {path}: {status} {body[:300]!r}"
    if want[1] is not None:
        assert reasons_of(body) == want[1], body
    seen = upstream_after(upstream, refused=status != 200)
    if status == 200:
        assert [(r["target"], r["body"]) for r in seen] == [(canonical, body_sent.decode())]
    elif listener == "secure":
        assert seen == [], f"with the buffer filter the upstream sees nothing of a refused request: {seen}"
    else:
        # Without the buffer filter an MCP request's headers (with the canonical path) leave
        # before its body is decided; the refused body never does.
        assert all(r["body"] == "" for r in seen), f"a refused body reached the upstream: {seen}"
        assert all(r["target"] == h_canonical(path) for r in seen), seen
    still_alive(proto, port, token)


def h_canonical(path: str) -> str:
    """The canonical forms of the POST cases' paths (the filter's, pinned by its unit tests)."""
    return {"/%6dcp": "/mcp", "/x/../mcp": "/mcp", "//mcp/": "/mcp/", "/%6D%63%70": "/mcp", "/rpc": "/rpc"}[path]


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("listener", ["secure", "bare"])
def test_a_path_that_is_not_a_path_is_refused_by_envoy(stack, upstream, keys, proto, listener):
    token = keys.token()
    port = stack.ports[listener]
    upstream.requests.clear()
    status, headers, _ = send(proto, port, "GET", "admin/x", {"authorization": f"Bearer {token}"})
    # HTTP/1.1: a 400; HTTP/2: Envoy resets the stream or the connection.
    assert status == 400 or (status is None and proto == "h2" and headers), (status, headers)
    assert upstream_after(upstream, refused=True) == []
    still_alive(proto, port, token)


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_the_secure_listener_refuses_underscore_header_names(stack, upstream, keys, proto):
    token = keys.token()
    port = stack.ports["secure"]
    upstream.requests.clear()
    # `x_session_id` could be read as `x-session-id` by an upstream that folds `_` into `-`.
    status, headers, _ = send(proto, port, "GET", "/tickets", {"authorization": f"Bearer {token}", "x_session_id": "s-1"})
    assert status == 400 or (status is None and proto == "h2"), (status, headers)
    assert upstream_after(upstream, refused=True) == []
    still_alive(proto, port, token)


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_path_refusals_are_counted(stack, keys, proto):
    before = stack.stats("warden.paths.refused").get("wasmcustom.warden.paths.refused", 0)
    status, _, _ = send(proto, stack.ports["bare"], "GET", "/admin%2Fx", {"authorization": f"Bearer {keys.token()}"})
    assert status == 400
    deadline = time.time() + 5
    while time.time() < deadline:
        after = stack.stats("warden.paths.refused").get("wasmcustom.warden.paths.refused", 0)
        if after >= before + 1:
            break
        time.sleep(0.1)
    assert after == before + 1
