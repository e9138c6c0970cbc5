#!/usr/bin/env bash
# Installs what `make bench` needs beyond `make setup`, and only what is missing: safe to run again.
# wrk (the load generator) and binaryen (wasm-opt, to measure what an optimised module gains)
# come from Debian's packages; nothing is downloaded from anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup-bench]\033[0m %s\n' "$*" >&2; }

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v wasm-opt >/dev/null || missing+=(binaryen)
command -v taskset >/dev/null || missing+=(util-linux)

. scripts/apt.sh
apt_install setup-bench "make bench" "${missing[@]}"

say "ready: $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), wasm-opt $(wasm-opt --version 2>/dev/null | awk '{print $3}')"
