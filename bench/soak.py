"""`make soak`: a bounded soak of Session Warden. Concurrent agent sessions at a fixed request
rate for a fixed time through a real Envoy with the built filter and a real `warden-state` on
SQLite, then proof that nothing was lost or leaked. It exists because a security control that
drops a trail record or grows without bound under steady load breaks its promise only after
minutes, which no unit or end-to-end test runs for. Not part of `make test`; a short pass of the
same code runs in the e2e suite (`tests/e2e/test_soak_short.py`, through `run()`).

One warden-state (SQLite, shared by the phases) and one echo upstream; then, per mode (sync,
then cached), a fresh Envoy (`--concurrency 1`) with the filter in that mode (or, with
SOAK_TOGETHER=1, as the e2e suite's short pass does to save an Envoy start, one Envoy with a
listener per mode and the sessions shared out between them). SOAK_SESSIONS
sessions, each its own token subject and `x-session-id`, one request in flight per session,
paced on an absolute schedule so the total is SOAK_RATE requests/s for SOAK_SECONDS. The mix,
fixed by the request's index in its session: REST GETs and POSTs on /tickets (200), a forbidden
path (403 `path_forbidden`: a refused step, in the trail too), and a request without a token
(401: refused before any session step, so never in the trail).

Checks (each failure is named, and the exit status is 1):
- every client request got an answer with the status its kind expects;
- trail: per session the records are steps 1..n in trail order, exactly the n steps the client
  got an answer for (no gap, no duplicate), each with the client's decision id and status; the
  service counted n steps; waited for by polling the service's counters, with a deadline;
- `warden session verify` passes for every session (the CLI, warden_core::trail);
- flat memory (after a warm-up; the median of the last third of the samples against the first
  third): Envoy's RSS (/proc), Envoy's own heap (`server.memory_allocated`), and the VM heap
  (`warden.vm.memory_kib`, the filter's gauge: linear memory of its VMs, summed); see
  RSS_SLACK_*, HEAP_SLACK_* and VM_SLACK_KIB below for the thresholds and why;
- nothing logged at `[error]`/`[critical]` by Envoy, nor ERROR/panic by warden-state (its
  stderr, where its logger writes warnings and errors);
  warden-state's counters: no store error or failed transaction, no refused (4xx) request, no
  refused step;
- the filter's counters: `warden.records.dropped`, `warden.state.unavailable` and
  `warden.policy_errors` are 0.

Knobs (environment): SOAK_SECONDS (60, per mode), SOAK_RATE (200 requests/s, total),
SOAK_SESSIONS (24), SOAK_MODES (sync,cached), SOAK_OUT (bench/soak.json), SOAK_FLUSH_DEADLINE
(60 s for the trail to catch up), SOAK_PROGRESS (5 s between progress lines), SOAK_README
(bench/README.md: its Soak section, between markers `make bench` keeps, is rewritten from this
run; empty: leave it), SOAK_TOGETHER (0).
Every server binds port 0 on 127.0.0.1 and is stopped on exit, also on failure.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
from types import SimpleNamespace
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import harness as h  # noqa: E402
import run as benchrun  # noqa: E402  (bench/run.py: machine, source, /proc helpers, limits)

SOAK_BEGIN, SOAK_END = benchrun.SOAK_BEGIN, benchrun.SOAK_END

# Flatness thresholds, last third against first third (medians) after the warm-up.
# RSS: Envoy's RSS moves by a few MiB with no leak at all (V8's GC, allocator arenas, connection
# buffers), so allow the larger of 4 MiB and 3%. The smallest per-request leak this can catch is
# printed with the result (the slack divided by the requests sent between the two thirds).
RSS_SLACK_KIB = 4096
RSS_SLACK_PCT = 3.0
# Envoy's heap (tcmalloc's allocated bytes): the same reasoning, the same slack.
HEAP_SLACK_KIB = 4096
HEAP_SLACK_PCT = 3.0
# The VM heap: wasm linear memory only grows, in 64 KiB pages, and the filter's allocator settles
# within the warm-up; allow 16 pages (1 MiB) over the whole measured window, a fraction of what a
# leak of a record, a session or a header map per request would add.
VM_SLACK_KIB = 1024


def log(msg: str) -> None:
    print(f"[soak] {msg}", flush=True)


@dataclass
class Settings:
    seconds: float = 60.0
    rate: float = 200.0
    sessions: int = 24
    modes: tuple[str, ...] = ("sync", "cached")
    out: Path | None = ROOT / "bench" / "soak.json"
    readme: Path | None = None  # where the Soak section goes (bench/README.md for `make soak`)
    flush_deadline: float = 60.0
    progress: float = 5.0
    together: bool = False  # one Envoy, a listener per mode, driven at once (one phase)

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        out = env("SOAK_OUT", str(ROOT / "bench" / "soak.json"))
        return cls(
            seconds=float(env("SOAK_SECONDS", "60")),
            rate=float(env("SOAK_RATE", "200")),
            sessions=int(env("SOAK_SESSIONS", "24")),
            modes=tuple(m.strip() for m in env("SOAK_MODES", "sync,cached").split(",") if m.strip()),
            out=Path(out) if out else None,
            readme=Path(env("SOAK_README", str(ROOT / "bench" / "README.md"))) if env("SOAK_README", "x") else None,
            flush_deadline=float(env("SOAK_FLUSH_DEADLINE", "60")),
            progress=float(env("SOAK_PROGRESS", "5")),
            together=env("SOAK_TOGETHER", "0") == "1",
        )

    def check(self) -> None:
        if not (0 < self.seconds <= 3600 and 0 < self.rate <= 5000 and 1 <= self.sessions <= 256):
            raise SystemExit("SOAK_SECONDS must be in (0, 3600], SOAK_RATE in (0, 5000], SOAK_SESSIONS in [1, 256]")
        if not self.modes or any(m not in ("sync", "cached") for m in self.modes):
            raise SystemExit("SOAK_MODES: a comma-separated list of sync and cached")


# ---------------------------------------------------------------- the filter's configuration


def warden_config(keys: h.Keys, mode: str) -> dict:
    """The bench's configuration (the shipped policy library with its step-count and step-rate
    limits raised: a soak session takes hundreds of steps a minute) with a forbidden path given no
    risk weight, so the soak's steady 5% of refused steps is refused for the path every time
    instead of escalating the session to step-up, throttle and terminate (which the scenario tests
    cover), and the state service in the given mode."""
    cfg = benchrun.warden_config(SimpleNamespace(keys=keys))
    cfg["policy"] = h.deep_merge(cfg["policy"], {"data": {"warden": {"config": {"risk": {"weights": {"path_forbidden": 0}}}}}})
    cfg["state"] = h.state_config(mode=mode, timeout_ms=1000, flush_interval_ms=100)
    return cfg


# ---------------------------------------------------------------- the client


def kind_of(k: int) -> str:
    """The request's kind by its index in its session: 5% forbidden, 2% unauthenticated, a
    quarter of the rest POSTs."""
    if k % 20 == 7:
        return "forbidden"
    if k % 50 == 23:
        return "unauthenticated"
    return "post" if k % 4 == 1 else "get"


EXPECTED = {"get": 200, "post": 200, "forbidden": 403, "unauthenticated": 401}
IS_STEP = {"get": True, "post": True, "forbidden": True, "unauthenticated": False}


@dataclass
class Answer:
    k: int
    kind: str
    status: int
    decision: str
    step_header: str  # x-warden-step as the upstream saw it (200s only)
    upstream_decision: str = ""  # x-warden-decision as the upstream saw it (200s only)


@dataclass
class Agent:
    """One agent session: its own subject and session id, one request in flight."""

    index: int
    mode: str
    sid: str
    subject: str
    token: str
    sent: int = 0
    answers: list[Answer] = field(default_factory=list)
    no_answer: list[str] = field(default_factory=list)

    def steps(self) -> list[Answer]:
        return [a for a in self.answers if IS_STEP[a.kind]]


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0
        self.answered = 0
        self.late = 0  # requests sent more than 100 ms after their scheduled time

    def add(self, sent=0, answered=0, late=0):
        with self.lock:
            self.sent += sent
            self.answered += answered
            self.late += late


def request(conn: http.client.HTTPConnection, agent: Agent, k: int, kind: str) -> tuple[int, dict, bytes]:
    headers = {"x-session-id": agent.sid, "user-agent": "warden-soak/1"}
    if kind != "unauthenticated":
        headers["authorization"] = f"Bearer {agent.token}"
    body = None
    if kind == "get":
        method, path = "GET", f"/tickets/{k}"
    elif kind == "post":
        method, path = "POST", "/tickets"
        body = json.dumps({"title": f"soak ticket {k}", "session": agent.index}).encode()
        headers["content-type"] = "application/json"
    elif kind == "forbidden":
        method, path = "GET", "/admin/users"
    else:
        method, path = "GET", f"/tickets/{k}"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def drive(agent: Agent, port: int, t0: float, seconds: float, interval: float, offset: float, counters: Counters) -> None:
    """Send on the schedule t0 + offset + k*interval until t0 + seconds; bounded by both the
    count (seconds/interval + 1) and the time (each request times out after 5 s)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    end = t0 + seconds
    try:
        for k in range(int(seconds / interval) + 1):
            due = t0 + offset + k * interval
            if due >= end:
                break
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.1:
                counters.add(late=1)
            kind = kind_of(k)
            agent.sent += 1
            counters.add(sent=1)
            try:
                status, headers, data = request(conn, agent, k, kind)
            except (OSError, http.client.HTTPException) as e:
                agent.no_answer.append(f"request {k} ({kind}): {type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                continue
            counters.add(answered=1)
            step, seen_decision = "", ""
            if status == 200:
                try:
                    seen = json.loads(data)["headers"]
                    step, seen_decision = seen.get("x-warden-step", ""), seen.get("x-warden-decision", "")
                except (ValueError, KeyError, TypeError, AttributeError):
                    step = "?"
            agent.answers.append(Answer(k, kind, status, headers.get("x-warden-decision", ""), step, seen_decision))
    finally:
        conn.close()


# ---------------------------------------------------------------- sampling


class Sampler:
    """Envoy's RSS (/proc) and its stats (the filter's counters and gauge, Envoy's heap) every
    `every` seconds, on its own thread; prints a progress line every `progress` seconds."""

    STATS = r"^(wasmcustom\.warden\.|server\.memory_)"

    def __init__(self, envoy: h.Envoy, counters: Counters, every: float, progress: float, t0: float):
        self.envoy, self.counters, self.every, self.progress, self.t0 = envoy, counters, every, progress, t0
        self.samples: list[dict] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.session = requests.Session()

    def sample(self) -> dict:
        rss = benchrun.proc_status(self.envoy.proc.pid).get("VmRSS", 0)
        text = self.session.get(self.envoy.admin + "/stats", params={"filter": self.STATS}, timeout=2).text
        stats = {}
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().lstrip("-").isdigit():
                stats[k] = int(v)
        with self.counters.lock:
            sent, answered = self.counters.sent, self.counters.answered
        return {
            "t": round(time.monotonic() - self.t0, 3),
            "sent": sent,
            "answered": answered,
            "rss_kib": rss,
            "vm_kib": stats.get("wasmcustom.warden.vm.memory_kib", 0),
            "heap_kib": stats.get("server.memory_allocated", 0) // 1024,
            "stats": {k.removeprefix("wasmcustom."): v for k, v in stats.items() if k.startswith("wasmcustom.")},
        }

    def _loop(self):
        last_print, last_answered, last_t = time.monotonic(), 0, 0.0
        while not self.stop.is_set():
            try:
                s = self.sample()
                self.samples.append(s)
            except (OSError, requests.RequestException, ValueError) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                s = None
            now = time.monotonic()
            if s and now - last_print >= self.progress:
                rps = (s["answered"] - last_answered) / max(1e-9, s["t"] - last_t)
                log(f"  {s['t']:6.1f} s  sent {s['sent']:7d}  answered {s['answered']:7d}  {rps:6.1f} rps  "
                    f"RSS {s['rss_kib'] / 1024:6.1f} MiB  VM heap {s['vm_kib']} KiB")
                last_print, last_answered, last_t = now, s["answered"], s["t"]
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)


