"""Sender-constrained tokens through a real Envoy, the built filter and the real state service:
RFC 8705 (a token bound to a client certificate) over a real mTLS listener, and RFC 9449 DPoP
with proofs made in Python, replayed at a second Envoy sharing the same state service."""

import json
import time
import uuid

import pytest
import requests

import harness as h
from conftest import base_config


def config(keys):
    cfg = base_config(keys, state=h.state_config())
    return h.deep_merge(cfg, {"policy": {"data": {"warden": {"config": {"limits": {"max_steps": 1000}}}}}})


@pytest.fixture(scope="module")
def stack(runtime, keys, echo, certs, tmpdir_session):
    """The state service and two Envoys (A and B), each with an mTLS and a plain listener."""
    state = h.StateService(tmpdir_session / f"binding-{uuid.uuid4().hex[:6]}.db")
    envoys = []
    try:
        for _ in range(2):
            listeners = [
                h.listener("mtls", [h.wasm_filter(config(keys), runtime)], tls=h.mtls_transport(certs)),
                h.listener("plain", [h.wasm_filter(config(keys), runtime)]),
            ]
            clusters = [h.cluster("echo", echo.port), h.cluster("warden-state", state.port)]
            envoys.append(h.Envoy(h.bootstrap(listeners, clusters)).wait_ready())
        yield envoys[0], envoys[1], state
    finally:
        for e in envoys:
            e.stop()
        state.stop()


def refusal(r) -> str:
    body = r.json()
    return body.get("reason") or body["reasons"][0]


def binding_of(state, r) -> dict:
    sid = r.headers["x-warden-session"]
    view = state.wait_timeline(sid, 1)
    return view["timeline"][-1]["record"].get("binding")


def test_an_mtls_bound_token_holds_only_over_mtls_from_its_certificate(stack, keys, certs):
    a, _, state = stack
    token = keys.token(cnf={"x5t#S256": h.cert_x5t(certs.client[0])})
    auth = {"authorization": f"Bearer {token}"}
    url = a.url("mtls", "/tickets", scheme="https")
    r = requests.get(url, headers=auth, cert=certs.client, verify=certs.ca, timeout=5)
    assert r.status_code == 200, r.text
    assert binding_of(state, r) == {"kind": "mtls", "held": True}
    # The same token from another client certificate of the same CA, or without mTLS at all.
    r = requests.get(url, headers=auth, cert=certs.client2, verify=certs.ca, timeout=5)
    assert (r.status_code, refusal(r)) == (403, "token_binding_unproven"), r.text
    assert binding_of(state, r) == {"kind": "mtls", "held": False}
    r = requests.get(a.url("plain", "/tickets"), headers=auth, timeout=5)
    assert (r.status_code, refusal(r)) == (403, "token_binding_unproven"), r.text


def test_dpop_a_valid_proof_passes_once_and_a_replay_at_another_proxy_is_refused(stack, keys):
    a, b, state = stack
    client = h.DpopKey()
    token = keys.token(cnf={"jkt": client.jkt})
    url_a, url_b = a.url("plain", "/tickets"), b.url("plain", "/tickets")
    proof = client.proof("GET", url_a, token)
    r = requests.get(url_a + "?page=2", headers={"authorization": f"DPoP {token}", "dpop": proof}, timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["x-warden-subject"] == "agent-7"
    assert binding_of(state, r) == {"kind": "dpop", "held": True}
    # The same proof at Envoy A again, and at Envoy B (whose own cache never saw it): the state
    # service has taken its jti.
    r = requests.get(url_a, headers={"authorization": f"DPoP {token}", "dpop": proof}, timeout=5)
    assert (r.status_code, refusal(r)) == (401, "dpop_replayed"), r.text
    assert r.headers["www-authenticate"].startswith("DPoP ")
    proof_b = client.proof("GET", url_b, token)
    requests.get(url_b, headers={"authorization": f"DPoP {token}", "dpop": proof_b}, timeout=5).raise_for_status()
    r = requests.get(url_b, headers={"authorization": f"DPoP {token}", "dpop": proof_b}, timeout=5)
    assert (r.status_code, refusal(r)) == (401, "dpop_replayed"), r.text
    # A proof copied from A to B: made for another URL (B's authority), refused on its htu.
    proof = client.proof("GET", url_a, token)
    r = requests.get(url_b, headers={"authorization": f"DPoP {token}", "dpop": proof}, timeout=5)
    assert (r.status_code, refusal(r)) == (401, "dpop_htu_mismatch"), r.text


def test_dpop_hostile_requests_are_refused(stack, keys):
    a, _, _ = stack
    client, thief = h.DpopKey(), h.DpopKey()
    token = keys.token(cnf={"jkt": client.jkt})
    url = a.url("plain", "/tickets")
    cases = [
        ("wrong htu", {"authorization": f"DPoP {token}", "dpop": client.proof("GET", a.url("plain", "/admin"), token)}, 401, "dpop_htu_mismatch"),
        ("wrong method", {"authorization": f"DPoP {token}", "dpop": client.proof("POST", url, token)}, 401, "dpop_htm_mismatch"),
        ("old proof", {"authorization": f"DPoP {token}", "dpop": client.proof("GET", url, token, iat=int(time.time()) - 300)}, 401, "dpop_proof_expired"),
        ("another token's proof", {"authorization": f"DPoP {token}", "dpop": client.proof("GET", url, keys.token())}, 401, "dpop_ath_mismatch"),
        ("the thief's own key", {"authorization": f"DPoP {token}", "dpop": thief.proof("GET", url, token)}, 401, "dpop_key_mismatch"),
        ("DPoP scheme without a proof", {"authorization": f"DPoP {token}"}, 401, "dpop_proof_missing"),
        # The stolen token sent as a plain bearer token, without a proof.
        ("stolen token as bearer", {"authorization": f"Bearer {token}"}, 403, "token_binding_unproven"),
    ]
    for what, headers, status, reason in cases:
        r = requests.get(url, headers=headers, timeout=5)
        assert (r.status_code, refusal(r)) == (status, reason), f"{what}: {r.text}"
    # Two DPoP headers, even the same proof twice (raw HTTP/1.1: clients merge repeats).
    port = a.ports["plain"]
    proof = client.proof("GET", url, token)
    status, _, body = h.http1_request(port, "GET", "/tickets", [("authorization", f"DPoP {token}"), ("dpop", proof), ("dpop", proof)], host=f"127.0.0.1:{port}")
    assert (status, json.loads(body)["reason"]) == (401, "dpop_proof_ambiguous"), body
