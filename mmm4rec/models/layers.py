"""Building blocks shared by the MMM4Rec modules."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalDepthwiseConv(nn.Module):
    """Depth-wise causal Conv1d over the length axis, then SiLU.

    x [b, L, C] -> [b, L, C] (``channels_last=True``) or [b, C, L] -> [b, C, L].
    The weights are an ``nn.Conv1d``'s (PyTorch default init); the product is computed
    as K shifted multiply-adds, which on CPU is several times faster than the
    depth-wise convolution kernel for the widths used here (K = 4), and identical.
    """

    def __init__(self, channels: int, width: int, channels_last: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.conv.kernel_size[0]
        w = self.conv.weight[:, 0, :]                               # [C, K]
        if self.channels_last:                                      # x [b, L, C]
            L = x.shape[1]
            xp = F.pad(x, (0, 0, K - 1, 0))
            y = self.conv.bias + sum(xp[:, j:j + L, :] * w[:, j] for j in range(K))
        else:                                                       # x [b, C, L]
            L = x.shape[-1]
            xp = F.pad(x, (K - 1, 0))
            y = self.conv.bias[:, None] + sum(xp[..., j:j + L] * w[:, j, None] for j in range(K))
        return F.silu(y)


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
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.w2(self.drop(F.hardswish(self.w1(x))))))


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
        self.drop = nn.Dropout(dropout)
        self.lin1 = nn.Linear(max_len, max_len)
        self.lin2 = nn.Linear(max_len, max_len)
        self.conv1 = CausalDepthwiseConv(n_heads, d_conv, channels_last=False)
        self.conv2 = CausalDepthwiseConv(n_heads, d_conv, channels_last=False)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        s = F.tanhshrink(self.lin2(F.silu(self.lin1(self.drop(d)))))
        return self.conv2(self.conv1(d * s))
