# The README's two commands:
#   make quickstart   set up ./.venv and run pretrain -> export -> fine-tune -> evaluate on CPU
#   make test         set up ./.venv (+ test deps, Slurm, S3 server) and run the test suite
.PHONY: setup setup-dev quickstart test test-fast test-latest test-random lock lint bench wheel
PY := .venv/bin/python

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh --dev

quickstart: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/mmm4rec quickstart

test: setup-dev
	scripts/run_tests.sh

test-fast: setup-dev
	scripts/run_tests.sh -m "not slow"

# Early warning: a throwaway venv with the newest versions pyproject.toml allows (not the
# lock), then the fast suite; record the result in docs/install.md ("The newest releases").
LATEST_VENV ?= $(CURDIR)/.venv-latest
test-latest:
	rm -rf "$(LATEST_VENV)"
	MMM4REC_VENV="$(LATEST_VENV)" scripts/setup.sh --dev --latest
	"$(LATEST_VENV)/bin/python" scripts/lock.py --check || true
	MMM4REC_VENV="$(LATEST_VENV)" scripts/run_tests.sh -m "not slow"; rc=$$?; rm -rf "$(LATEST_VENV)"; exit $$rc

# The fast suite in a random order (pytest-randomly; repeat one with --randomly-seed=N)
test-random: setup-dev
	scripts/run_tests.sh -m "not slow" -p randomly

# Regenerate scripts/requirements-cpu.lock from pyproject.toml (then `make test`)
lock: setup-dev
	$(PY) scripts/lock.py

lint: setup-dev
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: setup
	$(PY) -m benchmarks.train_step

wheel: setup-dev
	$(PY) -m build --outdir build/
