"""The same kernel equivalences compiled for a real GPU, plus 16-bit inputs and the
comparison with mamba_ssm's ``mamba_chunk_scan_combined``.

Skipped without CUDA (the reason is shown). Compiled kernels need a process without
TRITON_INTERPRET: under scripts/run_tests.sh (whose kernel process sets it) the compiled
tests skip and ``test_compiled_suite_in_clean_process`` re-runs this module in a child
pytest process with the variable removed, so a GPU machine runs them either way.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="no CUDA device: compiled Triton kernels need a GPU "
                       "(CPU coverage: tests/test_kernels_interpret.py)"),
]
compiled = pytest.mark.skipif(CUDA and INTERPRET, reason="TRITON_INTERPRET=1 in this process: the compiled "
                              "tests run in a child process (test_compiled_suite_in_clean_process)")

TOL_FP32 = 1e-4
TOL_16BIT = 3e-2     # 16-bit inputs and outputs (bf16 eps 2^-8), TF32 products, fp32 accumulation
TOL_MAMBA = 2e-3     # mamba_ssm multiplies fp32 operands in TF32
SEED = int(os.environ.get("MMM4REC_KERNEL_SEED", "1234"))


@pytest.mark.skipif(not INTERPRET, reason="only needed where TRITON_INTERPRET=1 is set")
def test_compiled_suite_in_clean_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, (proc.stdout[-8000:] + proc.stderr[-4000:])


def _kt():
    import benchmarks.kernel_checks as testing

    return testing


def _check(errs: dict, tol: float, what: str) -> None:
    worst = max(errs, key=errs.get)
    assert errs[worst] < tol, f"{what}: worst {worst} {errs[worst]:.2e} >= {tol:g}\n{errs}"


REC_SHAPES = [(4, 20, 8, 64, 1, 64), (4, 50, 8, 64, 1, 64), (2, 200, 8, 64, 2, 64),
              (2, 333, 4, 40, 2, 24)]


@compiled
@pytest.mark.parametrize("stage", ["chunk_cumsum", "chunk_state", "state_passing", "chunk_scan"])
@pytest.mark.parametrize("shape", REC_SHAPES[2:])
@pytest.mark.parametrize("Q", [16, 32, 64])
def test_stages_compiled(stage, shape, Q):
    kt = _kt()
    s = kt.SSDShape(*shape)
    fn = getattr(kt, f"check_{stage}")
    extra = {"nsplit": 2} if stage in ("chunk_state", "chunk_scan") and s.H // s.G % 2 == 0 else {}
    _check(fn(s, Q, SEED, "cuda", **extra), TOL_FP32, f"{stage} {s} Q={Q}")


@compiled
@pytest.mark.parametrize("shape", REC_SHAPES)
@pytest.mark.parametrize("chunk_size", [32, 64])
@pytest.mark.parametrize("strided", [False, True])
def test_ssd_compiled_fp32(shape, chunk_size, strided):
    kt = _kt()
    s = kt.SSDShape(*shape)
    _check(kt.check_ssd(s, chunk_size, SEED, "cuda", strided=strided), TOL_FP32, f"ssd {s}")


@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", REC_SHAPES[:3])
def test_ssd_compiled_16bit(shape, dtype):
    kt = _kt()
    s = kt.SSDShape(*shape)
    _check(kt.check_ssd(s, 64, SEED, "cuda", dtype=dtype), TOL_16BIT, f"ssd {s} {dtype}")


@compiled
@pytest.mark.parametrize("L", [1, 20, 50, 127, 200, 512])
@pytest.mark.parametrize("strided", [False, True])
def test_fourier_compiled_fp32(L, strided):
    kt = _kt()
    _check(kt.check_fourier(4, 8, L, SEED, "cuda", strided=strided), TOL_FP32, f"fourier L={L}")


@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L", [20, 200, 512])
def test_fourier_compiled_16bit(L, dtype):
    kt = _kt()
    _check(kt.check_fourier(4, 8, L, SEED, "cuda", dtype=dtype), TOL_16BIT, f"fourier L={L} {dtype}")


@compiled
def test_dispatch_auto_uses_triton_on_cuda(monkeypatch):
    from mmm4rec import kernels
    from mmm4rec.kernels import dispatch

    monkeypatch.delenv("MMM4REC_KERNELS", raising=False)
    dispatch.set_backend(None)
    x = torch.zeros(1, device="cuda")
    assert dispatch.resolve_backend(x) == "triton"
    dispatch.set_backend("reference")
    try:
        assert dispatch.resolve_backend(x) == "reference"
    finally:
        dispatch.set_backend(None)
    assert kernels.get_backend() == "auto"


# --------------------------------------------------------------------------- mamba_ssm
@compiled
@pytest.mark.parametrize("shape", REC_SHAPES)
def test_matches_mamba_chunk_scan_combined(shape):
    """Compiled, fp32 (mamba multiplies in TF32): ours vs mamba_chunk_scan_combined with the
    dt-scaled skip term added (kt.mamba_equivalent); on CPU the interpreter test does the same."""
    kt = _kt()
    mamba, version = kt.load_mamba_chunk_scan_combined()
    if mamba is None:
        pytest.skip(version)
    s = kt.SSDShape(*shape)
    _check(kt.compare_with_mamba(mamba, s, 64, SEED, "cuda"), TOL_MAMBA,
           f"ours vs mamba_chunk_scan_combined {version} {s}")
