#!/usr/bin/env bash
# Installs what `make fuzz` needs beyond `make setup`, and only what is missing: safe to run again.
# cargo-fuzz (from crates.io, with its own lock file) and a C++ compiler (libFuzzer is C++, built by
# the libfuzzer-sys crate; Debian's g++). The one stable toolchain suffices: scripts/fuzz.sh sets
# RUSTC_BOOTSTRAP=1 for the nightly flags cargo-fuzz passes (sanitizer, coverage instrumentation).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup-fuzz]\033[0m %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null; then
  echo "[setup-fuzz] cargo is not installed: install Rust with rustup (https://rustup.rs), then run 'make fuzz' again." >&2
  exit 1
fi

missing=()
command -v c++ >/dev/null || missing+=(g++)
. scripts/apt.sh
apt_install setup-fuzz "make fuzz" "${missing[@]}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz (cargo install --locked)"
  cargo install cargo-fuzz --locked
fi

say "ready: $(cargo fuzz --version), $(rustc --version)"
