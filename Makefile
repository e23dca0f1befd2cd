# The project's one contract: CI runs `make test`; a new user runs `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help venv tools generate verify lint typecheck check test test-unit test-integration demo demo-down clean bench-faults

help:
	@echo "make demo    - local simulated GPU cluster + S3, chart installed, example engine to Ready"
	@echo "make test    - install what the tests need, then run them all"
	@echo "make lint | typecheck | generate | verify | tools | demo-down"
	@echo "make bench-faults - 30 engine lifecycles under injected faults on a private dev cluster (BENCH_ARGS=...)"
	@echo "make bench-scale | bench-latency | bench-continuity - operator benchmarks on a private dev cluster (BENCH_ARGS=...)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,builder]'
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

tools:
	devcluster/build-tools.sh

generate: venv
	$(BIN)/llmengine generate

verify: venv
	$(BIN)/llmengine generate --check || { echo "generated files drifted from their sources (API models, chart values.yaml): run 'make generate' and commit"; exit 1; }

lint: venv
	$(BIN)/ruff format --check operator tests scripts
	$(BIN)/ruff check operator tests scripts
	$(BIN)/lint-imports
	$(BIN)/hadolint builder-image/Dockerfile server-image/Dockerfile operator-image/Dockerfile

typecheck: venv
	$(BIN)/mypy

test-unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

check: lint typecheck verify

test: venv tools check
	$(BIN)/pytest tests $(PYTEST_ARGS)

demo: venv tools
	$(BIN)/python -m llmengine.dev.demo

# Fault injection (operator kill -9, S3 / kube-apiserver / etcd restarts) over engine lifecycles; docs/reliability.md.
bench-faults: venv tools
	$(BIN)/python scripts/bench_faults.py $(BENCH_ARGS)

# Operator benchmarks on private dev clusters (results in docs/benchmarks.md): scale (1,000 store-hit engines against
# plain Deployments, 200 queued builds), apply/rollout latency, serving continuity through a rebuild.
.PHONY: bench-scale bench-latency bench-continuity
bench-scale: venv tools
	$(BIN)/python scripts/bench_scale.py $(BENCH_ARGS)

bench-latency: venv tools
	$(BIN)/python scripts/bench_latency.py $(BENCH_ARGS)

bench-continuity: venv tools
	$(BIN)/python scripts/bench_continuity.py $(BENCH_ARGS)

demo-down: venv
	$(BIN)/llmengine dev --name demo down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
