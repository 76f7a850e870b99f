# Two commands for a newcomer: `make demo` and `make test`. Both build or refresh .venv
# from this repo's own files first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test lint typecheck unit integration chaos stress bench bench-stripe clean

$(STAMP): pyproject.toml setup.py consumer/decode/_avrofast.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/usage-consumer demo

lint: $(STAMP)
	$(BIN)/ruff check consumer tests
	$(BIN)/ruff format --check consumer tests
	$(BIN)/lint-imports --no-logo

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

# pytest in two shards side by side (tests/shards.py): the crash matrix beside the rest.
test: $(STAMP) lint typecheck
	$(BIN)/python -m tests.shards -q

# The full crash matrix (200+ kills); the CI-sized run is part of `make test`.
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos

# The multi-instance tests 20 times each while a CPU hog keeps every core busy
# (tests/stress.py); exits non-zero unless every run passed.
STRESS_RUNS ?= 20
stress: $(STAMP)
	$(BIN)/python -m tests.stress --runs $(STRESS_RUNS) -- $(BIN)/pytest -q tests/integration/test_concurrent_copies.py
	$(BIN)/python -m tests.stress --runs $(STRESS_RUNS) -- $(BIN)/pytest -q tests/integration/test_rebalance.py

# The emitter's achieved request rate against the emulator (writes tests/bench/stripe_rate.json).
bench-stripe: $(STAMP)
	$(BIN)/python -m tests.bench.stripe_rate

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# The throughput benchmark (tests/bench/pipeline.py); not part of `make test`.
bench: $(BENCH_STAMP)
	$(BIN)/python -m tests.bench.pipeline

clean:
	rm -rf .demo .data .chaos .pytest_cache .mypy_cache .ruff_cache
