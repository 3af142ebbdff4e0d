# notify: every target creates .venv and installs the pinned requirements when they are missing
# or have changed. Settings come from the environment (and .env, for `make run`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)

.PHONY: help venv browser tools run test test-fast screenshots lint format migrate topology bench soak clean

help:
	@echo "make run       install, create databases, migrate, declare topology, start all services"
	@echo "make test      run the test suite against the local PostgreSQL, Redis and RabbitMQ"
	@echo "make test-fast run only the pure tests (no servers), in seconds"
	@echo "make screenshots  run the browser tests, keeping their pictures in docs/console/ and docs/inbox/"
	@echo "make lint      ruff, mypy, hadolint and actionlint"
	@echo "make migrate   create missing databases and apply migrations"
	@echo "make topology  declare the RabbitMQ exchange and queues"
	@echo "make bench     run the benchmarks and record the figures (BENCHMARKS.md, bench/history/)"
	@echo "make soak      30 minutes of traffic under random faults: lost, stuck, duplicates, RSS/fds/connections (docs/soak.md)"

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

run: venv
	$(BIN)/python -m scripts.run_local

# The console's browser tests drive Debian's Chromium through Playwright (which then downloads
# no browser of its own); installed here when missing, so a clean machine (CI) gets it too.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

# The overload test (tests/test_overload.py) offers load with wrk, Debian's package; installed
# here when missing, as chromium is above.
tools:
	@command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends wrk; }

# The whole suite, on TEST_WORKERS processes (each with its own databases, vhost, Redis
# database and ports: tests/conftest.py); most tests wait on servers, so more workers than cores.
# One test handed out at a time (the longest first, tests/conftest.py), so no worker is left
# holding a queue of long ones while the others sit idle.
TEST_WORKERS ?= 4
test: venv browser tools
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxschedchunk 1

# The pure tests: those using no fixture that needs a server (marked `stack` by tests/conftest.py).
test-fast: venv
	$(BIN)/python -m pytest -m "not stack" -q

# The browser tests, keeping their pictures: the console's pages in docs/console/, the inbox
# component's in docs/inbox/.
screenshots: venv browser
	CONSOLE_SCREENSHOTS=docs/console $(BIN)/python -m pytest tests/test_console.py
	INBOX_SCREENSHOTS=docs/inbox $(BIN)/python -m pytest tests/features/inbox/test_component.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/hadolint Dockerfile
	$(BIN)/actionlint -shellcheck=$(BIN)/shellcheck

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

migrate: venv
	$(BIN)/python -m common.data.migrate

topology: venv
	$(BIN)/python -m topology

# Benchmarks are not tests: `make test` never runs them. BENCH_ARGS passes options, e.g.
# `make bench BENCH_ARGS="accept --duration 30"`; see BENCHMARKS.md.
bench: venv
	BENCH_VIA_MAKE=1 $(BIN)/python -m bench $(or $(BENCH_ARGS),all)

# The soak: the whole stack as processes under steady traffic and a seeded schedule of faults,
# in databases, vhost (notify_soak*) and Redis db 5 of its own; exit 1 when anything is lost or
# stuck, duplicates pass their bound, or memory or open files grow. SOAK_ARGS passes options,
# e.g. `make soak SOAK_ARGS="--minutes 2 --seed 7"`; the report, plot and logs land in
# bench/results/soak-<time>/ (docs/soak.md).
soak: venv
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
