"""Every Triton kernel (each SSD stage, the combined SSD, the fused Fourier filter) against
its PyTorch twin, forward and backward, on CPU through Triton's interpreter, in fp32.

Run it in its own pytest process with TRITON_INTERPRET=1 (scripts/run_tests.sh does):
Triton picks interpreter vs. compiler when a kernel module is imported, so this
module sets the variable itself before importing any kernel, and skips, saying why,
if some earlier module in the process already imported the kernels compiled.

Shapes are drawn per run from a seed printed in the session header (reproduce with
MMM4REC_KERNEL_SEED=<seed>); each test covers a length kind: ragged (L not a multiple
of the chunk / block), an exact multiple, or shorter than one chunk. Outputs start
as NaN (``poison_outputs``), so an unwritten element fails the test. References run
in float64; the bar is a relative error (max |diff| / max |ref|) under 1e-4.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (or a kernel module) is imported

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (dev extra)")

from mmm4rec.kernels._common import interpreter_active  # noqa: E402

if not interpreter_active():
    pytest.skip("triton or the kernel modules were imported without TRITON_INTERPRET=1 earlier "
                "in this process; run tests/test_kernels_*.py in their own pytest process "
                "(scripts/run_tests.sh does)", allow_module_level=True)

from mmm4rec.kernels import testing as kt  # noqa: E402
from mmm4rec.kernels.ssd_combined import kernel_chunk_size  # noqa: E402

TOL = 1e-4
DEVICE = "cpu"
SEED = int(os.environ.get("MMM4REC_KERNEL_SEED") or random.SystemRandom().randrange(1 << 31))


@pytest.fixture(scope="module", autouse=True)
def _announce_seed(request):
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"[kernel tests] seed {SEED}  (reproduce: MMM4REC_KERNEL_SEED={SEED})")
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def rng(request, record_property):
    record_property("seed", SEED)
    return random.Random(f"{SEED}:{request.node.name}")


def _draw_length(rng: random.Random, kind: str, block: int) -> int:
    if kind == "ragged":
        return rng.choice([k for k in range(block + 1, 3 * block + 6) if k % block])
    if kind == "multiple":
        return block * rng.choice([1, 2, 3])
    if kind == "short":
        return rng.randint(1, block - 1)
    raise ValueError(kind)


def _draw_ssd(rng: random.Random, kind: str, Q: int) -> kt.SSDShape:
    H = rng.choice([1, 2, 4])
    return kt.SSDShape(b=rng.choice([1, 2]), L=_draw_length(rng, kind, Q), H=H,
                       P=rng.choice([16, 24, 40]),        # 40: two P blocks in the backward
                       G=rng.choice([g for g in (1, 2, 4) if H % g == 0]),
                       S=rng.choice([8, 16, 20, 32]))


def _assert_close(errs: dict, what: str) -> None:
    worst = max(errs, key=errs.get)
    msg = (f"{what}: worst {worst} rel err {errs[worst]:.2e} >= {TOL:g} "
           f"(seed {SEED}; MMM4REC_KERNEL_SEED={SEED} reproduces)\n"
           + "\n".join(f"  {k:>16s} {v:.2e}" for k, v in errs.items()))
    assert errs[worst] < TOL, msg


KINDS = ["ragged", "multiple", "short"]


# ------------------------------------------------------------------------ SSD stages
@pytest.mark.parametrize("kind", KINDS)
def test_chunk_cumsum(kind, rng):
    Q = rng.choice([16, 32])
    shape = _draw_ssd(rng, kind, Q)
    _assert_close(kt.check_chunk_cumsum(shape, Q, rng.randrange(1 << 30), DEVICE),
                  f"chunk_cumsum {shape} Q={Q}")


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_state(kind, rng):
    Q = rng.choice([16, 32])
    shape = _draw_ssd(rng, kind, Q)
    hpg = shape.H // shape.G
    nsplit = rng.choice([d for d in range(1, hpg + 1) if hpg % d == 0])
    _assert_close(kt.check_chunk_state(shape, Q, rng.randrange(1 << 30), DEVICE, nsplit=nsplit),
                  f"chunk_state {shape} Q={Q} nsplit={nsplit}")


@pytest.mark.parametrize("kind", KINDS)
def test_state_passing(kind, rng):
    Q = rng.choice([16, 32])
    shape = _draw_ssd(rng, kind, Q)
    _assert_close(kt.check_state_passing(shape, Q, rng.randrange(1 << 30), DEVICE),
                  f"state_passing {shape} Q={Q}")


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_scan(kind, rng):
    Q = rng.choice([16, 32])
    shape = _draw_ssd(rng, kind, Q)
    hpg = shape.H // shape.G
    nsplit = rng.choice([d for d in range(1, hpg + 1) if hpg % d == 0])
    _assert_close(kt.check_chunk_scan(shape, Q, rng.randrange(1 << 30), DEVICE, nsplit=nsplit),
                  f"chunk_scan {shape} Q={Q} nsplit={nsplit}")


# ------------------------------------------------------------------------ SSD combined
@pytest.mark.parametrize("kind", KINDS + ["strided"])
def test_ssd_combined(kind, rng):
    """The autograd entry point vs the quadratic (dual) form: y and all 7 gradients."""
    chunk_size = rng.choice([16, 32, 64])
    Q = kernel_chunk_size(chunk_size, 10 ** 6, 32)
    shape = _draw_ssd(rng, "ragged" if kind == "strided" else kind, Q)
    _assert_close(kt.check_ssd(shape, chunk_size, rng.randrange(1 << 30), DEVICE,
                               strided=kind == "strided"),
                  f"ssd {kind} {shape} chunk_size={chunk_size}")


def test_ssd_single_step(rng):
    """L = 1, one head: the smallest problem (a chunk that is all tail)."""
    shape = kt.SSDShape(b=1, L=1, H=1, P=16, G=1, S=8)
    _assert_close(kt.check_ssd(shape, 64, rng.randrange(1 << 30), DEVICE), f"ssd {shape}")


def test_kernel_chunk_size():
    assert kernel_chunk_size(64, 1000, 64) == 64
    assert kernel_chunk_size(64, 20, 64) == 32      # one 32-chunk, not a 70%-padding 64-chunk
    assert kernel_chunk_size(64, 3, 64) == 16       # tl.dot's minimum
    assert kernel_chunk_size(256, 1000, 64) == 128  # register-tile cap
    assert kernel_chunk_size(48, 1000, 64) == 32    # largest power of two not above the request
    assert kernel_chunk_size(8, 1000, 64) == 16
    assert kernel_chunk_size(128, 1000, 256) == 32  # [Q, S] tile budget


# ------------------------------------------------------------------------ Fourier filter
@pytest.mark.parametrize("L", [1, 2, 7, 8, 20, 33, 50, 64, 200, 512])
def test_dft_matrices_match_torch_fft(L):
    """rfft / irfft as matrices, incl. irfft dropping Im(bin 0) and Im(Nyquist) (even L)."""
    errs = kt.check_dft_matrices(L, DEVICE)
    assert max(errs.values()) < 1e-6, errs


@pytest.mark.parametrize("kind", ["short", "multi_block", "strided", "many_rows"])
def test_fourier_fused(kind, rng):
    """Fused filter vs torch.fft twin: output and the gradients of d_t, d_v and all 12
    weights / biases. multi_block: F > BLOCK_N and L > 2 * BLOCK_N (several N and K
    blocks, ragged); many_rows: b * H > BLOCK_M; the weight gradient is split over
    row ranges at random (1-3 splits)."""
    L = {"short": rng.randint(1, 31), "multi_block": rng.randint(65, 140),
         "strided": rng.randint(20, 100), "many_rows": rng.randint(8, 40)}[kind]
    b, H = (rng.randint(2, 4), rng.randint(9, 16)) if kind == "many_rows" else \
        (rng.randint(1, 2), rng.randint(1, 4))
    split = rng.choice([None, 2, 3])
    _assert_close(kt.check_fourier(b, H, L, rng.randrange(1 << 30), DEVICE,
                                   strided=kind == "strided", wgrad_split=split),
                  f"fourier {kind} b={b} H={H} L={L} wgrad_split={split}")


def test_fourier_max_length(rng):
    """The longest window the fused kernel takes (L = 512, F = 257: ragged 32-blocks)."""
    _assert_close(kt.check_fourier(1, 2, 512, rng.randrange(1 << 30), DEVICE),
                  "fourier b=1 H=2 L=512")
