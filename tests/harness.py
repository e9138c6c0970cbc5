"""Real parts for the end-to-end tests, the demo and the bench: Envoy (from the project's
.venv), an echo upstream, a JWKS server, signing keys and test certificates.

Servers bind port 0 and report the port they got; Envoy's admin address and listener ports are
read back from Envoy itself. Everything started here is stopped by `stop()` / context exit.
"""

from __future__ import annotations

import base64
import copy
import datetime
import functools
import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
ENVOY = Path(os.environ.get("ENVOY_BIN", VENV_BIN / "envoy"))
WASM = Path(os.environ.get("WARDEN_WASM", ROOT / "target/session_warden.wasm"))
ISSUER = "https://issuer.warden.test"
HS_ISSUER = "https://hs.warden.test"
AUDIENCE = "tickets-api"


# ---------------------------------------------------------------- upstreams


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output readable
        pass

    def _send(self, status: int, body: bytes, ctype="application/json", extra=None):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Echo(_Quiet):
    """Answers every request with the method, path and headers it received, and keeps it in
    its server's `requests` (what the upstream saw, for tests that must prove it saw nothing)."""

    def _read_chunked(self) -> bytes:
        """A chunked request body (what Envoy sends upstream for an HTTP/2 request without
        content-length); what arrived if the stream is cut short."""
        body = b""
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                return body
            try:
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
            except ValueError:
                return body
            if size == 0:
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return body
            chunk = self.rfile.read(size)
            body += chunk
            if len(chunk) < size:
                return body
            self.rfile.readline(8)

    def _echo(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
        doc = {
            "method": self.command,
            "path": self.path,
            # The request target byte for byte (`path` is http.server's, which folds a leading `//`).
            "target": self.requestline.split(" ")[1] if self.requestline.count(" ") >= 2 else self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        seen = getattr(self.server, "requests", None)
        if seen is not None:
            seen.append(doc)
        # `/bytes/N`: a response of N bytes (data-volume scenarios), at most 64 MiB.
        if self.path.startswith("/bytes/") and self.path[7:].isdigit():
            return self._send(200, b"x" * min(int(self.path[7:]), 64 << 20), "application/octet-stream")
        self._send(200, json.dumps(doc).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _echo


class Server:
    """A threaded HTTP server on 127.0.0.1, port chosen by the kernel."""

    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        # Every request an echo handler answered, in arrival order.
        self.requests: list[dict] = []
        self.httpd.requests = self.requests  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def echo_server() -> Server:
    return Server(_Echo)


class JwksServer(Server):
    """Serves a JWKS document; `status` can be switched to make fetches fail."""

    def __init__(self, jwks: dict):
        outer = self
        self.jwks = jwks
        self.status = 200
        self.hits = 0

        class H(_Quiet):
            def do_GET(self):
                outer.hits += 1
                if outer.status != 200:
                    self._send(outer.status, b"unavailable", "text/plain")
                else:
                    self._send(200, json.dumps(outer.jwks).encode())

        super().__init__(H)


# ---------------------------------------------------------------- keys and tokens


class Keys:
    """One signing key per supported algorithm, with the matching JWKS."""

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.hs_secret = os.urandom(32)

    def jwk(self, alg: str) -> dict:
        if alg == "RS256":
            d = json.loads(RSAAlgorithm.to_jwk(self.rsa.public_key()))
            d.update(kid="rsa1", alg="RS256", use="sig")
        elif alg == "ES256":
            d = json.loads(ECAlgorithm.to_jwk(self.ec.public_key()))
            d.update(kid="ec1", alg="ES256", use="sig")
        elif alg == "EdDSA":
            d = json.loads(OKPAlgorithm.to_jwk(self.ed.public_key()))
            d.update(kid="ed1", alg="EdDSA", use="sig")
        else:
            raise ValueError(alg)
        return d

    def jwks(self, algs=("RS256", "ES256", "EdDSA")) -> dict:
        return {"keys": [self.jwk(a) for a in algs]}

    def hs_jwks(self) -> dict:
        k = base64.urlsafe_b64encode(self.hs_secret).rstrip(b"=").decode()
        return {"keys": [{"kty": "oct", "kid": "hs1", "k": k, "alg": "HS256"}]}

    def token(self, sub="agent-7", alg="RS256", iss=ISSUER, aud=AUDIENCE, ttl=600, **claims) -> str:
        now = int(time.time())
        body = {"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        key, kid = {
            "RS256": (self.rsa, "rsa1"),
            "ES256": (self.ec, "ec1"),
            "EdDSA": (self.ed, "ed1"),
            "HS256": (self.hs_secret, "hs1"),
        }[alg]
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    def rsa_public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, secret: bytes | None = None) -> str:
    """A token built by hand: `alg: none`, or HS256 keyed with whatever bytes an attacker has."""
    signing = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    sig = b"" if secret is None else hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64url(sig)


def std_claims(sub="agent-7", iss=ISSUER, aud=AUDIENCE, ttl=600) -> dict:
    now = int(time.time())
    return {"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + ttl}


# ---------------------------------------------------------------- sender-constrained tokens


def cert_x5t(cert_pem_path: str) -> str:
    """RFC 8705 `x5t#S256` of a certificate: base64url SHA-256 of its DER."""
    cert = x509.load_pem_x509_certificate(Path(cert_pem_path).read_bytes())
    return b64url(cert.fingerprint(hashes.SHA256()))


class DpopKey:
    """A client's DPoP key (P-256) and the RFC 9449 proofs it makes."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwk = {k: v for k, v in json.loads(ECAlgorithm.to_jwk(self.key.public_key())).items() if k in ("kty", "crv", "x", "y")}

    @property
    def jkt(self) -> str:
        """RFC 7638 thumbprint: SHA-256 of the required members, sorted, no whitespace."""
        canonical = json.dumps({k: self.jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def proof(self, method: str, url: str, token: str, iat: int | None = None, jti: str | None = None) -> str:
        claims = {"htm": method, "htu": url, "iat": int(time.time()) if iat is None else iat,
                  "jti": jti or uuid.uuid4().hex, "ath": b64url(hashlib.sha256(token.encode()).digest())}
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": self.jwk})


# ---------------------------------------------------------------- certificates


class Certs:
    """A CA, a server certificate for 127.0.0.1 and a client with a SPIFFE URI SAN."""

    def __init__(self, directory: Path, spiffe_id="spiffe://example.org/ns/agents/sa/ticket-bot"):
        self.dir = directory
        self.spiffe_id = spiffe_id
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "warden test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))

        def leaf(name: str, san: list):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            c = self._write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
            k = self._write(
                f"{name}.key",
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            )
            return c, k

        import ipaddress

        self.server = leaf("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        self.client = leaf("client", [x509.UniformResourceIdentifier(spiffe_id)])
        # Another client of the same CA: a valid mTLS peer, but not the certificate a token names.
        self.client2 = leaf("client2", [x509.UniformResourceIdentifier("spiffe://example.org/ns/agents/sa/other-bot")])

    def _write(self, name: str, data: bytes) -> str:
        p = self.dir / name
        p.write_bytes(data)
        return str(p)


# ---------------------------------------------------------------- Envoy configuration


def policy_library() -> dict:
    """The Rego modules and data in policies/, as the plugin config's `policy` section."""
    pdir = ROOT / "policies"
    modules = {p.name: p.read_text() for p in sorted(pdir.glob("*.rego")) if not p.name.endswith("_test.rego")}
    return {"modules": modules, "data": json.loads((pdir / "data.json").read_text())}


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def warden_config(settings: dict, fmt="json", *sets: str, env: dict | None = None) -> dict:
    """`warden config --format FMT` on these settings (README, "warden config"): the plugin
    configuration, ECDS file or Envoy bootstrap the CLI builds, validated as the filter does.
    Raises with the CLI's message when it refuses them."""
    if not CLI_BIN.exists():
        raise RuntimeError(f"{CLI_BIN} is missing: run 'make build'")
    with tempfile.TemporaryDirectory(prefix="warden-config-") as d:
        path = Path(d) / "settings.json"
        path.write_text(json.dumps(settings))
        args = [str(CLI_BIN), "config", "--settings", str(path), "--format", fmt]
        for s in sets:
            args += ["--set", s]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=dict(os.environ, **(env or {})))
    if out.returncode != 0:
        raise RuntimeError(f"warden config failed ({out.returncode}): {out.stderr.strip()}")
    built = json.loads(out.stdout)
    keep_for_replay(built)
    return built


@functools.lru_cache(maxsize=None)
def _reference_bootstrap() -> str:
    """The bootstrap `warden config` writes (crates/warden-cli/src/config/envoy.rs), for a
    one-line policy: the one place the project writes an Envoy configuration. The harness takes
    the filter's shape, the secure connection-manager settings and the buffer filter from it."""
    settings = {
        "policy": {"modules": {"allow.rego": "package warden.session\nimport rego.v1\ndefault decision := {\"action\": \"allow\"}"}},
        "envoy": {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "upstream": "127.0.0.1:9"},
    }
    return json.dumps(warden_config(settings, "bootstrap"))


def _reference_http_filters() -> list:
    b = json.loads(_reference_bootstrap())
    return b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]


def wasm_filter(plugin_config: dict | str, runtime="envoy.wasm.runtime.v8", vm_id="session-warden") -> dict:
    """The filter entry `warden config` writes, with this plugin configuration, runtime, VM id
    and the module under test."""
    value = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    f = copy.deepcopy(_reference_http_filters()[0])
    assert f["name"] == "envoy.filters.http.wasm", f
    cfg = f["typed_config"]["config"]
    cfg["vm_config"].update(vm_id=vm_id, runtime=runtime, code={"local": {"filename": str(WASM)}})
    cfg["configuration"]["value"] = value
    return f


def secure_hcm() -> dict:
    """The HttpConnectionManager settings a secure deployment must have in front of the warden
    (README "Deploying securely" says why each), as `warden config` writes them: Envoy
    normalizes the path it routes on, sends upstream and hands the filter; refuses escaped
    slashes and underscore header names; and takes the client address from the connection, not
    from a header the client wrote."""
    b = json.loads(_reference_bootstrap())
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {k: v for k, v in hcm.items() if k not in ("@type", "stat_prefix", "codec_type", "route_config", "http_filters")}


def _is_warden(f: dict) -> bool:
    return f.get("name") == "envoy.filters.http.wasm" and f.get("typed_config", {}).get("config", {}).get("name") == "session-warden"


def with_buffer_after_warden(http_filters: list) -> list:
    """The chain with Envoy's buffer filter right after the warden (unless one is there): the
    upstream sees nothing of a request whose body the warden reads, not even its headers,
    before the decision."""
    out = list(http_filters)
    for i, f in enumerate(out):
        if _is_warden(f):
            if not (i + 1 < len(out) and out[i + 1].get("name") == "envoy.filters.http.buffer"):
                out.insert(i + 1, buffer_filter())
            break
    return out


def listener(
    name: str, http_filters: list, cluster="echo", tls: dict | None = None, direct_response=False, hcm: dict | None = None, secure=True
) -> dict:
    """A listener with one HttpConnectionManager. `secure` (the default, and what every shipped
    config uses) applies `secure_hcm()` and puts the buffer filter after the warden; `hcm` is
    merged over it. `secure=False` is the bare listener of the hostile tests: what the filter
    alone must hold."""
    route = {"match": {"prefix": "/"}}
    if secure:
        hcm = deep_merge(secure_hcm(), hcm or {})
        http_filters = with_buffer_after_warden(http_filters)
    if direct_response:
        route["direct_response"] = {"status": 200, "body": {"inline_string": "ok"}}
    else:
        route["route"] = {"cluster": cluster, "timeout": "10s"}
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
            "http_filters": http_filters
            + [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            **(hcm or {}),
        },
    }
    chain = {"filters": [hcm]}
    if tls:
        chain["transport_socket"] = tls
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [chain],
    }


