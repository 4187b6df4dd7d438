"""Shared test setup. Area-specific fixtures live in their own modules
(tests/s3_server.py, tests/slurm_cluster.py) and are imported where used."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks.kernel_checks (the kernels' equivalence checks)
    sys.path.insert(0, str(REPO))
SAMPLES = REPO / "data" / "samples"
SHARED_DATA = Path(os.environ.get("MMM4REC_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the checkout (CI has them); skip visibly where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set MMM4REC_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(autouse=True)
def _restore_environ():
    """Tests that call dist.env.prepare_process_env() in-process set RANK/WORLD_SIZE/...; no
    test may leak its environment into the next one (or into the jobs a later test submits)."""
    saved = os.environ.copy()
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _restore_project_logging():
    """``mmm4rec.log.setup_logging`` (every CLI entry point calls it, and tests run CLIs
    in-process) gives the project's loggers a stderr handler and turns propagation off.
    No test may inherit that from an earlier one: a test that needs it asks for it
    (the ``project_logging`` fixture), one that reads records uses ``caplog``."""
    import logging

    from mmm4rec.log import PACKAGES

    saved = {n: (list(lg.handlers), lg.propagate, lg.level) for n in PACKAGES for lg in [logging.getLogger(n)]}
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)


@pytest.fixture
def project_logging():
    """The log set-up of our entry points (stderr, ``[tag] message``), for in-process tests
    that read what a user of the CLI sees on stderr."""
    from mmm4rec.log import setup_logging

    setup_logging()
