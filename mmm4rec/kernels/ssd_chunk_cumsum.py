"""SSD stage 1: step size and its within-chunk cumulative decay, forward and backward.

Reference twin: :func:`mmm4rec.kernels.ssd_ref.ssd_chunk_cumsum_ref` (imported below).

Shapes (b batch, L length, H heads, Q chunk size, c = ceil(L / Q) chunks):

    dt        [b, L, H]     step size BEFORE softplus (any strides)
    A         [H]           negative decay rate
    dt_bias   [H]           added inside the softplus
    dt_hat    [b, H, c, Q]  fp32, softplus(dt + dt_bias); 0 on the padded tail
    dA_cumsum [b, H, c, Q]  fp32, cumsum over Q of A * dt_hat (constant over the tail)

One program owns one chunk of BLOCK_H heads: it loads a [BLOCK_H, Q] tile, applies the
softplus, masks the tail and runs ``tl.cumsum`` along Q. The backward turns the
cotangent of dA_cumsum into the cotangent of dA by a reverse cumsum, adds the
direct cotangent of dt_hat, and multiplies by softplus' derivative, the sigmoid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, same_layout
from .ssd_ref import ssd_chunk_cumsum_ref as chunk_cumsum_ref  # the twin

__all__ = ["chunk_cumsum_bwd", "chunk_cumsum_fwd", "chunk_cumsum_ref"]


@triton.jit
def _softplus(x):
    """softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p by Goldberg's trick (tl has none)."""
    y = tl.exp(-tl.abs(x))
    w = 1.0 + y
    log1p = tl.where(w == 1.0, y, tl.log(w) * (y / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _sigmoid(x):
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _chunk_cumsum_fwd_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, dA_cs_ptr,
    seqlen, nheads,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_out_b, stride_out_h, stride_out_c, stride_out_q,
    CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)        # int64 offsets: b * stride may pass 2^31
    pid_c = tl.program_id(1)
    pid_h = tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, CHUNK)
    chunk_len = seqlen - pid_c * CHUNK
    h_mask = offs_h < nheads
    mask = h_mask[:, None] & (offs_q[None, :] < chunk_len)

    dt_ptrs = (dt_ptr + pid_b * stride_dt_b + (pid_c * CHUNK + offs_q[None, :]) * stride_dt_l
               + offs_h[:, None] * stride_dt_h)
    dt = tl.load(dt_ptrs, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(dt_bias_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)

    dt_hat = tl.where(mask, _softplus(dt + bias[:, None]), 0.0)
    dA_cs = tl.cumsum(dt_hat * A[:, None], axis=1)

    out_off = (pid_b * stride_out_b + offs_h[:, None] * stride_out_h + pid_c * stride_out_c
               + offs_q[None, :] * stride_out_q)
    out_mask = h_mask[:, None] & (offs_q[None, :] < CHUNK)
    tl.store(dt_out_ptr + out_off, dt_hat, mask=out_mask)
    tl.store(dA_cs_ptr + out_off, dA_cs, mask=out_mask)


@triton.jit
def _chunk_cumsum_bwd_kernel(
    ddA_cs_ptr, ddt_hat_ptr, dt_hat_ptr, dt_ptr, A_ptr, dt_bias_ptr,
    ddt_ptr, dA_part_ptr, ddt_bias_part_ptr,
    seqlen, nheads,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_c_b, stride_c_h, stride_c_c, stride_c_q,      # layout of ddA_cs, ddt_hat, dt_hat
    stride_ddt_b, stride_ddt_l, stride_ddt_h,
    stride_part_b, stride_part_c, stride_part_h,         # dA_part / ddt_bias_part [b, c, H]
    CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)        # int64 offsets: b * stride may pass 2^31
    pid_c = tl.program_id(1)
    pid_h = tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, CHUNK)
    chunk_len = seqlen - pid_c * CHUNK
    h_mask = offs_h < nheads
    mask = h_mask[:, None] & (offs_q[None, :] < chunk_len)
    full_mask = h_mask[:, None] & (offs_q[None, :] < CHUNK)

    c_off = (pid_b * stride_c_b + offs_h[:, None] * stride_c_h + pid_c * stride_c_c
             + offs_q[None, :] * stride_c_q)
    ddA_cs = tl.load(ddA_cs_ptr + c_off, mask=full_mask, other=0.0)
    ddt_hat = tl.load(ddt_hat_ptr + c_off, mask=full_mask, other=0.0)
    dt_hat = tl.load(dt_hat_ptr + c_off, mask=full_mask, other=0.0)
    dt = tl.load(dt_ptr + pid_b * stride_dt_b + (pid_c * CHUNK + offs_q[None, :]) * stride_dt_l
                 + offs_h[:, None] * stride_dt_h, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(dt_bias_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)

    # dA_cs[t] = sum_{k<=t} dA[k]  =>  ddA[k] = sum_{t>=k} ddA_cs[t]  (tail included:
    # dA_cs at the last, padded, slot carries the decay of the whole chunk).
    ddA = tl.cumsum(ddA_cs, axis=1, reverse=True)
    g = ddt_hat + ddA * A[:, None]                        # cotangent of dt_hat
    ddt = tl.where(mask, g * _sigmoid(dt + bias[:, None]), 0.0)
    tl.store(ddt_ptr + pid_b * stride_ddt_b + (pid_c * CHUNK + offs_q[None, :]) * stride_ddt_l
             + offs_h[:, None] * stride_ddt_h, ddt, mask=mask)

    part_off = pid_b * stride_part_b + pid_c * stride_part_c + offs_h * stride_part_h
    tl.store(dA_part_ptr + part_off, tl.sum(ddA * dt_hat, axis=1), mask=h_mask)
    tl.store(ddt_bias_part_ptr + part_off, tl.sum(ddt, axis=1), mask=h_mask)


def _block_h(nheads: int) -> int:
    return min(triton.next_power_of_2(nheads), 16)


def chunk_cumsum_fwd(dt: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor, chunk_size: int):
    """dt [b, L, H], A [H], dt_bias [H] -> (dt_hat, dA_cumsum), both fp32 [b, H, c, Q]."""
    bsz, seqlen, nheads = dt.shape
    nchunks = triton.cdiv(seqlen, chunk_size)
    dt_hat = empty(bsz, nheads, nchunks, chunk_size, device=dt.device)
    dA_cs = empty(bsz, nheads, nchunks, chunk_size, device=dt.device)
    BLOCK_H = _block_h(nheads)
    grid = (bsz, nchunks, triton.cdiv(nheads, BLOCK_H))
    _chunk_cumsum_fwd_kernel[grid](
        dt, A, dt_bias, dt_hat, dA_cs,
        seqlen, nheads,
        *dt.stride(),
        *dt_hat.stride(),
        CHUNK=chunk_size, BLOCK_H=BLOCK_H,
    )
    return dt_hat, dA_cs


def chunk_cumsum_bwd(ddA_cs, ddt_hat, dt_hat, dt, A, dt_bias):
    """Cotangents of (dt_hat, dA_cumsum) [b, H, c, Q] -> (ddt [b, L, H], dA [H], ddt_bias [H]).

    ``ddA_cs`` and ``ddt_hat`` must share ``dt_hat``'s (contiguous) layout; ddt has dt's dtype.
    """
    bsz, seqlen, nheads = dt.shape
    _, _, nchunks, chunk_size = dt_hat.shape
    assert same_layout(dt_hat, ddA_cs, ddt_hat)
    ddt = empty(bsz, seqlen, nheads, device=dt.device, dtype=dt.dtype)
    dA_part = empty(bsz, nchunks, nheads, device=dt.device)
    ddt_bias_part = empty(bsz, nchunks, nheads, device=dt.device)
    BLOCK_H = _block_h(nheads)
    grid = (bsz, nchunks, triton.cdiv(nheads, BLOCK_H))
    _chunk_cumsum_bwd_kernel[grid](
        ddA_cs, ddt_hat, dt_hat, dt, A, dt_bias,
        ddt, dA_part, ddt_bias_part,
        seqlen, nheads,
        *dt.stride(),
        *dt_hat.stride(),
        *ddt.stride(),
        *dA_part.stride(),
        CHUNK=chunk_size, BLOCK_H=BLOCK_H,
    )
    dA = dA_part.sum(dim=(0, 1)).to(A.dtype)
    ddt_bias = ddt_bias_part.sum(dim=(0, 1)).to(dt_bias.dtype)
    return ddt, dA, ddt_bias
