# Two commands set everything up on a fresh machine:
#   make demo   the proxy in front of the built-in demo mailbox server
#   make test   lint, type-check and the whole test suite (starts its own Dovecot),
#               then the suite again under every other CPython of 3.11, 3.12 and 3.13
#               this machine has (.ci/pythons finds them), each in its own .venv-X.Y
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BUILT  := $(VENV)/.built
# The modules mypyc compiles (popproxy/_compiled.py holds the list).
CORE   := $(shell sed -n 's/^    "popproxy\.\([a-z0-9_.]*\)",$$/popproxy.\1/p' popproxy/_compiled.py \
                  | tr . / | sed 's/$$/.py/')

.PHONY: demo test test-main test-others test-with lint bench bench-ab clean

# The dependencies, and popproxy itself as pure Python.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=77'
	POPPROXY_PURE=1 $(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The per-command core compiled with mypyc (setup.py), in place, against
# the installed dependencies (mypy is one of the test extras); pure Python
# when that cannot be done (setup.py says why).  Rebuilt when a compiled
# module changes; until then popproxy runs the newer .py (_compiled.py).
$(BUILT): $(STAMP) setup.py popproxy/_compiled.py $(CORE)
	@echo "== building the compiled core (mypyc; about a minute)"
	$(BIN)/pip install -q --no-build-isolation --no-deps -e . \
		|| { echo "== mypyc build failed: popproxy runs as pure Python"; \
		     POPPROXY_PURE=1 $(BIN)/pip install -q --no-build-isolation --no-deps -e .; }
	touch $(BUILT)

demo: $(BUILT)
	$(BIN)/popproxy demo

lint: $(STAMP)
	$(BIN)/ruff check popproxy tests benchmarks setup.py
	$(BIN)/mypy

test: test-main test-others

# The suite runs the build `make demo` runs (POPPROXY_BUILT: a test checks
# that every compiled module is in use when they were built).
test-main: lint $(BUILT)
	POPPROXY_BUILT=1 $(BIN)/pytest -q

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
		POPPROXY_PURE=1 $$venv/bin/pip install -q -e '.[test]' && touch $$venv/.installed || exit 1; \
	fi; \
	echo "== pytest under Python $$v ($(PY))"; \
	$$venv/bin/pytest -q -p no:cacheprovider

# The benchmarks measure the build `make demo` runs.  The dev extra (py-spy,
# for the breakdown) is installed without building: the compiled modules
# already in place stay in use.
bench: $(BUILT)
	POPPROXY_PURE=1 $(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m benchmarks.run --repeat 2
	$(BIN)/python -m benchmarks.breakdown
	$(BIN)/python -m benchmarks.stream_cost
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
bench-ab: $(BUILT)
	$(BIN)/python -m benchmarks.run --baseline $(BASELINE) \
		--only noop,sessions,concurrent,pipeline --repeat 2

clean:
	rm -rf $(VENV) .venv-3.* .pytest_cache .mypy_cache .ruff_cache .hypothesis
