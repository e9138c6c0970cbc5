import contextlib
import hashlib
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness as h  # noqa: E402

API_KEY = "ak_live_5f1b7c2e9d"


def pytest_generate_tests(metafunc):
    if "runtime" in metafunc.fixturenames:
        runtimes = h.wasm_runtimes()
        if not runtimes:
            pytest.exit(f"{h.ENVOY} reports no wasm runtime: run 'make setup'", returncode=2)
        metafunc.parametrize("runtime", runtimes, scope="session")


@pytest.fixture(scope="session", autouse=True)
def _built():
    if not h.ENVOY.exists():
        pytest.exit(f"Envoy is missing at {h.ENVOY}: run 'make setup'", returncode=2)
    if not h.WASM.exists():
        pytest.exit(f"the filter is not built at {h.WASM}: run 'make build'", returncode=2)


@pytest.fixture(scope="session")
def keys():
    return h.Keys()


@pytest.fixture(scope="session")
def tmpdir_session():
    with tempfile.TemporaryDirectory(prefix="warden-e2e-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def certs(tmpdir_session):
    return h.Certs(tmpdir_session)


@pytest.fixture(scope="session")
def echo():
    s = h.echo_server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def jwks_server(keys):
    s = h.JwksServer(keys.jwks(("RS256",)))
    yield s
    s.stop()


def base_config(keys, **over) -> dict:
    policy = h.deep_merge(h.policy_library(), {"data": {"warden": {"config": {"limits": {"max_steps": 5}}}}})
    cfg = {
        "policy": policy,
        "identity": {
            "jwt": {
                "providers": [
                    {"name": "corp", "issuer": h.ISSUER, "audiences": [h.AUDIENCE], "jwks": keys.jwks(), "algorithms": ["RS256", "ES256", "EdDSA"]},
                    {"name": "hs", "issuer": h.HS_ISSUER, "audiences": [h.AUDIENCE], "jwks": keys.hs_jwks(), "algorithms": ["HS256"]},
                ]
            },
            "api_keys": {"keys": [{"sha256": hashlib.sha256(API_KEY.encode()).hexdigest(), "subject": "batch-exporter", "scopes": ["tickets:read"]}]},
        },
        # The tests' client on loopback plays the front proxy that sets region and device headers.
        "context": {"trusted_sources": ["127.0.0.1"]},
    }
    return h.deep_merge(cfg, over)


@pytest.fixture(scope="session")
def envoy(runtime, keys, echo, jwks_server, certs):
    """One Envoy with a listener per configuration under test."""
    enforce = base_config(keys)
    shadow = base_config(keys, mode="shadow")
    jwks_url = base_config(keys)
    jwks_url["identity"]["jwt"]["providers"] = [
        {"name": "remote", "issuer": h.ISSUER, "audiences": [h.AUDIENCE], "algorithms": ["RS256"],
         "jwks_uri": {"cluster": "jwks", "path": "/.well-known/jwks.json", "refresh_seconds": 2, "timeout_ms": 500}}
    ]
    mtls = base_config(keys, identity={"spiffe": {"trust_domains": ["example.org"]}})
    config = h.bootstrap(
        [
            h.listener("enforce", [h.wasm_filter(enforce, runtime)]),
            h.listener("shadow", [h.wasm_filter(shadow, runtime)]),
            h.listener("jwks_url", [h.wasm_filter(jwks_url, runtime)]),
            h.listener("mtls", [h.wasm_filter(mtls, runtime)], tls=h.mtls_transport(certs)),
        ],
        [h.cluster("echo", echo.port), h.cluster("jwks", jwks_server.port)],
    )
    e = h.Envoy(config)
    try:
        e.wait_ready()
        yield e
    finally:
        e.stop()


@contextlib.contextmanager
def envoy_with_state(tmpdir: Path, name: str, listeners: list, clusters: list):
    """A real warden-state (SQLite under `tmpdir`) and an Envoy whose `warden-state` cluster
    points at it; both stopped on exit, also on failure."""
    state = h.StateService(tmpdir / f"{name}-{uuid.uuid4().hex[:6]}.db")
    envoy = None
    try:
        envoy = h.Envoy(h.bootstrap(listeners, clusters + [h.cluster("warden-state", state.port)])).wait_ready()
        yield envoy, state
    finally:
        if envoy:
            envoy.stop()
        state.stop()
