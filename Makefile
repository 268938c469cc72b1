# valve-id: the two commands of the README, and a few helpers.
#   make demo   set up, (re)generate the bundled synthetic demo data set and preview it
#   make test   set up, lint and type-check, run the whole test suite
#   make up     set up, start the local stack (Label Studio, Redis, backend, workers) and the demo
#   make down   stop exactly what `make up` started
VALVE_ID_VENV ?= .venv
# Where `up`, `down`, `demo` and `clean` keep everything: VALVE_ID_STATE_DIR if set, else state/.
STATE_DIR ?= $(or $(VALVE_ID_STATE_DIR),state)
DEMO_N ?= 200
DEMO_SEED ?= 0
export VALVE_ID_VENV

PY := $(VALVE_ID_VENV)/bin/python
VALVE_ID := $(VALVE_ID_VENV)/bin/valve-id

.PHONY: setup system demo test lint clean up down

setup:
	scripts/setup-venv.sh dev

# System packages the tests need (docker-compose ...); installs only what is missing.
system:
	scripts/setup-system.sh

demo: setup
	$(VALVE_ID) demo-data --out $(STATE_DIR)/demo-data --n $(DEMO_N) --seed $(DEMO_SEED) --overwrite
	$(VALVE_ID) preview $(STATE_DIR)/demo-data/manifest.csv --out $(STATE_DIR)/demo-data/preview.png

# pytest exits 5 when it collected no test: that is a failure here, like any non-zero code.
# `lint` (ruff, mypy) runs first: a lint or type error fails the suite like a test.
test: setup system lint
	$(PY) -m pytest

# The local stack, no Docker: everything under $(STATE_DIR)/ (see `valve-id up --help`).
up: setup
	$(VALVE_ID) up --state-dir $(STATE_DIR)

down:
	$(VALVE_ID) down --state-dir $(STATE_DIR)

# Static checks: ruff's lint and formatting, then mypy (settings in pyproject.toml's [tool.mypy]).
LINT_PATHS := backend training tests benchmarks
lint: setup
	$(VALVE_ID_VENV)/bin/ruff check $(LINT_PATHS)
	$(VALVE_ID_VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VALVE_ID_VENV)/bin/mypy

clean:
	rm -rf $(STATE_DIR)
