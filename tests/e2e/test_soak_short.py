"""A short pass of the bounded soak (bench/soak.py, `make soak`) inside the e2e suite: a few
seconds of concurrent sessions at a fixed rate through a real Envoy in sync and cached mode and
a real warden-state, then the soak's own checks (every answered step in the trail once and in
order, chains verified, memory flat, no error logged, no record dropped). It keeps the soak
script working between real runs; the long run and its numbers are in bench/README.md."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import soak  # noqa: E402


def test_a_short_soak_loses_nothing_and_leaks_nothing():
    settings = soak.Settings(seconds=5, rate=50, sessions=8, out=None, flush_deadline=20, progress=2, together=True)
    t0 = time.monotonic()
    report = soak.run(settings)
    print(soak.summary(report))
    print(f"short soak took {time.monotonic() - t0:.1f} s")
    assert report["failures"] == [], "\n".join(report["failures"])
    for phase in report["phases"]:
        assert phase["steps"] > 0 and phase["answered"] == phase["sent"]
        assert phase["filter_counters"].get("warden.records.dropped", 0) == 0
        assert set(phase["by_kind"]) == {"get", "post", "forbidden", "unauthenticated"}, phase["by_kind"]
