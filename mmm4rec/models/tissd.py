"""TiSSD (time-aware SSD, spec section 4) and TiCoSSD (Cross-SSD, section 5).

Shapes: b batch, L = max_len, N hidden, E = expand*N, H heads of width P,
G groups, S state size. Time signals D are [b, H, L].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import ssd, ssd_rows
from ..kernels.ssd_ref import ssd_quadratic_ref
from .configs import MMM4RecConfig
from .layers import CausalDepthwiseConv, Dropout, GatedRMSNorm, TimeBranch
from .packing import DENSE, Dense, Packed


def split_linear(linear: nn.Linear, inputs: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """``torch.split(linear(x), sizes, -1)`` as one product per block of output rows, block
    i applied to ``inputs[i]`` (the same x, or x at fewer positions when only those are
    needed). Same values; the backward sums the blocks' input gradients instead of
    concatenating the output gradients into one [b, L, sum(sizes)] copy."""
    out, lo = [], 0
    for x, n in zip(inputs, sizes):
        out.append(F.linear(x, linear.weight[lo:lo + n], linear.bias[lo:lo + n]))
        lo += n
    return out


class _SSDCore(nn.Module):
    """Per-head SSD parameters (A, D skip, dt bias), the scan, gated norm and out proj."""

    def __init__(self, cfg: MMM4RecConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.n_heads
        # release init: dt0 log-uniform in [1e-3, 1e-1], floored at 1e-4; dt_bias = softplus^-1(dt0)
        dt0 = torch.exp(torch.rand(H) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.rmsnorm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.hidden_size)

    def scan(self, xs, dt, B, C, z, rows: torch.Tensor | None = None, lay: Dense | Packed = DENSE):
        """xs [b,L,E], dt [b,L,H] (pre-softplus), B/C [b,L,G*S], z [b,L,E] -> [b,L,N].

        ``rows`` ([b] or [b, R] positions) given: the output there only, [b, N] / [b, R, N];
        C and z are then C and the gate at those positions ([b, G*S] / [b, R, G*S], ...).
        Otherwise z and the output are in ``lay``'s layout ([T, ...] when packed)."""
        cfg = self.cfg
        b, L, _ = xs.shape
        if rows is not None:
            y = ssd_rows(xs.reshape(b, L, cfg.n_heads, cfg.head_dim), dt, -torch.exp(self.A_log.float()),
                         B.reshape(b, L, cfg.n_groups, cfg.d_state),
                         C.reshape(*rows.shape, cfg.n_groups, cfg.d_state), self.D, self.dt_bias, rows)
            return self.out_proj(self.norm(y.reshape(*rows.shape, cfg.d_inner), z))
        args = (
            xs.reshape(b, L, cfg.n_heads, cfg.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, L, cfg.n_groups, cfg.d_state), C.reshape(b, L, cfg.n_groups, cfg.d_state),
            self.D, self.dt_bias,
        )
        if cfg.ssd_form == "quadratic":
            y = ssd_quadratic_ref(*args)
        else:
            y = ssd(*args, chunk_size=cfg.chunk_size)
        return self.out_proj(self.norm(lay.flat(y.reshape(b, L, cfg.d_inner)), z))


