"""The CPU training step's fast path (issue 14) equals the plain computation it replaces.

Each rewrite is compared, forward and every gradient, with the expression it stands for:
the gathered sequence adapter rows, the last layer computed at the read position only,
the fused causal conv, the DFT-matrix Fourier transforms, the SSD at chosen rows and the
group expansion. ``benchmarks/train_step.py`` additionally compares a whole step of this
tree with the baseline commit's (``tests/test_benchmarks.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmm4rec import MMM4Rec
from mmm4rec.contract import Batch
from mmm4rec.kernels.fourier_ref import DFT_MAX_LEN, irfft_ortho, rfft_ortho
from mmm4rec.kernels.ssd_ref import (
    _expand_groups,
    ssd_chunked_folded,
    ssd_chunked_ref,
    ssd_quadratic_folded,
    ssd_quadratic_ref,
    ssd_rows_ref,
)
from mmm4rec.models.base import SeqInput
from mmm4rec.models.layers import Dropout, causal_depthwise_conv_silu
from mmm4rec.models.packing import Packed
from tests.test_model import loud_time, random_batch, tiny_cfg, with_features


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True), params


def _assert_grads_close(g1, g2, names, rtol, atol_rel):
    for n, a, b in zip(names, g1, g2):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0, n
            continue
        scale = max(a.abs().max().item(), 1e-12)
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol_rel * scale, msg=lambda m, n=n: f"{n}: {m}")


def _model(layers, dtype, **kw):
    torch.manual_seed(0)
    cfg = tiny_cfg(num_layers=layers, use_id=True, max_len=kw.pop("max_len", 12), **kw)
    model = loud_time(with_features(MMM4Rec(cfg))).to(dtype)
    with torch.no_grad():
        for t in ("id_text", "id_image"):
            model.tables.tables[t].weight.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("max_len", [12, 3])
def test_last_position_path_equals_full_path(layers, max_len):
    """u and every gradient through the last-layer read-position path equal the path that
    computes every position and then takes the read one (histories of length 1 included:
    the window of the cross block's conv then reaches before position 0). fp32 (the time
    signal is fp32 by design): rtol 1e-4, atol 1e-5 x each tensor's largest entry."""
    dtype, rtol, atol_rel = torch.float32, 1e-4, 1e-5
    model = _model(layers, dtype, max_len=max_len)
    batch = random_batch(model.config, b=6, seed=1)
    batch["item_seq_len"][1] = 1
    batch["item_seq_len"][2] = 2
    batch["time_seq"] = batch["time_seq"].to(torch.float64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = torch.randn(6, model.config.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(2))
    outs = {}
    for last_only in (False, True):
        seq = SeqInput.from_batch(Batch.of(batch), model.tables(batch["item_seq"]))
        u = model.dense.user_vectors(seq, last_only=last_only)
        outs[last_only] = (u, _grads(model, (u * w).sum())[0])
    scale = outs[False][0].abs().max().item()
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=rtol, atol=atol_rel * scale)
    _assert_grads_close(outs[False][1], outs[True][1], names, rtol, atol_rel)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("gathered", [False, True])
