"""mmm4rec.log: one setup, stderr, ``[tag] message``, rank 0 speaks (RANK), stdout left to
the product. Each case runs in a fresh interpreter with the launcher's RANK variable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = """
import logging
from mmm4rec.log import setup_logging
setup_logging()
logging.getLogger("dist.trainer").info("epoch 1: valid ndcg@10 0.1")
logging.getLogger("data_shards.storage").warning("[storage] s3://b/x: retrying", extra={"tag": "", "all_ranks": True})
logging.getLogger("dist.serving.build").info("building the exact index", extra={"tag": "retrieval"})
logging.getLogger("some.other.library").warning("not ours")
print("the product")
"""


def _run(rank: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    if rank is not None:
        env["RANK"] = rank
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("rank", [None, "0"])
def test_rank_zero_logs_to_stderr_with_tags(rank):
    r = _run(rank)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "the product\n"
    lines = r.stderr.splitlines()
    assert "[mmm4rec] epoch 1: valid ndcg@10 0.1" in lines
    assert "[storage] s3://b/x: retrying" in lines
    assert "[retrieval] building the exact index" in lines
    assert "not ours" in lines   # another library's logger keeps Python's own handling


def test_other_ranks_log_only_what_is_their_own():
    r = _run("1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "the product\n"
    assert "epoch 1" not in r.stderr and "building the exact index" not in r.stderr
    assert "[storage] s3://b/x: retrying" in r.stderr.splitlines()