def mtls_transport(certs: Certs) -> dict:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": certs.server[0]}, "private_key": {"filename": certs.server[1]}}],
                "validation_context": {"trusted_ca": {"filename": certs.ca}},
            },
        },
    }


def cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }


def bootstrap(listeners: list, clusters: list) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


# ---------------------------------------------------------------- Envoy process


def wasm_runtimes() -> list[str]:
    """The wasm runtimes compiled into this Envoy build (from its startup extension list)."""
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "min.json"
        cfg.write_text(json.dumps(bootstrap([], [])))
        p = subprocess.Popen(
            [str(ENVOY), "-c", str(cfg), "-l", "info", "--disable-hot-restart", "--admin-address-path", str(Path(d) / "a")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        found: list[str] = []
        try:
            deadline = time.time() + 20
            for line in p.stdout:  # type: ignore[union-attr]
                m = re.search(r"envoy\.wasm\.runtime: (.*)$", line)
                if m:
                    found = [r.strip() for r in m.group(1).split(",") if not r.strip().endswith(".null")]
                    break
                if time.time() > deadline:
                    break
        finally:
            p.kill()
            p.wait()
    return found


# ---------------------------------------------------------------- replay equality (make test)
# With WARDEN_REPLAY_DIR set (make test sets it), every plugin configuration an Envoy is started
# with and every session a state service holds when it is stopped are kept there; after the suite,
# `warden replay --config … --file …` re-decides each recorded step natively with the policy
# version it was recorded under (tests/replay_check.py), and any step decided otherwise fails
# `make test`.

REPLAY_DIR = os.environ.get("WARDEN_REPLAY_DIR")


def _plugin_configs(node) -> list[dict]:
    """Every plugin configuration in a bootstrap, ECDS resource or `warden config` output: an
    object with `policy.modules`, or a JSON string of one."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("policy"), dict) and "modules" in node["policy"]:
            found.append(node)
        else:
            for v in node.values():
                found += _plugin_configs(v)
    elif isinstance(node, list):
        for v in node:
            found += _plugin_configs(v)
    elif isinstance(node, str) and node.startswith("{") and '"policy"' in node:
        try:
            found += _plugin_configs(json.loads(node))
        except ValueError:
            pass
    return found


def keep_for_replay(config) -> None:
    """Keep the plugin configurations in `config` for the replay-equality check."""
    if not REPLAY_DIR:
        return
    d = Path(REPLAY_DIR) / "configs"
    d.mkdir(parents=True, exist_ok=True)
    for c in _plugin_configs(config):
        text = json.dumps(c, sort_keys=True)
        (d / (hashlib.sha256(text.encode()).hexdigest()[:24] + ".json")).write_text(text)


class EnvoyError(RuntimeError):
    pass


def stop_process(proc: subprocess.Popen | None, grace=5.0):
    """SIGTERM, then SIGKILL if it does not exit within `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Envoy:
    """An Envoy process on a bootstrap config; knows its admin and listener ports."""

    def __init__(self, config: dict, concurrency=1, log_level="info", workdir: Path | None = None):
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="warden-envoy-")
        self.dir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.config_path = self.dir / "envoy.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        keep_for_replay(config)
        self.admin_path = self.dir / "admin-address"
        self.log_path = self.dir / "envoy.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                str(ENVOY), "-c", str(self.config_path), "--concurrency", str(concurrency), "-l", log_level,
                "--disable-hot-restart", "--admin-address-path", str(self.admin_path),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.admin = ""
        self.ports: dict[str, int] = {}

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout=30.0, accepting: str | None = None, poll=0.05) -> "Envoy":
        """Until /ready says LIVE and the listener ports are known; with `accepting`, also until
        that listener accepts a TCP connection (the bench times this)."""
        deadline = time.time() + timeout
        session = requests.Session()
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyError(f"Envoy exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if not self.admin and self.admin_path.exists():
                addr = self.admin_path.read_text().strip()
                if addr:
                    self.admin = f"http://{addr}"
            if self.admin:
                try:
                    if session.get(self.admin + "/ready", timeout=1).text.strip() == "LIVE":
                        listeners = session.get(self.admin + "/listeners?format=json", timeout=1).json()
                        for l in listeners.get("listener_statuses", []):
                            self.ports[l["name"]] = l["local_address"]["socket_address"]["port_value"]
                        if accepting is None:
                            return self
                        if accepting in self.ports:
                            socket.create_connection(("127.0.0.1", self.ports[accepting]), timeout=1).close()
                            return self
                except (requests.RequestException, OSError, ValueError):
                    pass
            time.sleep(poll)
        raise EnvoyError(f"Envoy not ready after {timeout}s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout=30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def url(self, listener: str, path="/", scheme="http") -> str:
        return f"{scheme}://127.0.0.1:{self.ports[listener]}{path}"

    def _stats(self, filter_re: str) -> dict[str, int]:
        text = requests.get(self.admin + "/stats", params={"filter": filter_re}, timeout=2).text
        out = {}
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out

    def stats(self, filter_re="warden", timeout=5.0) -> dict[str, int]:
        """Counters once settled: the filter flushes its counters to Envoy on its 100 ms tick, so
        read until two reads 150 ms apart agree."""
        deadline = time.time() + timeout
        prev = self._stats(filter_re)
        while time.time() < deadline:
            time.sleep(0.15)
            cur = self._stats(filter_re)
            if cur == prev:
                return cur
            prev = cur
        return prev

    def prometheus(self) -> str:
        return requests.get(self.admin + "/stats/prometheus", timeout=2).text

    def stop(self):
        stop_process(self.proc)
        self._log.close()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------- session-state service and CLI

STATE_BIN = Path(os.environ.get("WARDEN_STATE_BIN", ROOT / "target/release/warden-state"))
CLI_BIN = Path(os.environ.get("WARDEN_CLI_BIN", ROOT / "target/release/warden"))
PROXY_TOKEN = "proxy-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
LOG_TOKEN = "log-" + uuid.uuid4().hex
LOG_ORIGIN = "warden-e2e/log"


class _OwnProcess:
    """A server process the tests started: `kill()` is a crash (SIGKILL), `stop()` a clean stop."""

    proc: subprocess.Popen | None = None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        stop_process(self.proc)


class StateService(_OwnProcess):
    """The real warden-state binary on a SQLite file, or with `store` (a `redis://…` or
    `redis+cluster://…` URL) one replica of a service sharing that store; replicas of one
    service share the log's signing key (`key`: the path it is made at, by default beside `db`).
    `kill()` is a crash (SIGKILL); `start()` again comes back on the same port and store."""

    def __init__(self, db: Path, port: int = 0, store: str | None = None, key: Path | None = None, env: dict | None = None):
        self.db = Path(db)
        self.port = port
        self.store = store
        # More of the service's settings, as its environment variables (e.g. WARDEN_SSF_*).
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.db.with_suffix(".log")
        # The log's signing key, made once per database (kept across restarts, like a real one);
        # `vkey` is its public verifier key, all an offline verifier is given.
        self.key_path = Path(key) if key else self.db.with_suffix(".key")
        self.vkey_path = self.key_path.with_suffix(".vkey")
        if not self.key_path.exists():
            out = subprocess.run([str(STATE_BIN), "keygen", "--name", LOG_ORIGIN, "--out", str(self.key_path)],
                                 capture_output=True, text=True, check=True)
            self.vkey_path.write_text(out.stdout)
        self.vkey = self.vkey_path.read_text().strip()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=15.0) -> "StateService":
        env = dict(os.environ, WARDEN_PROXY_TOKEN=PROXY_TOKEN, WARDEN_ADMIN_TOKEN=ADMIN_TOKEN, WARDEN_LOG_TOKEN=LOG_TOKEN, **self.env)
        log = open(self.log_path, "a")
        where = ["--store", self.store] if self.store else ["--db", str(self.db)]
        self.proc = subprocess.Popen(
            [str(STATE_BIN), "--listen", f"127.0.0.1:{self.port}", *where, "--log-key", str(self.key_path)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )
        log.close()
        deadline = time.time() + timeout
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"warden-state did not start: {line!r}\n{self.log_path.read_text()[-2000:]}")
        self.port = int(m.group(1))
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.05)
        raise RuntimeError(f"warden-state not ready in time\n{self.log_path.read_text()[-2000:]}")


    def admin(self, path: str, method="GET", **kw):
        return requests.request(method, self.url + path, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5, **kw)

    def stop(self):
        self.keep_for_replay()
        super().stop()

    def keep_for_replay(self):
        """Every session this service holds, as `warden session export` writes them, for the
        replay-equality check (only with WARDEN_REPLAY_DIR; a service that is down has nothing
        to give)."""
        if not REPLAY_DIR or self.proc is None or self.proc.poll() is not None:
            return
        try:
            found = self.admin("/v1/sessions", params={"limit": 10000})
            if found.status_code != 200:
                return
            lines = []
            for s in found.json()["sessions"]:
                r = self.admin(f"/v1/sessions/{s['id']}")
                if r.status_code == 200:
                    lines.append(json.dumps(r.json()))
        except (requests.RequestException, ValueError, KeyError):
            return
        if lines:
            d = Path(REPLAY_DIR) / "sessions"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{uuid.uuid4().hex}.jsonl").write_text("\n".join(lines) + "\n")

    def session(self, sid: str) -> dict | None:
        r = self.admin(f"/v1/sessions/{sid}")
        return r.json() if r.status_code == 200 else None

    def wait_timeline(self, sid: str, n: int, timeout=10.0) -> dict:
        """The session once its trail holds at least `n` records (they arrive in batches)."""
        deadline = time.time() + timeout
        view = None
        while time.time() < deadline:
            view = self.session(sid)
            if view and len(view["timeline"]) >= n:
                return view
            time.sleep(0.05)
        got = len(view["timeline"]) if view else 0
        raise AssertionError(f"session {sid}: {got} records after {timeout}s, expected {n}")

    def wait_complete_timeline(self, sid: str, at_least: int, timeout=10.0) -> dict:
        """The session once its trail holds a record for every step the service counted (a
        streaming request's record is written when its stream ends)."""
        deadline = time.time() + timeout
        view = self.wait_timeline(sid, at_least, timeout)
        while len(view["timeline"]) < view["state"]["steps"] and time.time() < deadline:
            time.sleep(0.05)
            view = self.session(sid) or view
        assert len(view["timeline"]) == view["state"]["steps"], f"{sid}: {len(view['timeline'])} records for {view['state']['steps']} steps"
        return view


# ---------------------------------------------------------------- Redis (Debian's redis-server, installed by make setup)

REDIS_SERVER = os.environ.get("REDIS_SERVER_BIN", "redis-server")
REDIS_CLI = os.environ.get("REDIS_CLI_BIN", "redis-cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_command(port: int, *args: str, timeout=2.0) -> str | None:
    """One command over RESP; its reply's first line (None when nothing answers)."""
    req = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(req.encode())
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
            if data.startswith(b"$"):
                n = int(data.split(b"\r\n", 1)[0][1:])
                while n >= 0 and len(data.split(b"\r\n", 1)[1]) < n:
                    data += sock.recv(65536)
                return data.split(b"\r\n", 1)[1][:max(n, 0)].decode()
            return data.split(b"\r\n", 1)[0][1:].decode()
    except OSError:
        return None


class RedisServer(_OwnProcess):
    """A redis-server on a free loopback port, its files in `directory`; ready once it answers
    PING. `kill()` is a crash; `start()` again comes back on the same port and files (with AOF
    on, every write it acknowledged)."""

    def __init__(self, directory: Path, *args: str):
        import shutil

        if not shutil.which(REDIS_SERVER):
            raise RuntimeError("redis-server is not installed: run 'make setup'")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout=15.0) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--logfile", str(self.dir / "redis.log"), *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-1500:]}")
            if redis_command(self.port, "PING", timeout=0.5) == "PONG":
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {self.port} did not answer PING in {timeout}s")

    def command(self, *args: str) -> str | None:
        return redis_command(self.port, *args)



def durable_redis(directory: Path) -> RedisServer:
    """AOF with `appendfsync always`: a write is on disk before Redis acknowledges it."""
    return RedisServer(directory, "--save", "", "--appendonly", "yes", "--appendfsync", "always")


class RedisCluster:
    """A local Redis Cluster: three masters, no replicas (AOF always on each), created with
    redis-cli and ready at `cluster_state:ok`."""

    def __init__(self, directory: Path):
        self.nodes: list[RedisServer] = []
        try:
            for i in range(3):
                self.nodes.append(RedisServer(
                    Path(directory) / f"node{i}", "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                    "--cluster-port", str(free_port()),
                ))
            out = subprocess.run(
                [REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            )
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-1500:]}{out.stderr[-500:]}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def wait_ok(self, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all("cluster_state:ok" in (n.command("CLUSTER", "INFO") or "") for n in self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self):
        for n in self.nodes:
            n.stop()


def replicas_cluster(name: str, ports: list[int]) -> dict:
    """An Envoy cluster over state replicas: round robin, active health checks on /readyz (a
    replica whose store does not answer takes no traffic), outlier detection (a replica that
    dies is ejected after its first failed call)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in ports
            ]}],
        },
        "health_checks": [{
            "timeout": "0.25s", "interval": "0.25s", "no_traffic_interval": "0.25s",
            "unhealthy_threshold": 1, "healthy_threshold": 1,
            "http_health_check": {"path": "/readyz"},
        }],
        "outlier_detection": {
            "consecutive_5xx": 1, "consecutive_gateway_failure": 1, "consecutive_local_origin_failure": 1,
            "interval": "0.25s", "base_ejection_time": "1s", "max_ejection_percent": 50,
        },
    }


def warden_cli(*args: str, url: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, WARDEN_STATE_URL=url, WARDEN_ADMIN_TOKEN=token or ADMIN_TOKEN)
    return subprocess.run([str(CLI_BIN), *args], capture_output=True, text=True, env=env, timeout=30)


def state_config(cluster="warden-state", mode="sync", **extra) -> dict:
    cfg = {"cluster": cluster, "mode": mode, "token": PROXY_TOKEN, "timeout_ms": 500, "flush_interval_ms": 100}
    cfg.update(extra)
    return cfg


class McpServer:
    """tests/mcp_server.py in its own process."""

    def __init__(self, log: Path | None = None):
        """With `log`, every request the server is sent is written there (`seen()`)."""
        self.log = log
        args = [str(log)] if log else []
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "mcp_server.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        # The SDK may warn first (a tool name that is not plain ASCII is one the test wants).
        lines = [self.proc.stdout.readline() for _ in range(1)]  # type: ignore[union-attr]
        while "listening on" not in lines[-1] and lines[-1] and len(lines) < 20:
            lines.append(self.proc.stdout.readline())  # type: ignore[union-attr]
        line = "".join(lines)
        m = re.search(r"listening on (\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"MCP server did not start: {line!r}")
        self.port = int(m.group(1))
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("MCP server not accepting connections")

    def seen(self) -> list[dict]:
        """The requests the server was sent, in order: method, MCP and x-warden-* headers, body."""
        if not self.log or not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def stop(self):
        stop_process(self.proc)


def buffer_filter(max_bytes: int = 1024 * 1024) -> dict:
    """Envoy's buffer filter as `warden config` places it after the warden: the upstream sees
    nothing of a request (not even its headers) until the warden has read the body and decided."""
    f = copy.deepcopy(_reference_http_filters()[1])
    assert f["name"] == "envoy.filters.http.buffer", f
    f["typed_config"]["max_request_bytes"] = max_bytes
    return f


# ---------------------------------------------------------------- raw clients for hostile input
# HTTP client libraries normalize paths (and refuse odd ones) before sending: these send exactly
# the bytes given, so a test sees what Envoy and the filter make of them.


def _read_http1_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:n]
    # chunked or close-delimited: the request asked for `connection: close`, so read to the end.
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, buf = b"", rest
        while buf:
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, buf = body + buf[:size], buf[size + 2 :]
        rest = body
    return status, headers, rest


def http1_request(
    port: int, method: str, path: bytes | str, headers: dict | list | None = None, body: bytes = b"", host="localhost", timeout=5.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a raw socket, the request target sent byte for byte; returns
    (status, lower-cased headers, body). The connection is closed after the response."""
    target = path.encode("latin-1") if isinstance(path, str) else path
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"host: " + host.encode()]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in pairs]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}".encode())
    lines.append(b"connection: close")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        return _read_http1_response(sock)


