"""A quick A/B loop for development, not a report: the named variants of bench/run.py,
interleaved over a few short rounds, printing median rps and the µs each adds over no_filter,
Envoy's CPU time per request (steadier while other processes share the machine), and each
Envoy's time to ready (pinned to one CPU) and peak RSS.

    .venv/bin/python bench/quick.py warden_local warden_local_allow_all
    QUICK_ALT=/path/to/other.wasm .venv/bin/python bench/quick.py warden_local   # adds warden_local@alt

Knobs: QUICK_ROUNDS (3), QUICK_SECONDS (3), QUICK_ALT (a second module measured beside the built
one, as every warden variant named). `no_filter` is always measured: it is the reference.
Use `make bench` for numbers to keep; this only tells whether a change moved the needle.
"""

import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as b  # noqa: E402

h = b.h


def main() -> int:
    rounds = int(os.environ.get("QUICK_ROUNDS", "3"))
    seconds = int(os.environ.get("QUICK_SECONDS", "3"))
    alt = os.environ.get("QUICK_ALT")
    keys = h.Keys()
    module = b.snapshot_wasm()
    ctx = b.Ctx(keys, keys.token(sub=b.SUBJECT, ttl=3600, scope="tickets:read"),
                keys.token(sub=b.OTHER_SUBJECT, ttl=3600, scope="tickets:read"), module)
    known = b.make_variants(h.wasm_runtimes(), module, None)
    names = ["no_filter"] + [n for n in sys.argv[1:] if n != "no_filter"]
    unknown = [n for n in names if n not in known]
    if unknown:
        b.log(f"unknown variants {unknown}; known: {', '.join(known)}")
        return 2
    variants = {n: known[n] for n in names}
    if alt:
        for n in names:
            v = known[n]
            if v.kind == "warden":
                # The variant's filter factory takes the module from ctx; give the alt one instead.
                alt_path = Path(alt).resolve()
                filters = v.filters
                variants[f"{n}@alt"] = dataclasses.replace(
                    v, label=v.label + "@alt", wasm=alt_path, session=v.session + "-alt",
                    filters=lambda c, f=filters, p=alt_path: f(dataclasses.replace(c, wasm=p)))
    state = None
    state_dir = tempfile.TemporaryDirectory(prefix="warden-quick-")
    try:
        # One state service for every variant that needs one (each keeps its own session).
        if any(v.state_mode for v in variants.values()):
            with b.affinity(b.CLIENT_CPUS):
                state = h.StateService(Path(state_dir.name) / "state.db")
            for v in variants.values():
                if v.state_mode:
                    v.state = state
        rps: dict[str, list[float]] = {n: [] for n in variants}
        # Envoy CPU µs per request: steadier than rps when other processes share the machine.
        cpu: dict[str, list[float]] = {n: [] for n in variants}
        ready: dict[str, float] = {}
        for n, v in variants.items():
            v.envoy, ready[n] = b.start_envoy(n, v, ctx, pin=True)
            b.preflight(n, v, ctx)
            b.wrk(v.envoy.url("bench", b.PATH), 1, ctx.token, session=v.session)  # warm-up
        for r in range(rounds):
            for n, v in variants.items():
                c0 = b.cpu_seconds(v.envoy.proc.pid)
                res = b.wrk(v.envoy.url("bench", b.PATH), seconds, ctx.token, session=v.session)
                rps[n].append(res["rps"])
                cpu[n].append(1e6 * (b.cpu_seconds(v.envoy.proc.pid) - c0) / res["requests"])
            b.log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {rps[n][-1]:.0f}" for n in variants))
        a = statistics.median(rps["no_filter"])
        a_cpu = statistics.median(cpu["no_filter"])
        for n in variants:
            m, c = statistics.median(rps[n]), statistics.median(cpu[n])
            rss = b.proc_status(variants[n].envoy.proc.pid)["VmHWM"] / 1024
            print(f"{n:28s} {m:8.0f} rps {100 * m / a:6.1f}% of A  +{1e6 / m - 1e6 / a:7.1f} µs/req;"
                  f"  Envoy CPU {c:6.1f} µs/req (+{c - a_cpu:.1f}, {100 * a_cpu / c:.1f}% of A);"
                  f"  ready {ready[n]:.0f} ms (one CPU), peak RSS {rss:.1f} MiB")
        return 0
    finally:
        for v in variants.values():
            if v.envoy:
                v.envoy.stop()
        if state:
            state.stop()
        state_dir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
