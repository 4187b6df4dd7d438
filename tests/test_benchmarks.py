"""The benchmark scripts run end to end at tiny sizes (their code paths, not their numbers:
speed is measured by running them for real, docs/benchmarks.md)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run "
                    "the real benchmark (minutes); run it by hand")
def test_kernels_benchmark_says_it_needs_a_gpu():
    out = _run("benchmarks/kernels.py")
    assert "needs a CUDA GPU and found none" in out and "nothing was timed" in out


def test_kernels_benchmark_interpreter_smoke():
    """Every column (ours, PyTorch chunked, quadratic, mamba_ssm when installed), the
    ceilings and the report, on one tiny shape through Triton's interpreter."""
    out = _run("benchmarks/kernels.py", "--interpret-smoke")
    assert "interpreter smoke: code path OK" in out
    ssd_row = next(line for line in out.splitlines() if line.strip().startswith("40 |"))
    from benchmarks.kernel_checks import load_mamba_chunk_scan_combined

    if load_mamba_chunk_scan_combined()[0] is not None:    # installed by setup.sh --dev
        assert "n/a" not in ssd_row, ssd_row               # the mamba column was timed
    assert ssd_row.count("x |") >= 2, ssd_row


def test_train_step_benchmark_smoke(tmp_path):
    md = tmp_path / "t.md"
    out = _run("benchmarks/train_step.py", "--batch", "4", "--ssd-tokens", "100",
               "--repeats", "1", "--markdown", str(md))
    text = md.read_text()
    assert "| MMM4Rec | 1,999,085 |" in text and "| SASRec | 382,080 |" in text, out[-3000:]
    assert "| 1000 |" in text


@pytest.mark.s3
def test_data_loader_benchmark_smoke(tmp_path):
    pytest.importorskip("moto", reason="moto not installed (dev extra)")
    md = tmp_path / "d.md"
    out = _run("benchmarks/data_loader.py", "--epochs", "1", "--workers", "0",
               "--train-steps", "1", "--markdown", str(md))
    row = next(line for line in md.read_text().splitlines() if line.startswith("| 0 |"))
    assert row.count("|") == 7, out[-3000:]
    assert "| 10928 |" in row                   # every train sample of the bundled set, once


def test_retrieval_benchmark_smoke(tmp_path):
    md = tmp_path / "r.md"
    out = _run("benchmarks/retrieval.py", "--sizes", "3000", "--queries", "64", "--batch", "32",
               "--markdown", str(md))
    row = next(line for line in md.read_text().splitlines() if line.startswith("| 3,000 |"))
    assert "x |" in row and "user tower alone" in out, out[-3000:]


@pytest.mark.slow
def test_cold_start_script_smoke(tmp_path, shared_data):
    """The whole protocol (hold-out, export, items add, metrics) with an untrained model."""
    md = tmp_path / "c.md"
    out = _run("benchmarks/cold_start.py", "--epochs", "0", "--markdown", str(md), timeout=1200)
    text = md.read_text()
    assert "| cold |" in text and "held-out items only" in text, out[-3000:]


def test_catalog_benchmark_tiny():
    """benchmarks/catalog.py: every path on 1 and 2 processes, at a tiny size."""
    out = _run("benchmarks/catalog.py", "--items", "3000", "30000", "--procs", "1", "2", "--text-dim", "16",
               "--hidden", "8", "--negatives", "32", "--steps", "1", "--eval-users", "32", "--chunk", "1000")
    rows = [line for line in out.splitlines() if line.startswith("| 3") and "|" in line[1:]]
    assert len(rows) == 12, out
    for path in ("allitems", "vocab", "sampled"):
        assert sum(f"| {path} |" in r for r in rows) == 4, path
    assert not any("ERROR" in r or "died" in r for r in rows), out
