"""Every Triton kernel through Triton's real compiler (Triton IR -> PTX -> cubin, with the
ptxas Triton ships) for sm_90, on a machine without a GPU.

The interpreter tests check the kernels' arithmetic, but the interpreter accepts code the
compiler rejects (it ran a kernel reading a non-constexpr global, which the compiler
refuses) and knows nothing of shared memory. This runs
``python -m benchmarks.compile_check --arch 90 --quick`` in a child process without
TRITON_INTERPRET (the compiler and the interpreter cannot share a process) and fails on
a compile error or a variant over the shared-memory limit. ~1 min; marked slow.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    triton = pytest.importorskip("triton", reason="triton is not installed (dev extra)")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this triton build ships no ptxas ({ptxas})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", "--arch", "90", "--quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert "kernel variants compiled for sm_90" in proc.stdout
