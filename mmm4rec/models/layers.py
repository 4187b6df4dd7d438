"""Building blocks shared by the MMM4Rec modules."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .packing import Dense, Packed


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, keep=None):
        if keep is None:
            keep = torch.rand(x.shape, device=x.device) >= p       # P(keep) = 1 - p
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return g.mul(keep).mul_(ctx.scale), None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same module, same distribution: each entry kept with probability
    1 - p and scaled by 1 / (1 - p)) whose mask comes from ``torch.rand(...) >= p``: on
    CPU about 3x faster than the ``bernoulli_`` of ``F.dropout``, which was 6.5% of a
    training step at the paper's sizes. Only the random stream differs.

    ``lay`` (x packed [T, N], :class:`.packing.Packed`): the mask is drawn for the whole
    [b, L, N] grid and its kept rows taken, so the packed step draws the same random
    numbers as the dense one (tests/test_model_fast_path.py::test_packed_tokens_equal_dense_path)."""

    def forward(self, x: torch.Tensor, lay: Dense | Packed | None = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0 or self.inplace:
            return super().forward(x)
        keep = None
        if lay is not None and lay.packed:
            assert isinstance(lay, Packed)
            keep = lay.pack(torch.rand(lay.b, lay.L, x.shape[-1], device=x.device) >= self.p)
        return _Dropout.apply(x, self.p, keep)


def _conv_pre(x, wT, bias):
    """bias + sum_j wT[j] * x shifted by K-1-j, wT [K, C] (contiguous rows: a strided weight
    column as the broadcast operand makes each multiply-add about 3x slower), summed in the
    order j = 0..K-1 after the bias (the rounding of the expression it replaces)."""
    b, L, C = x.shape
    K = wT.shape[0]
    pre = x.new_empty(b, L, C)
    pre.copy_(bias.expand(b, L, C))
    for j in range(K):
        s = K - 1 - j
        if s < L:
            pre[:, s:].addcmul_(x[:, :L - s], wT[j])
    return pre


class _CausalConvSiLU(torch.autograd.Function):
    """silu(bias + sum_j w[:, j] * x shifted by K-1-j along the length axis), x [b, L, C].

    Forward and backward as in-place multiply-adds on slices (``addcmul_``): no padded
    copy, no per-tap temporaries and no slice-backward zero fills, which autograd of the
    plain expression spends most of its time on; the SiLU's derivative is applied in the
    same backward, and the weight gradient's K products share one contiguous buffer (on
    CPU a fresh [b, L, C] tensor costs more in page faults than its arithmetic, and a sum
    over a strided slice runs several times slower than over a contiguous one).
    ``x`` may be a strided view (the [b, C, L] layout is passed transposed).
    """

    @staticmethod
    def forward(ctx, x, w, bias):
        wT = w.t().contiguous()
        pre = _conv_pre(x, wT, bias)
        ctx.save_for_backward(x, wT, pre)
        return F.silu(pre)

    @staticmethod
    def backward(ctx, gy):
        x, wT, pre = ctx.saved_tensors
        (b, L, C), K = x.shape, wT.shape[0]
        gpre = torch.ops.aten.silu_backward(gy, pre)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gpre * wT[K - 1]
            for j in range(K - 1):
                s = K - 1 - j
                if s < L:
                    gx[:, :L - s].addcmul_(gpre[:, s:], wT[j])
        if ctx.needs_input_grad[1]:
            buf = torch.empty(b * L * C, dtype=gpre.dtype, device=gpre.device)
            cols = []
            for j in range(K):
                s = K - 1 - j
                if s < L:
                    prod = torch.mul(gpre[:, s:], x[:, :L - s], out=buf[:b * (L - s) * C].view(b, L - s, C))
                    cols.append(prod.sum((0, 1)))
                else:
                    cols.append(wT.new_zeros(C))
            gw = torch.stack(cols, 1)
        if ctx.needs_input_grad[2]:
            gb = gpre.sum((0, 1))
        return gx, gw, gb


def causal_depthwise_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [b, L, C], weight [C, K], bias [C] -> silu(causal depth-wise conv) [b, L, C].

    Equals ``silu(F.conv1d(x^T, weight[:, None], bias, padding=K-1, groups=C)[..., :L])^T``
    (tests/test_model.py::test_causal_conv_equals_torch_conv1d, tests/test_model_fast_path.py). On CPU it is faster than
    both that (mkldnn's depth-wise kernel at K = 4) and the same sum written as autograd ops
    (benchmarks/train_step.py, docs/benchmarks.md); under autocast it computes in the
    promoted dtype of its inputs, as the sum of products it replaces did."""
    dt = torch.promote_types(x.dtype, weight.dtype)
    x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
    if not torch.is_grad_enabled():       # inference (and torch.export): no autograd.Function
        return F.silu(_conv_pre(x, weight.t().contiguous(), bias))
    return _CausalConvSiLU.apply(x, weight, bias)


class CausalDepthwiseConv(nn.Module):
    """Depth-wise causal Conv1d over the length axis, then SiLU.

    x [b, L, C] -> [b, L, C] (``channels_last=True``) or [b, C, L] -> [b, C, L].
    The weights are an ``nn.Conv1d``'s (PyTorch default init); the product is
    :func:`causal_depthwise_conv_silu` (K shifted multiply-adds with a hand-written backward).
    """

    def __init__(self, channels: int, width: int, channels_last: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1)
        self.channels_last = channels_last

    def blocks(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The conv of the channel concatenation of ``xs`` ([b, L, C_i] each, channels
        last; sum C_i = channels), returned per block: one call per block, so neither the
        input nor, in backward, its gradient is concatenated into one [b, L, C] copy."""
        w, bias = self.conv.weight[:, 0, :], self.conv.bias
        out, lo = [], 0
        for x in xs:
            n = x.shape[-1]
            out.append(causal_depthwise_conv_silu(x, w[lo:lo + n], bias[lo:lo + n]))
            lo += n
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight[:, 0, :]                               # [C, K]
        if self.channels_last:                                      # x [b, L, C]
            return causal_depthwise_conv_silu(x, w, self.conv.bias)
        return causal_depthwise_conv_silu(x.transpose(1, 2), w, self.conv.bias).transpose(1, 2)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) * w: the norm comes after the gate (Mamba-2, spec step 6)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y * F.silu(z)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FeedForward(nn.Module):
    """FFN(x) = LN(x + Dropout(W2 Dropout(Hardswish(W1 x)))), N -> F -> N."""

    def __init__(self, hidden: int, inner: int, dropout: float, eps: float):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner)
        self.w2 = nn.Linear(inner, hidden)
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, lay: Dense | Packed | None = None) -> torch.Tensor:
        return self.norm(x + self.drop(self.w2(self.drop(F.hardswish(self.w1(x)), lay)), lay))