def h2_request(
    port: int,
    method: str,
    path: bytes | str,
    headers: dict | list | None = None,
    body: bytes = b"",
    trailers: dict | list | None = None,
    authority="localhost",
    timeout=5.0,
) -> tuple[int | None, dict[str, str], bytes]:
    """One HTTP/2 request (cleartext, prior knowledge) on a fresh connection, `:path` sent byte
    for byte; with `trailers`, the request ends with a trailers HEADERS frame instead of
    END_STREAM on the last DATA frame. Returns (status, lower-cased headers, body); status is
    None when the stream was reset (or the connection closed) before a response, and then
    headers hold `x-h2-reset` (the error code) or `x-h2-closed`."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    target = path.encode("latin-1") if isinstance(path, str) else path
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    trailer_pairs = list(trailers.items()) if isinstance(trailers, dict) else list(trailers or [])
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False))
    status: int | None = None
    resp_headers: dict[str, str] = {}
    resp_body = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        request = [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", authority.encode()), (b":path", target)]
        request += [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v) for k, v in pairs]
        conn.send_headers(sid, request, end_stream=not body and not trailer_pairs)
        sock.sendall(conn.data_to_send())
        done = False

        def pump() -> bool:
            """Read one batch of frames; True once the stream (or the connection) is over."""
            nonlocal status, resp_body
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                resp_headers.setdefault("x-h2-closed", "1")
                return True
            over = False
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    for k, v in ev.headers:
                        k, v = k.decode(), v.decode("latin-1")
                        if k == ":status":
                            status = int(v)
                        else:
                            resp_headers[k] = v
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    resp_body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    over = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    resp_headers["x-h2-reset"] = str(int(ev.error_code))
                    over = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    resp_headers.setdefault("x-h2-closed", str(int(ev.error_code)))
                    over = True
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
            return over

        # The body, as flow control allows; the server may answer (and end the stream) first.
        sent = 0
        try:
            while sent < len(body) and not done:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    done = pump()
                    continue
                chunk = body[sent : sent + window]
                sent += len(chunk)
                conn.send_data(sid, chunk, end_stream=sent == len(body) and not trailer_pairs)
                sock.sendall(conn.data_to_send())
            if trailer_pairs and not done:
                encoded = [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v) for k, v in trailer_pairs]
                conn.send_headers(sid, encoded, end_stream=True)
                sock.sendall(conn.data_to_send())
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # the server ended the stream first: its answer is read below
        while not done:
            done = pump()
    return status, resp_headers, resp_body
