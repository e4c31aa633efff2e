# Two commands set everything up on a fresh machine:
#   make demo   the proxy in front of the built-in demo mailbox server
#   make test   lint, type-check and the whole test suite (starts its own Dovecot)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-ab clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/popproxy demo

lint: $(STAMP)
	$(BIN)/ruff check popproxy tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.floor
	$(BIN)/python -m benchmarks.policy_bench
	$(BIN)/python -m benchmarks.tls_bench
	$(BIN)/python -m benchmarks.metrics_bench
	$(BIN)/python -m benchmarks.audit_bench

# The working tree against another revision, interleaved, twice:
#   make bench-ab BASELINE=main
BASELINE ?= HEAD
bench-ab: $(STAMP)
	$(BIN)/python -m benchmarks.run --baseline $(BASELINE) \
		--only noop,sessions,concurrent,pipeline --repeat 2

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
