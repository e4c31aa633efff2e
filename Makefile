# Two commands set everything up on a fresh machine:
#   make demo   the proxy in front of the built-in demo mailbox server
#   make test   lint, type-check and the whole test suite (starts its own Dovecot),
#               then the suite again under every other CPython of 3.11, 3.12 and 3.13
#               this machine has (.ci/pythons finds them), each in its own .venv-X.Y
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-main test-others test-with lint bench bench-ab clean

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

test: test-main test-others

test-main: lint
	$(BIN)/pytest -q

# The same suite under the other supported Pythons (lint ran once, above).
test-others: $(STAMP)
	@pythons="$$(.ci/pythons --except $(PYTHON))"; \
	echo "== other Pythons on this machine: $${pythons:-none}"; \
	for py in $$pythons; do $(MAKE) --no-print-directory test-with PY=$$py || exit 1; done

test-with:
	@v=$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	venv=.venv-$$v; \
	if [ ! -f $$venv/.installed ] || [ pyproject.toml -nt $$venv/.installed ]; then \
		$(PY) -m venv $$venv && $$venv/bin/pip install -q --upgrade pip && \
		$$venv/bin/pip install -q -e '.[test]' && touch $$venv/.installed || exit 1; \
	fi; \
	echo "== pytest under Python $$v ($(PY))"; \
	$$venv/bin/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'  # py-spy, for the breakdown
	$(BIN)/python -m benchmarks.run --repeat 2
	$(BIN)/python -m benchmarks.breakdown
	$(BIN)/python -m benchmarks.floor
	$(BIN)/python -m benchmarks.policy_bench
	$(BIN)/python -m benchmarks.tls_bench
	$(BIN)/python -m benchmarks.metrics_bench
	$(BIN)/python -m benchmarks.audit_bench
	$(BIN)/python -m benchmarks.audit_bench --checkpoints
	$(BIN)/python -m benchmarks.routing_bench
	$(BIN)/python -m benchmarks.state_bench
	$(BIN)/python -m benchmarks.workers_bench

# The working tree against another revision, interleaved, twice:
#   make bench-ab BASELINE=main
BASELINE ?= HEAD
bench-ab: $(STAMP)
	$(BIN)/python -m benchmarks.run --baseline $(BASELINE) \
		--only noop,sessions,concurrent,pipeline --repeat 2

clean:
	rm -rf $(VENV) .venv-3.* .pytest_cache .mypy_cache .ruff_cache .hypothesis
