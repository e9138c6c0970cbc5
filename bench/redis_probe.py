#!/usr/bin/env python3
"""What one operation of the Redis store costs, measured so that a loaded machine distorts it
little: CPU time per operation of the replica and of redis-server (/proc/<pid>/stat, utime +
stime, over a whole wrk run), Redis commands per operation (INFO commandstats), and the latency
of begin-steps paced at a fixed rate (wrk's, and the replica's own histogram of its Redis call).

    .venv/bin/python bench/redis_probe.py [--seconds 4] [--rate 3000] [--replicas 1]
        [--kinds begin,records,paced] [--sqlite] [--no-aof] [--spread]

Placement as in `BENCH_ONLY=state` (bench/run.py): redis-server and the replica(s) on the
client CPUs, wrk on the other; `--spread` lets the service, Redis and wrk use every CPU instead.
`WARDEN_STATE_BIN` picks the binary (A/B of two builds). One JSON line per kind: requests/s,
wrk's p50/p99, CPU µs per operation per process, Redis commands per operation, the replica's
own p50/p99 bucket of its Redis call (`warden_state_redis_op_seconds`), AOF rewrites, fork
time and Redis's latency monitor (events over 1 ms).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

h = run.h


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run([h.REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True, check=True).stdout


def commandstats(port: int) -> dict[str, int]:
    out = redis_cli(port, "INFO", "commandstats")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(\w+):calls=(\d+)", out)}


def op_histogram(url: str, op: str) -> dict[float, float]:
    text = requests.get(url + "/metrics", timeout=5).text
    out = {}
    for m in re.finditer(r'warden_state_redis_op_seconds_bucket\{op="%s",le="([^"]+)"\} (\d+)' % op, text):
        out[float("inf") if m.group(1) == "+Inf" else float(m.group(1))] = float(m.group(2))
    return out


def quantile(before: dict, after: dict, q: float) -> float | None:
    diff = sorted((le, after.get(le, 0) - before.get(le, 0)) for le in after)
    if not diff or diff[-1][1] <= 0:
        return None
    total = diff[-1][1]
    for le, n in diff:
        if n >= q * total:
            return le
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rate", type=float, default=3000)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--kinds", default="begin,records,paced")
    ap.add_argument("--spread", action="store_true", help="service and Redis on every CPU")
    ap.add_argument("--sqlite", action="store_true", help="the SQLite store instead (CPU per op only)")
    ap.add_argument("--fsync", default="everysec")
    ap.add_argument("--no-aof", action="store_true", help="Redis without AOF (what the AOF costs)")
    a = ap.parse_args()
    place = run.ENVOY_CPUS | run.CLIENT_CPUS if a.spread else run.CLIENT_CPUS
    if a.spread:
        run.PINNED = False  # wrk unpinned too
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="warden-probe-") as d:
        redis = None
        if not a.sqlite:
            with run.affinity(place):
                redis = h.RedisServer(Path(d) / "redis", "--save", "", "--appendonly", "no" if a.no_aof else "yes", "--appendfsync", a.fsync)
        services = []
        if redis:
            redis_cli(redis.port, "CONFIG", "SET", "latency-monitor-threshold", "1")
        try:
            with run.affinity(place):
                for k in range(a.replicas):
                    services.append(h.StateService(Path(d) / f"replica{k}.db", store=redis.url if redis else None, key=Path(d) / "log.key"))
            urls = [s.url for s in services]
            pids = {"replica": [s.proc.pid for s in services]}
            if redis:
                pids["redis"] = [redis.proc.pid]
            for kind in a.kinds.split(","):
                wrk_kind = "begin" if kind == "paced" else kind
                rate = a.rate if kind == "paced" else 0
                c0 = {k: sum(run.cpu_seconds(p) for p in v) for k, v in pids.items()}
                s0 = commandstats(redis.port) if redis else {}
                hist0 = op_histogram(urls[0], "begin_step") if redis else {}
                t0 = time.time()
                res = run.state_wrk(wrk_kind, urls, a.seconds, rate=rate)
                wall = time.time() - t0
                c1 = {k: sum(run.cpu_seconds(p) for p in v) for k, v in pids.items()}
                s1 = commandstats(redis.port) if redis else {}
                hist1 = op_histogram(urls[0], "begin_step") if redis else {}
                n = sum(r["requests"] for r in res)
                r = {
                    "requests": n,
                    "rps": round(sum(r["rps"] for r in res)),
                    "p50_us": max(r["lat_p50_us"] for r in res),
                    "p99_us": max(r["lat_p99_us"] for r in res),
                    "cpu_us_per_op": {k: round(1e6 * (c1[k] - c0[k]) / n, 1) for k in c0},
                    "cpu_pct": {k: round(100 * (c1[k] - c0[k]) / wall) for k in c0},
                }
                if redis:
                    r["redis_cmds_per_op"] = {c: round((s1[c] - s0.get(c, 0)) / n, 2) for c in s1 if s1[c] != s0.get(c, 0)}
                    if wrk_kind == "begin":
                        r["replica_redis_p50_le_s"] = quantile(hist0, hist1, 0.5)
                        r["replica_redis_p99_le_s"] = quantile(hist0, hist1, 0.99)
                    info = redis_cli(redis.port, "INFO", "all")
                    r["aof_rewrites"] = int(re.search(r"aof_rewrites:(\d+)", info).group(1))
                    r["latest_fork_usec"] = int(re.search(r"latest_fork_usec:(\d+)", info).group(1))
                    lat = redis_cli(redis.port, "LATENCY", "LATEST").split()
                    r["redis_latency_events"] = [lat[i:i + 4] for i in range(0, len(lat), 4)]
                    redis_cli(redis.port, "LATENCY", "RESET")
                out[kind] = r
                print(kind, json.dumps(r), flush=True)
        finally:
            for s in services:
                s.stop()
            if redis:
                redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
