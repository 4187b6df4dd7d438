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

import contextlib
import random

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (dev extra)")

from mmm4rec.kernels._common import interpreter_active

if not interpreter_active():
    pytest.skip("triton or the kernel modules were imported without TRITON_INTERPRET=1 earlier "
                "in this process; run tests/test_kernels_*.py in their own pytest process "
                "(scripts/run_tests.sh does)", allow_module_level=True)

import benchmarks.kernel_checks as kt
from mmm4rec.kernels.ssd_combined import kernel_chunk_size

TOL = 1e-4
DEVICE = "cpu"
SEED = int(os.environ.get("MMM4REC_KERNEL_SEED") or random.SystemRandom().randrange(1 << 31))


@pytest.fixture(scope="module", autouse=True)
def _announce_seed(request, record_testsuite_property):
    record_testsuite_property("kernel_seed", SEED)       # in the junit report too
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            tr.write_line(f"\n[kernel tests] seed {SEED}  (reproduce: MMM4REC_KERNEL_SEED={SEED})")
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def rng(request):
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
    with_prev = kind != "short"      # one chunk: the no-carried-state path ssd_combined takes
    _assert_close(kt.check_chunk_scan(shape, Q, rng.randrange(1 << 30), DEVICE, nsplit=nsplit,
                                      with_prev=with_prev),
                  f"chunk_scan {shape} Q={Q} nsplit={nsplit} with_prev={with_prev}")


# ------------------------------------------------------------------------ SSD combined
@pytest.mark.parametrize("kind", KINDS + ["strided"])
def test_ssd_combined(kind, rng):
    """The autograd entry point vs the quadratic (dual) form: y and all 7 gradients."""
    chunk_size = rng.choice([16, 32, 64])
    Q = kernel_chunk_size(chunk_size, 10 ** 6, 32)
    shape = _draw_ssd(rng, "ragged" if kind == "strided" else kind, Q)
    hpg = shape.H // shape.G
    nsplit = rng.choice([d for d in range(1, hpg + 1) if hpg % d == 0])
    _assert_close(kt.check_ssd(shape, chunk_size, rng.randrange(1 << 30), DEVICE,
                               strided=kind == "strided", nsplit=nsplit),
                  f"ssd {kind} {shape} chunk_size={chunk_size} nsplit={nsplit}")


def test_ssd_single_step(rng):
    """L = 1, one head: the smallest problem (a chunk that is all tail)."""
    shape = kt.SSDShape(b=1, L=1, H=1, P=16, G=1, S=8)
    _assert_close(kt.check_ssd(shape, 64, rng.randrange(1 << 30), DEVICE), f"ssd {shape}")


def test_kernel_chunk_size():
    assert kernel_chunk_size(64, 1000, 64) == 64
    assert kernel_chunk_size(64, 20, 64) == 32      # one 32-chunk, not a 70%-padding 64-chunk
    assert kernel_chunk_size(64, 3, 64) == 16       # tl.dot's minimum
    assert kernel_chunk_size(256, 1000, 64) == 64   # register-tile cap of the backward
    assert kernel_chunk_size(48, 1000, 64) == 32    # largest power of two not above the request
    assert kernel_chunk_size(8, 1000, 64) == 16
    assert kernel_chunk_size(64, 1000, 128) == 32   # [Q, S] tile budget
    assert kernel_chunk_size(64, 1000, 256) == 16


# ------------------------------------------------------------------------ vs mamba_ssm
@pytest.fixture(scope="module")
def mamba():
    fn, version = kt.load_mamba_chunk_scan_combined()
    if fn is None:
        pytest.skip(version)
    return fn


@pytest.mark.parametrize("kind", KINDS)
def test_ssd_matches_mamba_chunk_scan_combined(kind, rng, mamba):
    """Ours vs mamba_ssm's own Triton kernels (interpreted too), the dt-scaled skip term
    added to mamba's output (kt.mamba_equivalent): y and all 7 gradients. Shapes as the
    model uses them (P a multiple of 16; mamba wants a power-of-two chunk)."""
    chunk_size = rng.choice([16, 32])
    H = rng.choice([2, 4])
    shape = kt.SSDShape(b=rng.choice([1, 2]), L=_draw_length(rng, kind, chunk_size), H=H,
                        P=rng.choice([16, 32]), G=rng.choice([g for g in (1, 2) if H % g == 0]),
                        S=rng.choice([16, 32]))
    _assert_close(kt.compare_with_mamba(mamba, shape, chunk_size, rng.randrange(1 << 30), DEVICE),
                  f"ours vs mamba_chunk_scan_combined {kind} {shape} chunk_size={chunk_size}")