class TiSSD(nn.Module):
    """Time-aware SSD block. ONE instance serves both modality branches.

    forward(X [b, L, N], D [b, H, L]) -> (Y [b, L, N], D_out [b, H, L]); with ``rows``
    [b, K] (the K = d_conv positions up to the read one, clamped at 0: what the cross
    block reads), Y at those positions only, [b, K, N]: the gate half of the input
    projection, the scan output, norm and out projection are computed there alone, and C
    (which the scan reads there only) from the 2K - 1 positions its causal conv needs.
    """

    def __init__(self, cfg: MMM4RecConfig):
        super().__init__()
        self.cfg = cfg
        E, GS, H = cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_heads
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * E + 2 * GS + H)
        self.conv = CausalDepthwiseConv(E + 2 * GS, cfg.d_conv)
        self.core = _SSDCore(cfg)
        if cfg.is_time:
            self.time = TimeBranch(cfg.max_len, H, cfg.d_conv, cfg.time_dropout_prob)
            self.gate_drop = Dropout(cfg.time_dropout_prob)
            self.gate = nn.Linear(cfg.max_len, 1)
            self.time_norm = nn.LayerNorm(cfg.max_len, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, d: torch.Tensor | None, rows: torch.Tensor | None = None,
                lay: Dense | Packed = DENSE):
        """``lay``: the layout of x and of the output at every position (packed: [T, N])."""
        cfg = self.cfg
        E, GS, H, K = cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_heads, cfg.d_conv
        if rows is None:
            z, xbc, dt = split_linear(self.in_proj, [x, x, x], [E, E + 2 * GS, H])
            xs, B, C = torch.split(self.conv(lay.grid(xbc)), [E, GS, GS], dim=-1)
        else:
            # C at rows = its conv at the 2K - 1 positions read - 2K + 2 .. read (zero before 0,
            # the conv's padding); every row is >= read - K + 1, so its conv reads inside
            read = rows[:, -1:]
            span = read - (2 * K - 2) + torch.arange(2 * K - 1, device=rows.device)
            z, xb, C, dt = split_linear(self.in_proj, [lay.at(x, rows), x, lay.at(x, span.clamp(min=0)), x],
                                        [E, E + GS, GS, H])
            C = C * (span >= 0).unsqueeze(-1).to(C.dtype)
            xb, C = self.conv.blocks([lay.grid(xb), C])
            xs, B = torch.split(xb, [E, GS], dim=-1)
            C = DENSE.at(C, rows - read + 2 * K - 2)
        dt = lay.grid(dt)
        d_out = d
        if cfg.is_time:
            T = self.time(d)                                   # [b, H, L]
            dt = dt * T.transpose(1, 2)
            g = torch.sigmoid(self.gate(self.gate_drop(d)))    # [b, H, 1]
            d_out = self.time_norm(g * d + (1 - g) * T)
        return self.core.scan(xs, dt, B, C, z, rows, lay), d_out


class TiCoSSD(nn.Module):
    """Cross-SSD: Xs, B, dt from the text stream; C from the vision stream; gate from both.

    forward(P_t [b, L, N], H_v [b, L, N], D_f [b, H, L] | None) -> [b, L, N].

    With ``rows`` [b] (one position per sequence), the output there only, [b, N]; H_v is
    then the vision stream at the K = d_conv positions rows-K+1..rows ([b, K, N], clamped
    at 0) and ``valid`` [b, K] marks those >= 0: C needs no more (its causal conv reads K
    positions), and the gate, scan output, norm and projections are computed there alone.
    """

    def __init__(self, cfg: MMM4RecConfig):
        super().__init__()
        self.cfg = cfg
        E, GS, H = cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_heads
        self.text_proj = nn.Linear(cfg.hidden_size, E + GS + H)     # Xs, B, dt
        self.vision_proj = nn.Linear(cfg.hidden_size, GS)           # C
        self.gate_proj = nn.Linear(cfg.hidden_size, E)              # Z from H_v + P_t
        self.conv_xb = CausalDepthwiseConv(E + GS, cfg.d_conv)
        self.conv_c = CausalDepthwiseConv(GS, cfg.d_conv)
        self.core = _SSDCore(cfg)
        if cfg.is_time:
            self.time = TimeBranch(cfg.max_len, H, cfg.d_conv, cfg.time_dropout_prob)

    def forward(self, p_t: torch.Tensor, h_v: torch.Tensor, d_f: torch.Tensor | None,
                rows: torch.Tensor | None = None, valid: torch.Tensor | None = None, lay: Dense | Packed = DENSE):
        cfg = self.cfg
        E, GS, H = cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_heads
        xb, dt = split_linear(self.text_proj, [p_t, p_t], [E + GS, H])
        xs, B = torch.split(self.conv_xb(lay.grid(xb)), [E, GS], dim=-1)
        dt = lay.grid(dt)
        if rows is None:
            C = self.conv_c(lay.grid(self.vision_proj(h_v)))
            z = self.gate_proj(h_v + p_t)
        else:   # the conv's zero padding: positions < 0 enter as 0 (after the projection)
            assert valid is not None, "rows given without their valid mask"
            C = self.conv_c(self.vision_proj(h_v) * valid.unsqueeze(-1).to(h_v.dtype))[:, -1]
            z = self.gate_proj(h_v[:, -1] + lay.at(p_t, rows))
        if cfg.is_time:
            dt = dt * self.time(d_f).transpose(1, 2)
        return self.core.scan(xs, dt, B, C, z, rows, lay)


def init_weights(module: nn.Module, std: float) -> None:
    """Release init: every Linear N(0, std) with zero bias; LayerNorm 1/0; convs default."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
