# The two commands of the README:
#   make demo   set up .venv and run the sine campaign on this machine
#   make test   set up .venv, start the throwaway Slurm test cluster, run the tests
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench lint slurm-up slurm-down clean

setup:
	scripts/bootstrap.sh

demo: setup
	$(BIN)/python -m orchestrator run examples/sine/loop.yml --new

# The Slurm cluster is started first; tests marked `slurm` skip (with the reason)
# only where it cannot run (not root, no apt); so do the `ui` tests without Debian's chromium
# (scripts/install-browser.sh).
test: setup
	-scripts/slurm-test-cluster.sh start
	-scripts/install-browser.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slurm and not integration" $(PYTEST_ARGS)

bench: setup
	-scripts/slurm-test-cluster.sh start
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/ruff check orchestrator models tests benchmarks
	$(BIN)/mypy

slurm-up:
	scripts/slurm-test-cluster.sh start

slurm-down:
	scripts/slurm-test-cluster.sh stop

clean:
	rm -rf build runs $(VENV)