def test_packed_tokens_equal_dense_path(layers, gathered, monkeypatch):
    """The training step's packed sequence stream (positions up to the read one only)
    equals the dense one (every position, as in eval mode): the whole full-softmax loss
    and every gradient, with garbage after each history (it must not matter), a history
    of length 1 and a padding row of length 0. Packing is asserted to be in use."""
    model = _model(layers, torch.float32, max_len=9)
    batch = random_batch(model.config, b=7, seed=4)
    batch["item_seq_len"][1], batch["item_seq_len"][2] = 1, 0
    pad = torch.arange(9)[None] >= batch["item_seq_len"][:, None]
    batch["item_seq"][pad] = torch.randint(1, model.num_items + 1, (int(pad.sum()),))
    batch["weight"][2] = 0.0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    made = []
    orig = Packed.__init__

    def spy(self, *a):
        orig(self, *a)
        made.append(self)

    monkeypatch.setattr(Packed, "__init__", spy)
    out = {}
    for training in (False, True):          # eval: dense (dropout is 0 either way)
        model.train(training)
        if gathered:
            loss = model.calculate_loss(batch, "full")
        else:                               # dist/'s way: looked-up sequence rows
            seq = SeqInput.from_batch(Batch.of(batch), model.tables(batch["item_seq"]))
            u = model.dense.user_vectors(seq)
            loss = (u * torch.linspace(-1, 1, u.shape[1])).sum()
        out[training] = (loss, _grads(model, loss)[0])
        assert len(made) == int(training)
    assert made[0].tok.numel() == int(batch["item_seq_len"].clamp(1, 9).sum())
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    _assert_grads_close(out[False][1], out[True][1], names, 1e-4, 1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_packed_tokens_draw_the_dense_dropout_masks(layers, monkeypatch):
    """With dropout on and the same seed, the packed training step draws the dense one's
    masks (each drawn over [b, L, N], its kept rows taken): the same loss and gradients,
    so packing does not change a training run's random stream."""
    model = _model(layers, torch.float32, max_len=9, dropout_prob=0.3, embedding_drop_prob=0.3,
                   time_dropout_prob=0.3).train()
    batch = random_batch(model.config, b=6, seed=7)
    batch["item_seq_len"][1] = 1
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    import mmm4rec.models.mmm4rec as mm

    out = {}
    for packed in (False, True):
        with monkeypatch.context() as mp:
            if not packed:
                mp.setattr(mm, "Packed", lambda *a: mm.DENSE)
            torch.manual_seed(5)
            loss = model.calculate_loss(batch, "full")
            out[packed] = (loss, _grads(model, loss)[0])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    _assert_grads_close(out[False][1], out[True][1], names, 1e-4, 1e-5)


@pytest.mark.parametrize("fusion", ["static", "dynamic_shared"])
@pytest.mark.parametrize("missing", ["zero", "bias"])
def test_sequence_rows_gathered_from_catalog_equal_looked_up_rows(fusion, missing):
    """calculate_loss (full softmax: the catalog is encoded, the sequence's adapter rows
    are gathered from it) equals the dense call on separately looked-up sequence rows."""
    model = _model(1, torch.float32, item_mm_fusion=fusion, missing_modality=missing)
    assert model.gathers_sequence_rows
    batch = random_batch(model.config, b=5, seed=3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    from mmm4rec import losses

    loss_fast = model.calculate_loss(batch, "full")
    g_fast, _ = _grads(model, loss_fast)
    ids = torch.arange(model.num_items + 1)
    seq = SeqInput.from_batch(Batch.of(batch), model.tables(batch["item_seq"]))
    u, V = model.dense(seq=seq, items=model.tables(ids))
    loss_ref = losses.full_softmax_ce(u, V, batch["target"], batch["weight"])
    g_ref, _ = _grads(model, loss_ref)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=0)
    _assert_grads_close(g_ref, g_fast, names, 1e-4, 1e-5)
    assert g_fast[names.index("tables.tables.id_text.weight")].abs().sum() > 0   # the ID rows learn


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("L", [17, 2])
def test_fused_causal_conv_equals_conv1d_with_all_gradients(channels_last, L):
    torch.manual_seed(0)
    C, K = 12, 4
    x = torch.randn(3, L, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    ref = F.silu(F.conv1d(x.transpose(1, 2), w[:, None], b, padding=K - 1, groups=C)[..., :L]).transpose(1, 2)
    inp = x if channels_last else x.transpose(1, 2).contiguous().transpose(1, 2)
    out = causal_depthwise_conv_silu(inp, w, b)
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    with torch.no_grad():                                       # the inference path
        torch.testing.assert_close(causal_depthwise_conv_silu(inp, w, b), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("L", [7, 20, 64, DFT_MAX_LEN + 3])
def test_dft_matrices_equal_torch_fft(L):
    """rfft_ortho / irfft_ortho (DFT products up to DFT_MAX_LEN) equal torch.fft, values and
    gradients, odd and even lengths (bin 0's and the Nyquist bin's imaginary parts dropped)."""
    g = torch.Generator().manual_seed(L)
    x = torch.randn(2, 3, L, dtype=torch.float64, generator=g, requires_grad=True)
    re, im = rfft_ortho(x)
    f = torch.fft.rfft(x, dim=-1, norm="ortho")
    torch.testing.assert_close(re, f.real, rtol=0, atol=1e-12)
    torch.testing.assert_close(im, f.imag, rtol=0, atol=1e-12)
    gr, gi = torch.randn_like(re), torch.randn_like(im)
    torch.testing.assert_close(torch.autograd.grad((re * gr + im * gi).sum(), x)[0],
                               torch.autograd.grad((f.real * gr + f.imag * gi).sum(), x)[0], rtol=0, atol=1e-12)
    zr = torch.randn(2, 3, L // 2 + 1, dtype=torch.float64, generator=g, requires_grad=True)
    zi = torch.randn(2, 3, L // 2 + 1, dtype=torch.float64, generator=g, requires_grad=True)
    y = irfft_ortho(zr, zi, L)
    ref = torch.fft.irfft(torch.complex(zr, zi), n=L, dim=-1, norm="ortho")
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    gy = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, (zr, zi), gy), torch.autograd.grad(ref, (zr, zi), gy)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
    x32 = x.detach().float()
    torch.testing.assert_close(rfft_ortho(x32)[0], torch.fft.rfft(x32, dim=-1, norm="ortho").real,
                               rtol=1e-5, atol=1e-5)


def _ssd_inputs(g, b, L, H, P, G, S):
    """float64 (x, dt, A, B, C, D, dt_bias) of the SSD's shapes."""
    return [torch.randn(b, L, H, P, generator=g, dtype=torch.float64),
            torch.randn(b, L, H, generator=g, dtype=torch.float64),
            -torch.rand(H, generator=g, dtype=torch.float64) - 0.5,
            torch.randn(b, L, G, S, generator=g, dtype=torch.float64),
            torch.randn(b, L, G, S, generator=g, dtype=torch.float64), torch.rand(H, dtype=torch.float64),
            torch.randn(H, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("multi", [False, True])
def test_ssd_rows_equal_quadratic_rows(G, multi):
    g = torch.Generator().manual_seed(G)
    b, L, H, P, S = 3, 11, 4, 5, 6
    ins = _ssd_inputs(g, b, L, H, P, G, S)
    ins = [t.requires_grad_() for t in ins]
    rows = torch.tensor([[0, 3, 10], [5, 5, 6], [1, 2, 9]]) if multi else torch.tensor([10, 0, 4])
    ar = torch.arange(b)[:, None] if multi else torch.arange(b)
    full = ssd_quadratic_ref(*ins)[ar, rows]
    x, dt, A, B, C, D, bias = ins
    out = ssd_rows_ref(x, dt, A, B, C[ar, rows], D, bias, rows)
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(full, ins, go)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("L", [1, 13])
def test_folded_dual_form_equals_quadratic_ref(G, L):
    """The CPU dual form (step factors folded into the L x L matrix) equals the reference's,
    values and all seven gradients (float64, and fp32 at the model's tolerance)."""
    g = torch.Generator().manual_seed(L + G)
    b, H, P, S = 3, 4, 5, 6
    ins = _ssd_inputs(g, b, L, H, P, G, S)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        xs = [t.detach().to(dtype).requires_grad_() for t in ins]
        ref, out = ssd_quadratic_ref(*xs), ssd_quadratic_folded(*xs)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        go = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dtype)
        for a, r in zip(torch.autograd.grad(out, xs, go), torch.autograd.grad(ref, xs, go)):
            torch.testing.assert_close(a, r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("L,Q", [(13, 4), (16, 4), (13, 32), (3, 2)])
def test_folded_chunked_scan_equals_references(G, L, Q):
    """The CPU chunked scan (head-major, folded chunk matrices) equals the chunked reference
    and the dual form, values and all seven gradients; padded and unpadded last chunks."""
    g = torch.Generator().manual_seed(10 * L + Q + G)
    b, H, P, S = 2, 4, 5, 6
    ins = _ssd_inputs(g, b, L, H, P, G, S)
    xs = [t.requires_grad_() for t in ins]
    out = ssd_chunked_folded(*xs, chunk_size=Q)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, xs, go)
    for ref_fn in (lambda *a: ssd_chunked_ref(*a, chunk_size=Q), ssd_quadratic_ref):
        ref = ref_fn(*xs)
        torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
        for a, r in zip(grads, torch.autograd.grad(ref, xs, go)):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_groups_equal_heads_is_not_copied():
    t = torch.randn(2, 3, 4, 5)
    assert _expand_groups(t, 4) is t
    assert torch.equal(_expand_groups(t, 8), t.repeat_interleave(2, dim=2))


def test_dropout_keeps_one_minus_p_scaled_and_masks_the_gradient_alike():
    torch.manual_seed(0)
    d = Dropout(0.4)
    x = torch.ones(200_000, requires_grad=True)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.6) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.6))
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx != 0, kept) and torch.allclose(gx[kept], y[kept])
    d.eval()
    assert d(x) is x
    assert Dropout(0.0).train()(x) is x
