# The README's two commands:
#   make quickstart   set up ./.venv and run pretrain -> export -> fine-tune -> evaluate on CPU
#   make test         set up ./.venv (+ test deps, Slurm, S3 server) and run the test suite
.PHONY: setup setup-dev quickstart test test-fast lint bench wheel
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

lint: setup-dev
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: setup
	$(PY) benchmarks/train_step.py

wheel: setup-dev
	$(PY) -m build --outdir build/
