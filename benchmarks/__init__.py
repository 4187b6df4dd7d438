"""Benchmark scripts: each prints ratios against a baseline measured in the same run
(docs/benchmarks.md). Run them as modules from the repository root, e.g.

    python -m benchmarks.train_step --quick
    python -m benchmarks.transfer --data ../shared/data --out runs/transfer

not as files: ``python benchmarks/kernels.py`` would put ``benchmarks/`` first on
``sys.path``, where ``kernels`` (this folder's module) shadows the installed distribution
of that name that ``transformers`` imports. Each script refuses that form with a usage line.
"""