class ComplexLinear(nn.Module):
    """A complex linear map over the frequency axis from two real Linear layers.

    Its weights are handed to the fused filter as (W_r, b_r, W_i, b_i).
    """

    def __init__(self, n: int):
        super().__init__()
        self.real = nn.Linear(n, n)
        self.imag = nn.Linear(n, n)

    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.real.weight, self.real.bias, self.imag.weight, self.imag.bias


class TimeBranch(nn.Module):
    """s = Tanhshrink(Lin2(SiLU(Lin1(Dropout(D))))); T = D * s; two causal convs + SiLU.

    The Linear layers act along the length axis (size L). D [b, H, L] -> T [b, H, L].
    """

    def __init__(self, max_len: int, n_heads: int, d_conv: int, dropout: float):
        super().__init__()
        self.drop = Dropout(dropout)
        self.lin1 = nn.Linear(max_len, max_len)
        self.lin2 = nn.Linear(max_len, max_len)
        self.conv1 = CausalDepthwiseConv(n_heads, d_conv, channels_last=False)
        self.conv2 = CausalDepthwiseConv(n_heads, d_conv, channels_last=False)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        s = F.tanhshrink(self.lin2(F.silu(self.lin1(self.drop(d)))))
        return self.conv2(self.conv1(d * s))
