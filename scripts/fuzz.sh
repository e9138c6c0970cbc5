#!/usr/bin/env bash
# `make fuzz`: every cargo-fuzz target of fuzz/ for FUZZ_SECONDS each, one at a time, starting from
# the committed seeds (fuzz/corpus/<target>/, read only) plus what earlier runs found
# (fuzz/target/found/<target>/, not committed). Prints libFuzzer's final numbers per target and
# fails if any target crashed; a crash's input is in fuzz/artifacts/<target>/: fix the bug, then
# commit the input under fuzz/regressions/<target>/ so `make test` replays it.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"

say() { printf '\033[1m[fuzz]\033[0m %s\n' "$*" >&2; }

seconds=${FUZZ_SECONDS:-60}
# cargo-fuzz passes nightly-only rustc flags (-Zsanitizer, sancov passes); the stable compiler
# accepts them with RUSTC_BOOTSTRAP=1, so no nightly toolchain is needed.
export RUSTC_BOOTSTRAP=1

targets=$(cargo fuzz list) || exit 1
say "building $(echo $targets | wc -w) targets (release, debug assertions, AddressSanitizer)"
cargo fuzz build --debug-assertions || exit 1

mkdir -p target/logs
crashed=()
for t in $targets; do
  found=target/found/$t
  mkdir -p "$found" "artifacts/$t"
  log=target/logs/$t.log
  say "$t: ${seconds}s (log: fuzz/$log)"
  # -timeout: an input slower than 10 s is a finding too (a hang), as is one above 2 GB of RSS.
  cargo fuzz run --debug-assertions "$t" "$found" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$last")
  if [ $rc -eq 0 ]; then
    say "$t: ok, ${runs:-?} runs (${speed:-?}/s), cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}"
  else
    crashed+=("$t")
    say "$t: CRASH (exit $rc) after ${runs:-?} runs; input in fuzz/artifacts/$t/, see fuzz/$log"
    # The panic's place and message (or the sanitizer's report), then where the input is.
    grep -m1 -A1 -E "panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)" "$log" | sed 's/^/[fuzz]   /' >&2
    grep -m1 -E "Test unit written to" "$log" | sed 's/^/[fuzz]   /' >&2
  fi
done

if [ ${#crashed[@]} -gt 0 ]; then
  say "crashed: ${crashed[*]}"
  exit 1
fi
say "no crash in $(echo $targets | wc -w) targets x ${seconds}s"
