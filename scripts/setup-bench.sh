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

if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "[setup-bench] missing: ${missing[*]}; install them with your package manager, then run 'make bench' again." >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "[setup-bench] missing: ${missing[*]}; run as root or install them, then run 'make bench' again." >&2; exit 1; }
    sudo="sudo"
  fi
  say "installing ${missing[*]} (Debian packages)"
  # Only refresh the package lists when a package is really missing.
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

say "ready: $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), wasm-opt $(wasm-opt --version 2>/dev/null | awk '{print $3}')"
