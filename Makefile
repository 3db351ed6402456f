# The two commands of the README:
#   make demo   set up .venv and run the sine campaign on this machine
#   make test   set up .venv, start the throwaway Slurm test cluster, run the tests (make test-full: all)
# and, to build the sims against a site's MPI instead of the mpich wheel:
#   make setup MPICC=/path/to/mpicc
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
PYTEST_ARGS ?=
MPICC ?=

.PHONY: setup test-deps demo test test-full test-fast bench lint slurm-up slurm-down clean

setup:
	MPICC="$(MPICC)" scripts/bootstrap.sh

# Debian's MPICH and Open MPI and LAMMPS, for the MPI-flavour and third-party-code tests
# (installed as root with apt; elsewhere those tests skip with the reason).
test-deps:
	-scripts/bootstrap.sh --test-deps

demo: setup
	$(BIN)/python -m orchestrator run examples/sine/loop.yml --new

# The Slurm cluster is started first; tests marked `slurm` skip (with the reason)
# only where it cannot run (not root, no apt); so do the `ui` tests without Debian's chromium
# (scripts/install-browser.sh).
# Two pytest workers (the tests mostly wait on sims, Dask and MLflow): a file's tests stay together,
# the Slurm tests run one at a time (tests/conftest.py). `make test` leaves out the tests marked
# `full`, the rest of the long matrices (README "Tests"); `make test-full` runs everything.
PYTEST_XDIST := -n 2 --dist loadgroup

test: setup test-deps
	-scripts/slurm-test-cluster.sh start
	-scripts/install-browser.sh
	$(BIN)/python -m pytest $(PYTEST_XDIST) -m "not full" $(PYTEST_ARGS)

test-full: setup test-deps
	-scripts/slurm-test-cluster.sh start
	-scripts/install-browser.sh
	$(BIN)/python -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slurm and not integration" $(PYTEST_ARGS)

bench: setup
	-scripts/slurm-test-cluster.sh start
	$(BIN)/python -m pip install -q -c constraints.txt libensemble  # the bench-only peer (extra "bench"), pinned there
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
