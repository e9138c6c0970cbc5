"""The filter in a real Envoy: verified identity, in-proxy Rego decisions, correlation ids."""

import json
import re
import socket
import time

import pytest
import requests

import harness as h
from conftest import API_KEY, base_config

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def get(envoy, path="/tickets", token=None, listener="enforce", headers=None, **kw):
    hs = dict(headers or {})
    if token:
        hs["authorization"] = f"Bearer {token}"
    return requests.get(envoy.url(listener, path), headers=hs, timeout=5, **kw)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "HS256"])
def test_valid_token_reaches_upstream_with_stamped_headers(envoy, keys, alg):
    iss = h.HS_ISSUER if alg == "HS256" else h.ISSUER
    r = get(envoy, token=keys.token(sub=f"agent-{alg}", alg=alg, iss=iss))
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["x-warden-subject"] == f"agent-{alg}"
    assert seen["x-warden-session"].startswith("ses_")
    assert seen["x-warden-step"] == "1"
    assert seen["x-warden-decision"].startswith("dec_")
    assert TRACEPARENT.match(seen["traceparent"])
    # The client gets the session and decision back.
    assert r.headers["x-warden-session"] == seen["x-warden-session"]
    assert r.headers["x-warden-decision"] == seen["x-warden-decision"]


def _bad_tokens(keys):
    now = int(time.time())
    other = h.Keys()
    return {
        "credential_missing": None,
        "token_expired": keys.token(ttl=-3600),
        "token_not_yet_valid": keys.token(nbf=now + 3600),
        "token_audience_not_allowed": keys.token(aud="someone-else"),
        "token_issuer_not_allowed": keys.token(iss="https://evil.test"),
        "token_signature_invalid": other.token(),
        "token_algorithm_not_allowed": h.forge({"alg": "none", "typ": "JWT"}, h.std_claims()),
        # The classic confusion: HS256 keyed with the RSA public key the attacker downloaded.
        "token_algorithm_not_allowed ": h.forge({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, h.std_claims(), keys.rsa_public_pem()),
        "token_malformed": "abc.def",
    }


@pytest.mark.parametrize(
    "reason",
    ["credential_missing", "token_expired", "token_not_yet_valid", "token_audience_not_allowed", "token_issuer_not_allowed",
     "token_signature_invalid", "token_algorithm_not_allowed", "token_algorithm_not_allowed ", "token_malformed"],
)
def test_bad_credentials_get_401_with_distinct_reasons(envoy, keys, echo, reason):
    token = _bad_tokens(keys)[reason]
    r = get(envoy, token=token)
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["reason"] == reason.strip()
    assert body["decision_id"].startswith("dec_")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["content-type"] == "application/json"


def test_policy_deny_is_403_json(envoy, keys):
    r = get(envoy, "/admin/users", token=keys.token())
    assert r.status_code == 403
    body = r.json()
    assert body == {
        "error": "forbidden",
        "action": "deny",
        "reasons": ["path_forbidden"],
        "decision_id": body["decision_id"],
        "session_id": body["session_id"],
    }
    assert r.headers["x-warden-decision"] == body["decision_id"]


def test_step_up_is_401_with_rfc9470_challenge(envoy, keys):
    r = get(envoy, "/secrets/db", token=keys.token())
    assert r.status_code == 401
    www = r.headers["www-authenticate"]
    assert 'error="insufficient_user_authentication"' in www
    assert 'acr_values="phr phrh"' in www
    assert r.json()["reasons"] == ["sensitive_path"]
    # A token with a strong acr passes.
    assert get(envoy, "/secrets/db", token=keys.token(acr="phr")).status_code == 200


def test_throttle_is_429_with_retry_after(envoy, keys):
    token = keys.token(sub="busy-bot")
    sid = "throttle-session-1"
    codes = [get(envoy, token=token, headers={"x-session-id": sid}).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    r = get(envoy, token=token, headers={"x-session-id": sid})
    assert r.status_code == 429 and r.headers["retry-after"] == "5"


def test_client_copies_of_stamped_headers_never_reach_upstream(envoy, keys):
    forged = {
        "x-warden-subject": "root",
        "x-warden-session": "ses_stolen",
        "x-warden-step": "999",
        "x-warden-decision": "dec_forged",
        "x-warden-anything": "x",
    }
    r = get(envoy, token=keys.token(sub="honest-agent"), headers=forged)
    assert r.status_code == 200
    seen = r.json()["headers"]
    assert seen["x-warden-subject"] == "honest-agent"
    assert seen["x-warden-session"] != "ses_stolen"
    assert seen["x-warden-step"] == "1"
    assert seen["x-warden-decision"] != "dec_forged"
    assert "x-warden-anything" not in seen


def test_session_continues_and_is_bound_to_its_subject(envoy, keys):
    r1 = get(envoy, token=keys.token(sub="agent-a"))
    sid = r1.headers["x-warden-session"]
    rotated = keys.token(sub="agent-a", alg="ES256")  # same subject, new credential
    r2 = get(envoy, token=rotated, headers={"x-session-id": sid})
    assert r2.status_code == 200
    assert r2.json()["headers"]["x-warden-step"] == "2"
    assert r2.json()["headers"]["x-warden-session"] == sid
    r3 = get(envoy, token=keys.token(sub="agent-b"), headers={"x-session-id": sid})
    assert r3.status_code == 403
    assert r3.json()["reasons"] == ["session_bound_to_other_subject"]


def test_traceparent_is_kept_when_valid_and_replaced_when_not(envoy, keys):
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert get(envoy, token=keys.token(), headers={"traceparent": tp}).json()["headers"]["traceparent"] == tp
    made = get(envoy, token=keys.token(), headers={"traceparent": "junk"}).json()["headers"]["traceparent"]
    assert TRACEPARENT.match(made) and made != "junk"


def test_api_key_identity(envoy):
    r = get(envoy, headers={"x-api-key": API_KEY})
    assert r.status_code == 200
    assert r.json()["headers"]["x-warden-subject"] == "batch-exporter"
    r = get(envoy, headers={"x-api-key": "ak_live_wrong"})
    assert r.status_code == 401 and r.json()["reason"] == "api_key_unknown"


def test_spiffe_identity_from_mtls_peer(envoy, certs):
    url = envoy.url("mtls", "/tickets", scheme="https")
    r = requests.get(url, cert=certs.client, verify=certs.ca, timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["x-warden-subject"] == certs.spiffe_id


def test_non_utf8_header_is_a_400_not_a_crash(envoy, keys):
    port = envoy.ports["enforce"]
    raw = b"GET /tickets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xfd\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["reason"] == "header_malformed"
    # The VM is still alive afterwards.
    assert get(envoy, token=keys.token()).status_code == 200


def test_shadow_mode_lets_would_be_denials_through_and_counts_them(envoy, keys):
    before = envoy.stats().get("wasmcustom.warden.shadow.deny", 0)
    r = get(envoy, "/admin/users", token=keys.token(), listener="shadow")
    assert r.status_code == 200
    r = get(envoy, "/tickets", listener="shadow")  # no credential at all
    assert r.status_code == 200
    stats = envoy.stats()
    assert stats["wasmcustom.warden.shadow.deny"] == before + 1
    assert stats["wasmcustom.warden.shadow.unauthenticated"] >= 1


def test_jwks_url_is_fetched_and_used(envoy, keys, jwks_server):
    token = keys.token()
    deadline = time.time() + 10
    while True:
        r = get(envoy, token=token, listener="jwks_url")
        if r.status_code == 200 or time.time() > deadline:
            break
        assert r.json()["reason"] == "token_keys_unavailable"
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert jwks_server.hits >= 1
    # The JWKS server failing keeps the last good keys in use.
    jwks_server.status = 503
    try:
        hits = jwks_server.hits
        deadline = time.time() + 10
        while jwks_server.hits == hits and time.time() < deadline:
            time.sleep(0.1)
        assert jwks_server.hits > hits, "the JWKS was not refreshed"
        assert get(envoy, token=keys.token(), listener="jwks_url").status_code == 200
    finally:
        jwks_server.status = 200
    assert envoy.stats()["wasmcustom.warden.jwks.fetch_failed"] >= 1


def test_metrics_are_in_stats_and_prometheus(envoy, keys):
    get(envoy, token=keys.token())
    get(envoy, token=keys.token(ttl=-3600))
    stats = envoy.stats()
    assert stats["wasmcustom.warden.requests"] > 0
    assert stats["wasmcustom.warden.decisions.allow"] > 0
    assert stats["wasmcustom.warden.identity_failures.token_expired"] > 0
    prom = envoy.prometheus()
    assert re.search(r"^warden_decisions_allow\{\} [1-9]", prom, re.M), [l for l in prom.splitlines() if "warden" in l]


def test_jwt_cache_serves_repeated_tokens(envoy, keys):
    token = keys.token()
    before = envoy.stats().get("wasmcustom.warden.jwt_cache.hit", 0)
    for _ in range(5):
        assert get(envoy, token=token).status_code == 200
    assert envoy.stats()["wasmcustom.warden.jwt_cache.hit"] >= before + 4


def test_invalid_config_is_refused_with_the_reason_logged(runtime, keys, echo):
    bad = base_config(keys)
    bad["identity"]["jwt"]["providers"][0]["algorithms"] = ["none"]
    e = h.Envoy(h.bootstrap([h.listener("bad", [h.wasm_filter(bad, runtime)])], [h.cluster("echo", echo.port)]))
    try:
        with pytest.raises(h.EnvoyError):
            e.wait_ready(timeout=30)
        assert e.wait_exit(timeout=10) != 0, "Envoy must refuse a configuration the filter rejects"
        assert "session-warden: invalid configuration: identity.jwt.providers[0].algorithms: unsupported algorithm `none`" in e.log()
    finally:
        e.stop()