def flatness(samples: list[dict], key: str, warmup: float, slack_kib: float, slack_pct: float) -> dict:
    """Median of the last third against the first third of the samples after `warmup` s."""
    kept = [s for s in samples if s["t"] >= warmup]
    if len(kept) < 6:
        return {"ok": False, "why": f"only {len(kept)} samples after the {warmup:.0f} s warm-up (need 6)"}
    n = len(kept) // 3
    first, last = kept[:n], kept[-n:]
    a = statistics.median(s[key] for s in first)
    b = statistics.median(s[key] for s in last)
    allowed = max(slack_kib, a * slack_pct / 100)
    between = statistics.median(s["answered"] for s in last) - statistics.median(s["answered"] for s in first)
    # Least squares slope over every kept sample, KiB per minute (for the report only).
    ts = [s["t"] for s in kept]
    ys = [s[key] for s in kept]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts) or 1.0
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den * 60
    return {
        "ok": b - a <= allowed,
        "first_third_kib": a,
        "last_third_kib": b,
        "growth_kib": b - a,
        "allowed_kib": round(allowed, 1),
        "requests_between": between,
        "smallest_leak_caught_bytes_per_request": round(allowed * 1024 / between, 1) if between > 0 else None,
        "slope_kib_per_min": round(slope, 1),
        "samples": len(kept),
        "min_kib": min(ys),
        "max_kib": max(ys),
    }