def test_reference_matches_mamba_chunk_scan_combined(rng, mamba):
    """The PyTorch chunked twin (what the model runs on CPU) vs mamba_ssm, one ragged shape."""
    from mmm4rec.kernels.ssd_ref import ssd_chunked_ref

    shape = kt.SSDShape(b=2, L=_draw_length(rng, "ragged", 16), H=4, P=16, G=2, S=16)
    _assert_close(kt.compare_with_mamba(mamba, shape, 16, rng.randrange(1 << 30), DEVICE,
                                        impl=lambda *a: ssd_chunked_ref(*a, chunk_size=16)),
                  f"ssd_chunked_ref vs mamba_chunk_scan_combined {shape}")


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


# ------------------------------------------------------------------------ end to end
def test_mmm4rec_triton_backend_matches_reference(rng, monkeypatch):
    """A small MMM4Rec (3 SSD calls on strided views + the Fourier filter per step): loss
    and every parameter gradient with set_backend("triton") vs set_backend("reference")."""
    import warnings

    from mmm4rec import MMM4Rec, MMM4RecConfig
    from mmm4rec.kernels import dispatch

    L = rng.choice([23, 40])                                 # ragged / multiple of chunk 16 ... 32
    cfg = MMM4RecConfig(hidden_size=32, inner_size=32, d_state=16, n_groups=2, head_dim=16,
                        expand=2, chunk_size=16, max_len=L, text_dim=24, image_dim=20,
                        num_items=40, dropout_prob=0.0, embedding_drop_prob=0.0,
                        time_dropout_prob=0.0, num_layers=2)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    torch.manual_seed(rng.randrange(1 << 30))
    model = MMM4Rec(cfg)
    n = cfg.num_items + 1
    model.tables.load_features({"text": torch.randn(n, cfg.text_dim, generator=g),
                                "image": torch.randn(n, cfg.image_dim, generator=g),
                                "modality_mask": torch.ones(n, 2)})
    with torch.no_grad():       # give the (near-silent at init) time path some weight
        for name, p in model.named_parameters():
            if ".time.lin" in name and name.endswith("weight"):
                p.normal_(0.0, 1.0, generator=g)
    b = 3
    lens = torch.randint(1, L + 1, (b,), generator=g)
    lens[0] = L
    items = torch.randint(1, n, (b, L), generator=g)
    times = torch.cumsum(torch.rand(b, L, generator=g, dtype=torch.float64) * 1e5, 1) + 1.5e9
    pad = torch.arange(L)[None] >= lens[:, None]
    items[pad] = 0
    times[pad] = 0
    batch = {"item_seq": items, "time_seq": times, "item_seq_len": lens,
             "target": torch.randint(1, n, (b,), generator=g),
             "target_time": times.max(1).values + 100.0, "weight": torch.ones(b)}

    def loss_and_grads(backend):
        dispatch.set_backend(backend)
        try:
            model.zero_grad(set_to_none=True)
            loss = model.calculate_loss(batch)
            loss.backward()
        finally:
            dispatch.set_backend(None)
        return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()
                               if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads("reference")
    calls = {"ssd": 0, "fourier_filter": 0}

    def counting(name, factory):
        def get():
            fn = factory()

            def run(*args):
                calls[name] += 1
                return fn(*args)
            return run
        return get

    monkeypatch.setattr(dispatch, "_ssd_triton", counting("ssd", dispatch._ssd_triton))
    monkeypatch.setattr(dispatch, "_fourier_triton",
                        counting("fourier_filter", dispatch._fourier_triton))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no silent fallback to the reference
        tri_loss, tri_grads = loss_and_grads("triton")
    assert ref_grads.keys() == tri_grads.keys()
    errs = {"loss": kt.rel_err(tri_loss, ref_loss)}
    flat_t = torch.cat([tri_grads[k].flatten() for k in ref_grads])
    flat_r = torch.cat([ref_grads[k].flatten() for k in ref_grads])
    errs["all grads"] = kt.rel_err(flat_t, flat_r)
    errs["worst single grad"] = max(kt.rel_err(tri_grads[k], ref_grads[k]) for k in ref_grads)
    # layer 1: TiSSD x2 (text, vision) + TiCoSSD (cross), all positions; the last layer runs
    # the text TiSSD through the kernel and reads the vision/cross SSD only at the positions
    # the user vector needs (mmm4rec.kernels.ssd_rows, O(L) PyTorch); the filter once a layer
    assert calls == {"ssd": 3 + 1, "fourier_filter": 2}, calls
    _assert_close(errs, f"MMM4Rec L={L}")
