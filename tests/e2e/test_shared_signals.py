"""Shared Signals (SSF 1.0 / CAEP 1.0) end to end: an identity provider's transmitter (written
here, signing with its own key) pushes or serves a `session-revoked` SET, and the governed
session it names is refused at a cached-mode proxy within a second; the warden's transmitter
pushes a signed SET to a receiver (written here) for every revocation, retried until accepted."""

import json
import threading
import time
import uuid

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

import harness as h
from conftest import base_config

ISS = "https://idp.ssf.test"
AUD = "https://warden.ssf.test"
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
CREDENTIAL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/credential-change"


class Transmitter:
    """The identity provider's side: a P-256 key, its JWKS, SETs signed with it; and an RFC 8936
    poll endpoint serving the SETs queued for the receiver, keeping them until acknowledged."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid="tx1", alg="ES256", use="sig")
        self.jwks = {"keys": [jwk]}
        self.queued: dict[str, str] = {}
        self.acked: list[str] = []
        self.errors: dict = {}
        outer = self

        class Poll(h._Quiet):
            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                for jti in req.get("ack", []):
                    outer.acked.append(jti)
                    outer.queued.pop(jti, None)
                outer.errors.update(req.get("setErrs", {}))
                self._send(200, json.dumps({"sets": dict(outer.queued), "moreAvailable": False}).encode())

        self.poll = h.Server(Poll)

    def set(self, events: dict, iss=ISS, aud=AUD, key=None) -> tuple[str, str]:
        jti = uuid.uuid4().hex
        claims = {"iss": iss, "aud": aud, "iat": int(time.time()), "jti": jti, "events": events}
        return jti, jwt.encode(claims, key or self.key, algorithm="ES256", headers={"typ": "secevent+jwt", "kid": "tx1"})


class Receiver:
    """A receiver of the warden's SETs: refuses the first push (the warden must retry), then
    accepts and keeps every SET."""

    def __init__(self):
        self.sets: list[str] = []
        self.refused_once = False
        self.arrived = threading.Event()
        outer = self

        class Push(h._Quiet):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
                assert self.headers.get("content-type") == "application/secevent+jwt"
                if not outer.refused_once:
                    outer.refused_once = True
                    return self._send(503, b'{"err":"temporarily_unavailable"}')
                outer.sets.append(body)
                outer.arrived.set()
                self._send(202, b"")

        self.server = h.Server(Push)


@pytest.fixture(scope="module")
def stack(runtime, keys, echo, tmpdir_session):
    tx, rx = Transmitter(), Receiver()
    jwks_file = tmpdir_session / f"ssf-{uuid.uuid4().hex[:6]}.jwks"
    jwks_file.write_text(json.dumps(tx.jwks))
    signing = tmpdir_session / f"ssf-{uuid.uuid4().hex[:6]}.pem"
    signing.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    env = {
        "WARDEN_SSF_RECEIVER_ISSUER": ISS, "WARDEN_SSF_RECEIVER_AUDIENCE": AUD, "WARDEN_SSF_RECEIVER_JWKS": str(jwks_file),
        "WARDEN_SSF_PUSH_TOKEN": "ssf-push-token-0123456789",
        "WARDEN_SSF_POLL_URL": f"http://127.0.0.1:{tx.poll.port}/poll",
        "WARDEN_SSF_TRANSMITTER_KEY": str(signing), "WARDEN_SSF_TRANSMITTER_ISSUER": "https://warden.ssf.test/tx",
        "WARDEN_SSF_TRANSMIT_TO": f"http://127.0.0.1:{rx.server.port}/events", "WARDEN_SSF_TRANSMIT_AUDIENCE": "https://rx.ssf.test",
    }
    state = envoy = None
    try:
        state = h.StateService(tmpdir_session / f"ssf-{uuid.uuid4().hex[:6]}.db", env=env)
        cfg = base_config(keys, state=h.state_config(mode="cached", revocation_poll_ms=200))
        envoy = h.Envoy(h.bootstrap([h.listener("c", [h.wasm_filter(cfg, runtime)])], [h.cluster("echo", echo.port), h.cluster("warden-state", state.port)])).wait_ready()
        yield envoy, state, tx, rx
    finally:
        if envoy:
            envoy.stop()
        if state:
            state.stop()
        tx.poll.stop()
        rx.server.stop()


def session(envoy, keys, subject):
    sid = "ssf-" + uuid.uuid4().hex[:10]
    hs = {"authorization": f"Bearer {keys.token(sub=subject)}", "x-session-id": sid}
    step = lambda: requests.get(envoy.url("c", "/tickets"), headers=hs, timeout=5)
    for _ in range(2):
        assert step().status_code == 200
    return sid, step


def refused_within(step, seconds=1.5):
    deadline = time.time() + seconds
    while time.time() < deadline:
        r = step()
        if r.status_code == 403:
            return r.json()["reasons"]
        time.sleep(0.05)
    raise AssertionError(f"still allowed {seconds}s after the SET")


def push(state, token_set, token="ssf-push-token-0123456789"):
    return requests.post(state.url + "/v1/ssf/events", data=token_set, timeout=5,
                         headers={"content-type": "application/secevent+jwt", "authorization": f"Bearer {token}"})


def test_a_pushed_session_revoked_set_stops_the_session_at_a_cached_proxy(stack, keys):
    envoy, state, tx, _ = stack
    sid, step = session(envoy, keys, "ssf-agent")
    _, s = tx.set({SESSION_REVOKED: {"subject": {"format": "opaque", "id": sid}, "reason_admin": {"en": "device compromised"}}})
    r = push(state, s)
    assert r.status_code == 202, r.text
    assert refused_within(step) == ["session_revoked"]
    view = state.session(sid)
    assert view["revoke_reason"].startswith(f"ssf session-revoked from {ISS}") and "device compromised" in view["revoke_reason"]


def test_a_credential_change_revokes_every_session_of_the_subject(stack, keys):
    envoy, state, tx, _ = stack
    (_, a), (_, b) = session(envoy, keys, "ssf-rotated"), session(envoy, keys, "ssf-rotated")
    _, other = session(envoy, keys, "ssf-bystander")
    _, s = tx.set({CREDENTIAL_CHANGE: {"subject": {"format": "iss_sub", "iss": ISS, "sub": "ssf-rotated"}, "change_type": "revoke", "credential_type": "password"}})
    assert push(state, s).status_code == 202
    assert refused_within(a) == ["session_revoked"] and refused_within(b) == ["session_revoked"]
    assert other().status_code == 200, "another subject's session goes on"


def test_a_set_is_believed_only_from_its_transmitter_for_this_receiver(stack, keys):
    envoy, state, tx, _ = stack
    sid, step = session(envoy, keys, "ssf-target")
    ev = {SESSION_REVOKED: {"subject": {"format": "opaque", "id": sid}}}
    cases = [
        (tx.set(ev, key=ec.generate_private_key(ec.SECP256R1()))[1], "invalid_key"),
        (tx.set(ev, iss="https://evil.test")[1], "invalid_issuer"),
        (tx.set(ev, aud="https://someone-else.test")[1], "invalid_audience"),
        ("not-a-set", "invalid_request"),
    ]
    for s, err in cases:
        r = push(state, s)
        assert r.status_code == 400 and r.json()["err"] == err, r.text
    assert push(state, tx.set(ev)[1], token="wrong-token-0123456789").status_code == 401
    assert step().status_code == 200, "nothing refused revoked anything"


def test_a_polled_set_is_acted_on_and_acknowledged(stack, keys):
    envoy, state, tx, _ = stack
    sid, step = session(envoy, keys, "ssf-polled")
    jti, s = tx.set({SESSION_REVOKED: {"subject": {"format": "complex", "session": {"format": "opaque", "id": sid}}}})
    bad_jti, bad = tx.set({SESSION_REVOKED: {"subject": {"format": "opaque", "id": sid}}}, aud="https://someone-else.test")
    tx.queued[jti], tx.queued[bad_jti] = s, bad
    assert refused_within(step, seconds=6) == ["session_revoked"]
    deadline = time.time() + 6
    while time.time() < deadline and (jti not in tx.acked or bad_jti not in tx.errors):
        time.sleep(0.1)
    assert jti in tx.acked and tx.errors[bad_jti]["err"] == "invalid_audience", (tx.acked, tx.errors)


def test_every_revocation_is_transmitted_signed_and_retried_until_accepted(stack, keys):
    envoy, state, _, rx = stack
    sid, _ = session(envoy, keys, "ssf-watched")
    assert state.admin(f"/v1/sessions/{sid}/revoke", method="POST", json={"reason": "incident 7"}).status_code == 200
    deadline = time.time() + 10
    found = None
    while time.time() < deadline and found is None:
        for s in rx.sets:
            if json.loads(jwt.utils.base64url_decode(s.split(".")[1]))["sub_id"]["session"]["id"] == sid:
                found = s
        time.sleep(0.1)
    assert found, f"no SET for {sid} among {len(rx.sets)}"
    assert rx.refused_once, "the first push was refused and retried"
    jwks = requests.get(state.url + "/v1/ssf/jwks", timeout=5).json()
    key = ECAlgorithm.from_jwk(json.dumps(jwks["keys"][0]))
    assert jwt.get_unverified_header(found)["typ"] == "secevent+jwt"
    claims = jwt.decode(found, key, algorithms=["ES256"], audience="https://rx.ssf.test", issuer="https://warden.ssf.test/tx")
    event = claims["events"][SESSION_REVOKED]
    assert event["reason_admin"]["en"] == "incident 7" and claims["sub_id"]["user"]["id"] == "ssf-watched"
