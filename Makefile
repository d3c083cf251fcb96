# The two commands a newcomer needs are `make run` and `make test`; everything else is here for them.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Installs run as root in CI and on fresh machines; elsewhere through sudo when it is there.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

.PHONY: help install os-deps proto lint test run clean

help:
	@echo "make run    start the whole cluster (model simulator unless OPENAI_API_KEY is set)"
	@echo "make test   install what the tests need, lint, and run every test"
	@echo "make proto  regenerate services/v1 from protos/"
	@echo "make lint   ruff, buf lint, and a check that services/v1 matches protos/"
	@echo "make bench  what chatmesh adds over calling the model directly (bench-quick: about 2 minutes)"
	@echo "make bench-cache  the answer cache's hit rates, wrong hits and tokens saved (about 3 minutes)"
	@echo "make dist   build the wheel (dist/) that deploy/Dockerfile installs; make chart-files syncs the Helm chart's copies"

# OS packages: venv support for Python and the real redis-server the tests run against; Debian's
# prometheus for promtool (rule unit tests) and the real Prometheus of tests/integration/test_prometheus.py.
# No recommended packages (prometheus would bring node-exporter).
os-deps:
	@missing=""; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null && command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
		echo "installing OS packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { $(MAKE) os-deps && $(PYTHON) -m venv $(VENV); }

# The venv is rebuilt when the lock file or the project metadata changes.
$(VENV)/.installed: $(BIN)/python requirements.lock pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

proto: install
	scripts/protos.sh generate

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd protos && ../$(BIN)/buf lint
	scripts/protos.sh check

# Two workers, each taking whole test modules (--dist loadfile), so that a module's cluster serves only its tests.
test: os-deps install lint
	$(BIN)/pytest -q -n 2 --dist loadfile

run: install
	$(BIN)/chatmesh up

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache

# Benchmarks (bench/run.py, then bench/resilience.py): results in bench/results/. `make bench` takes about 15 minutes
# on 2 cores.
.PHONY: bench bench-quick bench-cache
bench: install
	$(BIN)/python -m bench
	$(BIN)/python -m bench.resilience
	$(BIN)/python -m bench.multiplex --out bench/results/multiplex.json

bench-quick: install
	$(BIN)/python -m bench --mode quick

# The answer cache (bench/cache.py, issue 17): hit rates, wrong hits, tokens and USD saved, and the semantic lookup's
# added latency. About 3 minutes on 2 cores.
bench-cache: install
	$(BIN)/python -m bench.cache

# Packaging and Kubernetes (deploy/): the wheel the image installs, and the files the Helm chart renders from.
.PHONY: dist chart-files
dist: install
	rm -rf build dist/chatmesh-*.whl  # setuptools would reuse stale files from an earlier build/
	$(BIN)/python -m build --wheel --outdir dist .

chart-files: install
	$(BIN)/python scripts/sync_chart_files.py
