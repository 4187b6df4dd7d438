"""The benchmark scripts run end to end at tiny sizes (their code paths, not their numbers:
speed is measured by running them for real, docs/benchmarks.md)."""
from __future__ import annotations

import json
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
    out = _run("-m", "benchmarks.kernels")
    assert "needs a CUDA GPU and found none" in out and "nothing was timed" in out


def test_kernels_benchmark_interpreter_smoke():
    """Every column (ours, PyTorch chunked, quadratic, mamba_ssm when installed), the
    ceilings and the report, on one tiny shape through Triton's interpreter."""
    out = _run("-m", "benchmarks.kernels", "--interpret-smoke")
    assert "interpreter smoke: code path OK" in out
    ssd_row = next(line for line in out.splitlines() if line.strip().startswith("40 |"))
    from benchmarks.kernel_checks import load_mamba_chunk_scan_combined

    if load_mamba_chunk_scan_combined()[0] is not None:    # installed by setup.sh --dev
        assert "n/a" not in ssd_row, ssd_row               # the mamba column was timed
    assert ssd_row.count("x |") >= 2, ssd_row


def _have_commit(commit: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True, check=False).returncode == 0


def test_train_step_benchmark_quick(tmp_path):
    """--quick: the baseline commit's package in one worker, this tree in another; the
    numerics check (exit 1 if the loss or a gradient differs), the alternating timing
    rows, the profile and the SSD table."""
    from benchmarks.train_step import DEFAULT_BASELINE

    if not _have_commit(DEFAULT_BASELINE):
        pytest.skip(f"baseline commit {DEFAULT_BASELINE} not in this clone (shallow?): git fetch --unshallow")
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    out = _run("-m", "benchmarks.train_step", "--quick", "--markdown", str(md), "--json", str(js), timeout=1200)
    res = json.loads(js.read_text())
    assert len(res["numerics"]) == 4 and all(r["equal"] for r in res["numerics"]), out[-3000:]
    assert {(r["layers"], r["L"]) for r in res["steps"]} == {(1, 20), (2, 20), (1, 64), (2, 64)}
    assert all(r["ratio_median"] > 0 and r["steps_each"] == 2 for r in res["steps"])
    assert res["profile"]["base"]["top"] and res["profile"]["new"]["top"]
    text = md.read_text()
    assert "equal within fp32 tolerance" in text and "| 1 | 2 | 20 | 8 |" in text and "| 64 |" in text


def test_train_step_benchmark_names_a_missing_baseline():
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--quick", "--baseline-commit", "f" * 40],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode != 0 and "is not in this repository" in out.stderr, out.stderr[-2000:]


def test_gpu_step_cpu_smoke_and_report(tmp_path):
    """The GPU step timer's every row (fp32/bf16, SASRec, the catalog-loss rows) on CPU at
    tiny sizes, and the report's JSON + Markdown."""
    out = _run("-m", "benchmarks.gpu_step", "step", "--out", str(tmp_path), "--cpu-smoke", timeout=900)
    step = json.loads((tmp_path / "train_step.json").read_text())
    from mmm4rec import losses

    timed = [r for r in step["rows"] if "ms" in r]
    kinds = set(losses.LOSSES) - {"full"}            # every other kind of the build, fp32 + bf16
    assert len(timed) == 10 + 2 * len(kinds) and all(r["ms"] > 0 and r["seq_per_s"] > 0 for r in timed), out[-3000:]
    assert {r["precision"] for r in timed} == {"fp32", "bf16"}
    assert {"vocab_parallel", "sampled"} <= kinds      # issue 12's catalog losses are timed
    assert not [r for r in step["rows"] if "ms" not in r]
    _run("-m", "benchmarks.gpu_step", "report", "--out", str(tmp_path))
    md = (tmp_path / "summary.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "CPU SMOKE RUN" in md and "| MMM4Rec 1 layer, full softmax over 50 items | bf16 | 4 |" in md
    assert "x SASRec's time per step" in md and "bf16 runs at" in md
    assert summary["train_step"]["cpu_smoke"] and summary["kernel_tests"] == "not run"


def test_gpu_step_arguments():
    bad = subprocess.run([sys.executable, "-m", "benchmarks.gpu_step", "step", "--out", "x", "--batch", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "--batch" in bad.stderr
    assert "usage" in _run("-m", "benchmarks.gpu_step", "--help")


def test_gpu_check_script_arguments(tmp_path):
    sh = ["bash", "scripts/gpu_check.sh"]
    help_ = subprocess.run([*sh, "--help"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert help_.returncode == 0 and "--cpu-smoke" in help_.stdout
    for args, needle in ((["--bogus"], "unknown option --bogus"), ([], "--out DIR is required")):
        r = subprocess.run([*sh, *args], cwd=ROOT, capture_output=True, text=True, check=False)
        assert r.returncode == 2 and needle in r.stderr


@pytest.mark.slow
def test_gpu_check_script_cpu_smoke(tmp_path):
    """scripts/gpu_check.sh end to end on CPU: kernel tests (skipping, with their reason),
    the kernel benchmark's interpreter smoke, the step rows, and one folder with the report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path), "--cpu-smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"summary.md", "summary.json", "meta.json", "train_step.json", "kernel_tests.log"} <= names
    assert len(names) <= 8                                  # what the device tool brings back
    md = (tmp_path / "summary.md").read_text()
    assert "skipped" in md and "interpreter smoke: code path OK" in md and "CPU SMOKE RUN" in md


@pytest.mark.s3
def test_data_loader_benchmark_smoke(tmp_path):
    pytest.importorskip("moto", reason="moto not installed (dev extra)")
    md = tmp_path / "d.md"
    out = _run("-m", "benchmarks.data_loader", "--epochs", "1", "--workers", "0",
               "--train-steps", "1", "--markdown", str(md))
    row = next(line for line in md.read_text().splitlines() if line.startswith("| 0 |"))
    assert row.count("|") == 7, out[-3000:]
    assert "| 10928 |" in row                   # every train sample of the bundled set, once


def test_retrieval_benchmark_smoke(tmp_path):
    md = tmp_path / "r.md"
    out = _run("-m", "benchmarks.retrieval", "--sizes", "3000", "--queries", "64", "--batch", "32",
               "--markdown", str(md))
    row = next(line for line in md.read_text().splitlines() if line.startswith("| 3,000 |"))
    assert "x |" in row and "user tower alone" in out, out[-3000:]


@pytest.mark.slow
def test_cold_start_script_smoke(tmp_path, shared_data):
    """The whole protocol (hold-out, export, items add, metrics) with an untrained model."""
    md = tmp_path / "c.md"
    out = _run("-m", "benchmarks.cold_start", "--epochs", "0", "--markdown", str(md), timeout=1200)
    text = md.read_text()
    assert "| cold |" in text and "held-out items only" in text, out[-3000:]


def test_catalog_benchmark_tiny():
    """benchmarks/catalog.py: every path on 1 and 2 processes, at a tiny size."""
    out = _run("-m", "benchmarks.catalog", "--items", "3000", "30000", "--procs", "1", "2", "--text-dim", "16",
               "--hidden", "8", "--negatives", "32", "--steps", "1", "--eval-users", "32", "--chunk", "1000")
    rows = [line for line in out.splitlines() if line.startswith("| 3") and "|" in line[1:]]
    assert len(rows) == 12, out
    for path in ("allitems", "vocab", "sampled"):
        assert sum(f"| {path} |" in r for r in rows) == 4, path
    assert not any("ERROR" in r or "died" in r for r in rows), out
