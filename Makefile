# Two commands on a fresh machine: `make run` (the demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test chaos bench docs up ingest clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Baton needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: install  ## ingest the sample corpus, start the mesh, ask the sample questions, stop
	$(VENV)/bin/baton demo

test: install  ## the whole suite against real nats-server processes
	$(PY) -m pytest -q

chaos: install  ## the long chaos runs: 1,000 requests while replicas and NATS nodes die; prints the ledgers
	BATON_CHAOS_REQUESTS=1000 BATON_CHAOS_SECONDS=60 BATON_HOSTILE_MESSAGES=3000 BATON_HOSTILE_VICTIM_REQUESTS=200 BATON_HOSTILE_SECONDS=30 $(PY) -m pytest -q -s -m chaos --timeout 600 tests/chaos

bench: install  ## benchmarks (not tests): Baton vs raw NATS chains vs LiteLLM; writes bench/RESULTS.md
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(PY) -m bench.run

docs: install  ## the AsyncAPI document of the wire contract, generated from shared/contract.py
	$(VENV)/bin/faststream docs gen shared.contract:app --yaml --out docs/asyncapi.yaml

up: install
	$(VENV)/bin/baton up

ingest: install
	$(VENV)/bin/baton ingest corpus

clean:
	rm -rf $(VENV) .baton .pytest_cache
