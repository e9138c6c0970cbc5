"""The replay-equality check of `make test`: every step the end-to-end suites recorded (kept by
the harness under WARDEN_REPLAY_DIR) is decided again natively, by `warden replay --config`, with
the very policy version the proxy decided it with, from the input it recorded. A step the proxy
decided otherwise than its recorded input decides fails the check: an optimisation of the
proxy's input, evaluation or recording that changed a decision cannot pass unnoticed.

    .venv/bin/python tests/replay_check.py target/replay-check
"""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CLI_BIN  # noqa: E402

# Fewer replayed steps than this means the harness no longer keeps what the suites record (the
# suites replay about 1,100; the short soak's share varies with the machine's speed).
MIN_STEPS = 600


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "target/replay-check")
    configs, sessions = root / "configs", root / "sessions"
    if not configs.is_dir() or not sessions.is_dir():
        print(f"[replay] nothing kept under {root}: run the end-to-end suites with WARDEN_REPLAY_DIR={root}")
        return 1
    n_configs = len(list(configs.glob("*.json")))
    n_files = len(list(sessions.glob("*.jsonl")))
    out = subprocess.run([str(CLI_BIN), "--json", "replay", "--config", str(configs), "--file", str(sessions)],
                         capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        print(f"[replay] warden replay failed ({out.returncode}): {out.stderr.strip()}")
        return 1
    r = json.loads(out.stdout)
    left_out = [line for line in out.stderr.splitlines() if "is left out" in line]
    replayed = r["steps"] - r["skipped"] - r["unmatched"]
    print(f"[replay] {n_configs} plugin configurations, {n_files} exports: {r['sessions']} sessions, {r['steps']} steps; "
          f"{replayed} replayed ({r['candidate_outcomes']} candidate outcomes too), {r['unmatched']} under a policy version not kept, "
          f"{r['skipped']} without a replayable input; {len(r['changes'])} decided otherwise; "
          f"{len(left_out)} configurations the proxy refuses left out")
    for c in r["changes"][:40]:
        of = " (candidate)" if c.get("of") else ""
        print(f"[replay] CHANGED session {c['session_id']} step {c['step']}{of}: recorded {c['recorded']}, "
              f"replayed {c['candidate']} ({', '.join(c['reasons'])}) {c.get('tool') or c.get('path') or ''}")
    if r["changes"]:
        return 1
    if replayed < MIN_STEPS:
        print(f"[replay] only {replayed} steps replayed (at least {MIN_STEPS} expected): the harness no longer keeps the suites' records")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