# ---------------------------------------------------------------- checks


def error_lines(text: str, needles: tuple[str, ...], limit=10) -> list[str]:
    found = [l for l in text.splitlines() if any(n in l for n in needles)]
    return found[:limit] + ([f"... and {len(found) - limit} more"] if len(found) > limit else [])


def state_metrics(state: h.StateService) -> dict[str, int]:
    r = requests.get(state.url + "/metrics", headers={"authorization": f"Bearer {h.ADMIN_TOKEN}"}, timeout=5)
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            if v.isdigit():
                out[k] = int(v)
    return out


def wait_for_trail(state: h.StateService, expected_records: int, deadline_s: float) -> tuple[bool, int, float]:
    """Poll the service's appended-records counter until it reaches `expected_records` (every
    phase so far) or the deadline passes. Returns (reached, records, seconds waited)."""
    t0 = time.monotonic()
    got = 0
    while True:
        got = state_metrics(state).get("warden_state_records_appended_total", 0)
        if got >= expected_records:
            return True, got, time.monotonic() - t0
        if time.monotonic() - t0 > deadline_s:
            return False, got, time.monotonic() - t0
        time.sleep(0.1)


def check_trail(state: h.StateService, agent: Agent) -> list[str]:
    """The session's trail against what its client saw: steps 1..n in trail order, each the
    client's decision and status; the service counted n steps; the CLI verifies the chain."""
    problems = []
    r = requests.get(state.url + f"/v1/sessions/{agent.sid}", headers={"authorization": f"Bearer {h.ADMIN_TOKEN}"}, timeout=60)
    if r.status_code != 200:
        return [f"{agent.sid}: the service answered {r.status_code} for the session"]
    view = r.json()
    mine = agent.steps()
    n = len(mine)
    records = [e["record"] for e in view["timeline"]]
    steps = [rec["step"] for rec in records]
    if steps != list(range(1, n + 1)):
        dups = sorted({s for s in steps if steps.count(s) > 1}) if len(steps) < 20000 else []
        missing = sorted(set(range(1, n + 1)) - set(steps))
        extra = sorted(set(steps) - set(range(1, n + 1)))
        disorder = next((i for i in range(1, len(steps)) if steps[i] < steps[i - 1]), None)
        problems.append(
            f"{agent.sid}: trail holds {len(steps)} records for the {n} steps the client got answers for"
            f" (missing {missing[:10]}, duplicated {dups[:10]}, unexpected {extra[:10]}"
            f"{'' if disorder is None else f', out of order at record {disorder}'})"
        )
    by_step = {rec["step"]: rec for rec in records}
    wrong = []
    for j, a in enumerate(mine, start=1):
        rec = by_step.get(j)
        if rec is None:
            continue
        if rec.get("decision_id") != a.decision or rec.get("status") != a.status:
            wrong.append(f"step {j}: trail {rec.get('decision_id')}/{rec.get('status')}, client {a.decision}/{a.status}")
        # A JSON POST has its body read before the step is taken (it could be JSON-RPC), so its
        # headers went on without x-warden-step: the upstream correlates it by its decision id.
        if a.status == 200 and a.kind == "post":
            if a.upstream_decision != a.decision or a.step_header not in ("", str(j)):
                wrong.append(f"step {j}: the upstream saw decision {a.upstream_decision!r} step {a.step_header!r}")
        elif a.status == 200 and a.step_header != str(j):
            wrong.append(f"step {j}: the upstream saw x-warden-step {a.step_header!r}")
    if wrong:
        problems.append(f"{agent.sid}: {len(wrong)} steps differ from what the client saw: {wrong[:5]}")
    if view["state"]["steps"] != n:
        problems.append(f"{agent.sid}: the service counted {view['state']['steps']} steps, the client {n}")
    if view.get("revoked_at_ms"):
        problems.append(f"{agent.sid}: revoked ({view.get('revoke_reason')})")
    cli = h.warden_cli("--json", "session", "verify", agent.sid, url=state.url)
    try:
        verdict = json.loads(cli.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        verdict = {}
    if cli.returncode != 0 or not verdict.get("ok") or verdict.get("records") != n:
        problems.append(f"{agent.sid}: warden session verify: exit {cli.returncode}: {cli.stdout.strip()[:300]} {cli.stderr.strip()[:300]}")
    return problems


# ---------------------------------------------------------------- one phase


def phase(modes: tuple[str, ...], st: Settings, keys: h.Keys, state: h.StateService, echo: h.Server, run_id: str,
          records_before: int) -> dict:
    """One Envoy with a listener per mode (named after it), the sessions shared out between them,
    driven for st.seconds; its checks' results."""
    failures: list[str] = []
    mode = "+".join(modes)
    config = h.bootstrap(
        [h.listener(m, [h.wasm_filter(warden_config(keys, m))]) for m in modes],
        [h.cluster("echo", echo.port), h.cluster("warden-state", state.port)],
    )
    agents = []
    for i in range(st.sessions):
        m = modes[i % len(modes)]
        subject = f"soak-agent-{m}-{i:03d}"
        agents.append(Agent(i, m, f"soak-{run_id}-{m}-{i:03d}", subject,
                            keys.token(sub=subject, ttl=int(st.seconds) + 900, scope="tickets:read")))
    interval = st.sessions / st.rate  # each session's own period
    every = min(1.0, max(0.1, st.seconds / 40))
    warmup = min(30.0, max(1.0, 0.15 * st.seconds))
    counters = Counters()
    envoy = h.Envoy(config, concurrency=1, log_level="info")
    try:
        envoy.wait_ready(timeout=60, accepting=modes[-1])
        log(f"{mode}: Envoy ready (pid {envoy.proc.pid}); {st.sessions} sessions, {st.rate:g} requests/s for {st.seconds:g} s")
        cpu0 = {"envoy": benchrun.cpu_seconds(envoy.proc.pid), "state": benchrun.cpu_seconds(state.proc.pid),
                "self": sum(os.times()[:2]), "machine": benchrun.machine_busy_seconds()}
        t0 = time.monotonic()
        with Sampler(envoy, counters, every, st.progress, t0) as sampler:
            threads = [
                threading.Thread(target=drive, args=(a, envoy.ports[a.mode], t0, st.seconds, interval, interval * a.index / st.sessions, counters), daemon=True)
                for a in agents
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=st.seconds + 30)
            stuck = sum(t.is_alive() for t in threads)
            if stuck:
                failures.append(f"{stuck} client threads still running 30 s after the end")
        elapsed = time.monotonic() - t0
        cpu1 = {"envoy": benchrun.cpu_seconds(envoy.proc.pid), "state": benchrun.cpu_seconds(state.proc.pid),
                "self": sum(os.times()[:2]), "machine": benchrun.machine_busy_seconds()}
        cpu = {k: round(100 * (cpu1[k] - cpu0[k]) / elapsed, 1) for k in cpu0}
        cpu["others"] = round(max(0.0, cpu["machine"] - cpu["envoy"] - cpu["state"] - cpu["self"]), 1)
        del cpu["machine"]

        sent = sum(a.sent for a in agents)
        answered = sum(len(a.answers) for a in agents)
        steps = sum(len(a.steps()) for a in agents)
        by_kind: dict[str, dict[str, int]] = {}
        unexpected = []
        for a in agents:
            for ans in a.answers:
                d = by_kind.setdefault(ans.kind, {})
                d[str(ans.status)] = d.get(str(ans.status), 0) + 1
                if ans.status != EXPECTED[ans.kind]:
                    unexpected.append(f"{a.sid} request {ans.k} ({ans.kind}): {ans.status}, expected {EXPECTED[ans.kind]}")
        no_answer = [f"{a.sid} {m}" for a in agents for m in a.no_answer]
        log(f"{mode}: sent {sent}, answered {answered} in {elapsed:.1f} s ({answered / elapsed:.1f} rps); {steps} steps; "
            f"{counters.late} sent over 100 ms late")
        if no_answer:
            failures.append(f"{len(no_answer)} requests got no answer: {no_answer[:5]}")
        if unexpected:
            failures.append(f"{len(unexpected)} answers with an unexpected status: {unexpected[:5]}")
        if sampler.errors:
            failures.append(f"{len(sampler.errors)} samples failed: {sampler.errors[:3]}")

        # The trail: wait (deadline) until the service appended every step of this and earlier
        # phases, then compare each session with its client.
        reached, appended, waited = wait_for_trail(state, records_before + steps, st.flush_deadline)
        log(f"{mode}: trail {'caught up' if reached else 'did NOT catch up'}: {appended - records_before} of {steps} records appended after {waited:.1f} s")
        if not reached:
            failures.append(f"the trail holds {appended - records_before} of {steps} records {st.flush_deadline:g} s after the load ended")
        final = envoy.stats(r"^wasmcustom\.warden\.")
        final = {k.removeprefix("wasmcustom."): v for k, v in final.items()}
        for name in ("warden.records.dropped", "warden.state.unavailable", "warden.policy_errors"):
            if final.get(name, 0) != 0:
                failures.append(f"{name} is {final[name]}, expected 0")
        if final.get("warden.records.sent", 0) < steps:
            failures.append(f"warden.records.sent is {final.get('warden.records.sent', 0)}, fewer than the {steps} steps")
        trail_problems: list[str] = []
        for a in agents:
            trail_problems += check_trail(state, a)
        if trail_problems:
            failures.append(f"trail: {len(trail_problems)} problems: {trail_problems[:5]}")
        else:
            log(f"{mode}: trail: {steps} steps in {len(agents)} sessions, each once and in order, every chain verified")

        mem = {
            "rss": flatness(sampler.samples, "rss_kib", warmup, RSS_SLACK_KIB, RSS_SLACK_PCT),
            "envoy_heap": flatness(sampler.samples, "heap_kib", warmup, HEAP_SLACK_KIB, HEAP_SLACK_PCT),
            "vm_heap": flatness(sampler.samples, "vm_kib", warmup, VM_SLACK_KIB, 0.0),
        }
        for what, m in mem.items():
            if not m["ok"]:
                failures.append(f"{what} not flat: " + (m.get("why") or
                                f"{m['first_third_kib']:.0f} KiB -> {m['last_third_kib']:.0f} KiB (+{m['growth_kib']:.0f}, allowed {m['allowed_kib']:.0f})"))
        errors = error_lines(envoy.log(), ("][error]", "][critical]"))
        if errors:
            failures.append(f"Envoy logged {len(errors)} errors: {errors[:5]}")
        warnings = error_lines(envoy.log(), ("][warning]",))
        configured = [l.split("session-warden: ", 1)[-1] for l in envoy.log().splitlines() if "session-warden: configured" in l]
        return {
            "mode": mode,
            "seconds": round(elapsed, 1),
            "sent": sent,
            "answered": answered,
            "rps": round(answered / elapsed, 1),
            "late": counters.late,
            "steps": steps,
            "sessions": len(agents),
            "by_kind": by_kind,
            "trail_wait_s": round(waited, 2),
            "filter_counters": final,
            "memory": mem,
            "warmup_s": warmup,
            "sample_every_s": every,
            "cpu_pct": cpu,
            "envoy_errors": errors,
            "envoy_warnings": warnings,
            "vms_configured": len(configured),
            "configured": configured[:1],
            "samples": [{k: v for k, v in s.items() if k != "stats"} for s in sampler.samples],
            "failures": failures,
        }
    finally:
        envoy.stop()


# ---------------------------------------------------------------- run


def run(st: Settings) -> dict:
    """The whole soak; returns the report (its `failures` list empty when every check passed)."""
    st.check()
    for p, what in ((h.ENVOY, "Envoy (make setup)"), (h.WASM, "the filter (make build)"), (h.STATE_BIN, "warden-state (make build)"), (h.CLI_BIN, "warden (make build)")):
        if not Path(p).exists():
            raise SystemExit(f"missing {what}: {p}")
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.monotonic()
    run_id = started.strftime("%H%M%S")
    keys = h.Keys()
    report: dict = {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {"seconds_per_phase": st.seconds, "rate": st.rate, "sessions": st.sessions, "modes": list(st.modes), "together": st.together},
        "thresholds": {"rss": f"max({RSS_SLACK_KIB} KiB, {RSS_SLACK_PCT}%)", "envoy_heap": f"max({HEAP_SLACK_KIB} KiB, {HEAP_SLACK_PCT}%)",
                       "vm_heap": f"{VM_SLACK_KIB} KiB"},
        # bench/run.py's machine description, less what concerns wrk and pinning (the soak uses neither).
        "machine": {k: v for k, v in benchrun.machine().items() if k not in ("wrk", "pinning")},
        "source": benchrun.source(),
        "phases": [],
        "failures": [],
    }
    with tempfile.TemporaryDirectory(prefix="warden-soak-") as tmp:
        echo = h.echo_server()
        state = None
        try:
            state = h.StateService(Path(tmp) / "soak.db")
            log(f"warden-state on {state.url} (SQLite in {tmp}); echo upstream on port {echo.port}")
            records = 0
            for modes in ([st.modes] if st.together else [(m,) for m in st.modes]):
                ph = phase(modes, st, keys, state, echo, run_id, records)
                records += ph["steps"]
                report["phases"].append(ph)
                report["failures"] += [f"{ph['mode']}: {f}" for f in ph["failures"]]
            sm = state_metrics(state)
            report["state_counters"] = {k.removeprefix("warden_state_"): v for k, v in sm.items() if k.startswith("warden_state_")}
            for name in ("warden_state_store_errors_total", "warden_state_store_failed_transactions_total",
                         "warden_state_rejected_requests_total", "warden_state_steps_refused_total"):
                if sm.get(name, 0):
                    report["failures"].append(f"warden-state: {name} is {sm[name]}, expected 0")
        finally:
            if state:
                state.stop()
            echo.stop()
        if state:
            text = state.log_path.read_text(errors="replace") if state.log_path.exists() else ""
            errors = error_lines(text, ("ERROR", "panicked"))
            report["state_log_errors"] = errors
            if errors:
                report["failures"].append(f"warden-state logged {len(errors)} errors: {errors[:5]}")
    report["wall_seconds"] = round(time.monotonic() - t_start, 1)
    return report


def summary(rep: dict) -> str:
    lines = [f"soak {rep['date']}: {len(rep['phases'])} phase(s), {rep['wall_seconds']} s in all"]
    for p in rep["phases"]:
        m = p["memory"]

        def mem(k):
            x = m[k]
            return (f"{x['first_third_kib'] / 1024:.1f} -> {x['last_third_kib'] / 1024:.1f} MiB" if "first_third_kib" in x else x.get("why", ""))

        lines.append(
            f"  {p['mode']:6s}: {p['seconds']} s, {p['sessions']} sessions, {p['answered']}/{p['sent']} answered ({p['rps']} rps), "
            f"{p['steps']} steps in the trail; RSS {mem('rss')}; Envoy heap {mem('envoy_heap')}; VM heap "
            f"{m['vm_heap'].get('first_third_kib', 0):.0f} -> {m['vm_heap'].get('last_third_kib', 0):.0f} KiB; "
            f"dropped {p['filter_counters'].get('warden.records.dropped', 0)}; Envoy errors {len(p['envoy_errors'])}"
        )
    lines.append("PASS: every check held" if not rep["failures"] else f"FAIL: {len(rep['failures'])} check(s) failed:")
    lines += [f"  - {f}" for f in rep["failures"]]
    return "\n".join(lines)


def command(st: Settings) -> str:
    knobs = [f"SOAK_SECONDS={st.seconds:g}", f"SOAK_RATE={st.rate:g}", f"SOAK_SESSIONS={st.sessions}"]
    if st.modes != ("sync", "cached"):
        knobs.append(f"SOAK_MODES={','.join(st.modes)}")
    if st.together:
        knobs.append("SOAK_TOGETHER=1")
    return " ".join(knobs) + " make soak"


def readme_section(rep: dict, st: Settings) -> str:
    """bench/README.md's Soak section, from this run."""
    m = rep["machine"]
    rows = []
    for p in rep["phases"]:
        mem = p["memory"]

        def thirds(k, div=1024.0, unit="MiB"):
            x = mem[k]
            if "first_third_kib" not in x:
                return "n/a"
            fmt = ".1f" if unit == "MiB" else ".0f"
            return f"{x['first_third_kib'] / div:{fmt}} → {x['last_third_kib'] / div:{fmt}} {unit} ({'flat' if x['ok'] else '**grew**'})"

        rows.append(
            f"| {p['mode']} | {p['seconds']} | {p['rps']} | {p['sessions']} | {p['sent']} / {p['answered']} | {p['steps']} |"
            f" {thirds('rss')} | {thirds('envoy_heap')} | {thirds('vm_heap', 1, 'KiB')} |"
            f" {p['filter_counters'].get('warden.records.dropped', 0)} | {len(p['envoy_errors'])} | {p['cpu_pct'].get('others', 0)}% |"
        )
    verdict = "**every check held**" if not rep["failures"] else "**FAILED**: " + "; ".join(rep["failures"][:5])
    leak = [p["memory"]["rss"].get("smallest_leak_caught_bytes_per_request") for p in rep["phases"]]
    leak = [x for x in leak if x]
    return "\n".join([
        SOAK_BEGIN,
        "## Soak",
        "",
        "`make soak` (not part of `make test`; `bench/soak.py`, which writes this section and `bench/soak.json`)",
        "drives concurrent agent sessions, each its own subject and `x-session-id`, at a fixed total rate for a",
        "fixed time through a real Envoy (`--concurrency 1`) with the built filter, first in sync then in cached",
        "mode, against one real `warden-state` on SQLite and an echo upstream. Per session 93% REST GETs and POSTs",
        "(200), 5% a forbidden path (403, a refused step) and 2% without a token (401, no step). Then it checks",
        "that every step a client got an answer for is in the trail exactly once, in order, with the client's",
        "decision id and status, that `warden session verify` passes for every session, that Envoy's RSS, Envoy's",
        "heap (`server.memory_allocated`) and the VM heap (the filter's `warden.vm.memory_kib` gauge: the wasm",
        "linear memory of its VMs, summed) are flat (median of the last third of the samples against the first,",
        f"after a warm-up of 15% of the phase; allowed growth: RSS and Envoy heap max({RSS_SLACK_KIB // 1024} MiB,",
        f"{RSS_SLACK_PCT:g}%), V8 and allocator jitter being a few MiB; VM heap {VM_SLACK_KIB} KiB, 16 wasm pages),",
        "that neither Envoy nor warden-state logged an error, that warden-state counted no store error or failed",
        "transaction, 4xx or refused step, and that `warden.records.dropped`, `warden.state.unavailable` and",
        "`warden.policy_errors` are 0. Knobs: `SOAK_SECONDS` (60, per mode), `SOAK_RATE` (200/s), `SOAK_SESSIONS` (24), `SOAK_MODES`.",
        "A 5 s pass of the same code (both modes in one Envoy, `SOAK_TOGETHER`) runs in the e2e suite",
        "(`tests/e2e/test_soak_short.py`).",
        "warden-state's log (stderr: its warnings, errors and panics) must hold no ERROR or panic either.",
        "",
        f"Latest run: {rep['date']} (`date -u`), commit {rep['source'].get('commit', '')}"
        f"{' with uncommitted changes' if rep['source'].get('uncommitted_changes') else ''}, {rep['wall_seconds']} s in all:",
        "",
        "```sh",
        command(st),
        "```",
        "",
        f"Machine: {m.get('nproc')} CPUs (`nproc`), {m.get('cpu')}, {m.get('memory_gib')} GiB; {m.get('os')}, Envoy {m.get('envoy')};"
        " shared with other work (the last column: other processes' CPU, % of one CPU).",
        "",
        "| Mode | s | rps | sessions | sent / answered | steps in the trail, verified | Envoy RSS (first → last third) | Envoy heap | VM heap | records dropped | Envoy errors | others' CPU |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|",
        *rows,
        "",
        f"Result: {verdict}." + (f" At this length the RSS check catches a leak of about {max(leak):.0f} bytes per request or more." if leak else ""),
        "",
        "Trends over each measured window (least-squares slope, KiB/min; for information, not checked): "
        + "; ".join(f"{p['mode']}: RSS {p['memory']['rss'].get('slope_kib_per_min', 0):+g}, Envoy heap "
                    f"{p['memory']['envoy_heap'].get('slope_kib_per_min', 0):+g}, VM heap {p['memory']['vm_heap'].get('slope_kib_per_min', 0):+g}"
                    for p in rep["phases"]) + ".",
        SOAK_END,
    ])


def write_readme(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    a, b = text.find(SOAK_BEGIN), text.find(SOAK_END)
    if 0 <= a < b:
        text = text[:a] + section + text[b + len(SOAK_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    st = Settings.from_env()
    rep = run(st)
    if st.out:
        st.out.write_text(json.dumps(rep, indent=1) + "\n")
        log(f"report written to {st.out}")
    if st.readme:
        write_readme(st.readme, readme_section(rep, st))
        log(f"Soak section written to {st.readme}")
    print(summary(rep), flush=True)
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
