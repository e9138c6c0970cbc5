"""`make demo`: Envoy with Session Warden in front of an echo upstream, a short scripted agent
session, and what happened to each request. Everything it starts, it stops."""

import json
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import harness as h  # noqa: E402

BOLD, DIM, RED, GREEN, YELLOW, RESET = "\033[1m", "\033[2m", "\033[31m", "\033[32m", "\033[33m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = RED = GREEN = YELLOW = RESET = ""


def step(msg):
    print(f"{BOLD}==>{RESET} {msg}", flush=True)


def main() -> int:
    step("generating signing keys for a demo identity provider")
    keys = h.Keys()
    tmp = tempfile.TemporaryDirectory(prefix="warden-demo-")
    step(f"starting the session-state service (SQLite in {tmp.name})")
    state = h.StateService(Path(tmp.name) / "warden-state.db")
    step("starting an echo upstream")
    echo = h.echo_server()
    # The settings `warden config` turns into a complete Envoy bootstrap (README, "Quick start"):
    # the policy directory, the identity provider, the state service and where everything is.
    settings = {
        "policy": {"dir": str(h.ROOT / "policies")},
        "identity": {"jwt": {"providers": [{"name": "demo-idp", "issuer": h.ISSUER, "audiences": [h.AUDIENCE], "jwks": keys.jwks()}]}},
        "state": {"cluster": "warden-state", "mode": "sync", "token_env": "WARDEN_PROXY_TOKEN"},
        "envoy": {
            "listen": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
            "upstream": f"127.0.0.1:{echo.port}",
            "clusters": {"warden-state": f"127.0.0.1:{state.port}"},
            "module": {"file": str(h.WASM)},
        },
    }
    step("warden config --format bootstrap: the plugin configuration validated, and the Envoy bootstrap around it")
    envoy = None
    try:
        bootstrap = h.warden_config(settings, "bootstrap", env={"WARDEN_PROXY_TOKEN": h.PROXY_TOKEN})
        step("starting Envoy with that bootstrap")
        envoy = h.Envoy(bootstrap)
    except Exception:
        state.stop()
        echo.stop()
        tmp.cleanup()
        raise
    try:
        envoy.wait_ready()
        url = envoy.url("warden")
        step(f"Envoy is up: listener {url}  admin {envoy.admin}")
        print(f"{DIM}    policy: policies/session.rego with policies/data.json{RESET}\n")

        agent = keys.token(sub="ticket-agent", scope="tickets:read")
        sid = None

        def send(title, path, token=None, extra=None, method="GET"):
            nonlocal sid
            hs = dict(extra or {})
            if token:
                hs["authorization"] = f"Bearer {token}"
            if sid:
                hs.setdefault("x-session-id", sid)
            r = requests.request(method, url.rstrip("/") + path, headers=hs, timeout=5)
            color = GREEN if r.status_code == 200 else (YELLOW if r.status_code in (401, 429) else RED)
            print(f"{BOLD}{title}{RESET}\n    {method} {path} -> {color}{r.status_code}{RESET}")
            if r.status_code == 200:
                seen = r.json()["headers"]
                sid = sid or seen.get("x-warden-session")
                for k in ("x-warden-session", "x-warden-step", "x-warden-subject", "x-warden-decision", "traceparent"):
                    print(f"    upstream saw {k}: {seen.get(k)}")
            else:
                body = r.json()
                print(f"    {json.dumps(body)}")
                if "www-authenticate" in r.headers:
                    print(f"    WWW-Authenticate: {r.headers['www-authenticate']}")
            print()
            return r

        send("1. an agent reads tickets (allowed; a session is minted)", "/tickets", agent)
        send("2. same session, next step (step 2, same session id)", "/tickets/42", agent)
        send("3. it tries to forge who it is (client x-warden-* headers are stripped)", "/tickets", agent, {"x-warden-subject": "root"})
        send("4. it wanders into /admin (policy denies: 403 with reason codes)", "/admin/users", agent)
        send("5. it asks for secrets (policy wants a step-up: RFC 9470 challenge)", "/secrets/db", agent)
        send("6. with a stronger token (acr=phr) the step-up is satisfied", "/secrets/db", keys.token(sub="ticket-agent", acr="phr"))
        send("7. another identity presents the same session (bound to its subject: 403)", "/tickets", keys.token(sub="intruder"))
        send("8. the agent rotates its token mid-session (allowed, recorded)", "/tickets/43", keys.token(sub="ticket-agent", alg="ES256"))
        demo_sid, sid = sid, None
        send("9. no credential at all (401)", "/tickets")
        send("10. an expired token (401 with its own reason code)", "/tickets", keys.token(ttl=-3600))

        stats = envoy.stats()
        print(f"{BOLD}Counters (Envoy /stats):{RESET}")
        for k in sorted(stats):
            if stats[k] and k.startswith("wasmcustom."):
                print(f"    {k}: {stats[k]}")

        print()
        step(f"the session's attribution trail: warden session show {demo_sid}")
        state.wait_timeline(demo_sid, 7)
        print(h.warden_cli("session", "show", demo_sid, url=state.url).stdout)
        step(f"warden session verify {demo_sid}")
        print(h.warden_cli("session", "verify", demo_sid, url=state.url).stdout)
        return 0
    except h.EnvoyError as e:
        print(f"{RED}Envoy failed to start:{RESET} {e}", file=sys.stderr)
        return 1
    finally:
        step("stopping Envoy, the state service and the upstream")
        envoy.stop()
        state.stop()
        echo.stop()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
