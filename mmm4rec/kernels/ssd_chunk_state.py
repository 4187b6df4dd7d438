"""SSD stage 2: the state each chunk hands on when it starts from zero, forward and backward.

Reference twin: :func:`mmm4rec.kernels.ssd_ref.ssd_chunk_state_ref` (imported below).

Shapes (b batch, L length, H heads, P head dim, G groups, S state, Q chunk, c chunks):

    x          [b, L, H, P]     (any strides; not dt-scaled)
    B          [b, L, G, S]     (any strides; group g serves heads g*H/G .. (g+1)*H/G - 1)
    dt_hat     [b, H, c, Q]     fp32, from stage 1
    dA_cumsum  [b, H, c, Q]     fp32, from stage 1
    states     [b, c, H, P, S]  fp32

    states[p, n] = sum_s x[s, p] * w[s] * B[s, n],   w[s] = exp(dA_cs[Q-1] - dA_cs[s]) * dt_hat[s]

Forward: one program per (chunk, head, P-block) does one [BLOCK_P, Q] x [Q, S] ``tl.dot``.

Backward, given dstates [b, c, H, P, S] (with Bw = B * exp(dA_cs[Q-1] - dA_cs)):
    du     = Bw @ dstates^T            (u = dt_hat * x)  -> dx = dt_hat * du, ddt_hat = sum_p x du
    dBw    = u @ dstates               -> dB = dBw * exp(dA_cs[Q-1] - dA_cs)
    ddA_cs[s] -= sum_n dBw * Bw,  ddA_cs[Q-1] += sum_s sum_n dBw * Bw  (+ ddA_chunk_end, see below)
One program per (chunk, group, head split) loops over its heads and over P blocks, so
dB is summed over the heads of a group in registers (no atomics, deterministic) and
written once per split; the caller sums the splits. With ``accumulate=True`` it adds
into buffers the chunk-scan backward already filled (that is how ``ssd_combined`` uses
it); otherwise it writes fresh outputs. ``ddA_chunk_end`` [b, H, c] (the state-passing
backward's cotangent of dA_cumsum[..., Q-1]) is folded in when given.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import dot_precision, empty, same_layout
from .ssd_ref import ssd_chunk_state_ref as chunk_state_ref  # the twin

__all__ = ["chunk_state_bwd", "chunk_state_fwd", "chunk_state_ref"]


@triton.jit
def _chunk_state_fwd_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cs_ptr, states_ptr,
    seqlen, nchunks, nheads_per_group, hdim, dstate,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_p = tl.program_id(2)
    pid_b = (pid_bc // nchunks).to(tl.int64)   # int64 offsets: b * stride may pass 2^31
    pid_c = pid_bc % nchunks
    pid_g = pid_h // nheads_per_group
    offs_q = tl.arange(0, CHUNK)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_S)
    q_mask = offs_q < seqlen - pid_c * CHUNK
    l_idx = pid_c * CHUNK + offs_q

    dt_base = pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    dt_hat = tl.load(dt_ptr + dt_base + offs_q * stride_dt_q)
    dA_cs = tl.load(dA_cs_ptr + dt_base + offs_q * stride_dt_q)
    dA_end = tl.load(dA_cs_ptr + dt_base + (CHUNK - 1) * stride_dt_q)
    w = tl.exp(dA_end - dA_cs) * dt_hat                                   # [Q], 0 on the tail

    x = tl.load(x_ptr + pid_b * stride_x_b + l_idx[:, None] * stride_x_l + pid_h * stride_x_h
                + offs_p[None, :] * stride_x_p,
                mask=q_mask[:, None] & (offs_p[None, :] < hdim), other=0.0).to(tl.float32)
    Bm = tl.load(B_ptr + pid_b * stride_B_b + l_idx[:, None] * stride_B_l + pid_g * stride_B_g
                 + offs_n[None, :] * stride_B_n,
                 mask=q_mask[:, None] & (offs_n[None, :] < dstate), other=0.0).to(tl.float32)
    states = tl.dot(tl.trans(x * w[:, None]), Bm, input_precision=DOT_PREC)  # [BLOCK_P, BLOCK_S]

    tl.store(states_ptr + pid_b * stride_st_b + pid_c * stride_st_c + pid_h * stride_st_h
             + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n, states,
             mask=(offs_p[:, None] < hdim) & (offs_n[None, :] < dstate))


@triton.jit
def _chunk_state_bwd_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cs_ptr, dstates_ptr, ddA_end_ptr,
    dx_ptr, dB_ptr, ddt_ptr, ddA_cs_ptr,
    seqlen, nchunks, nheads_per_group, heads_per_split, hdim, dstate,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,       # dt_hat, dA_cs, ddt, ddA_cs
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    stride_ddAe_b, stride_ddAe_h, stride_ddAe_c,
    stride_dx_b, stride_dx_l, stride_dx_h, stride_dx_p,
    stride_dB_s, stride_dB_b, stride_dB_l, stride_dB_g, stride_dB_n,   # fp32 [split, b, L, G, S]
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_DDA_END: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_gs = tl.program_id(1)
    pid_b = (pid_bc // nchunks).to(tl.int64)   # int64 offsets: b * stride may pass 2^31
    pid_c = pid_bc % nchunks
    splits_per_group = nheads_per_group // heads_per_split
    pid_g = pid_gs // splits_per_group
    pid_s = pid_gs % splits_per_group
    offs_q = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, BLOCK_S)
    q_mask = offs_q < seqlen - pid_c * CHUNK
    l_idx = pid_c * CHUNK + offs_q
    qn_mask = q_mask[:, None] & (offs_n[None, :] < dstate)

    Bm = tl.load(B_ptr + pid_b * stride_B_b + l_idx[:, None] * stride_B_l + pid_g * stride_B_g
                 + offs_n[None, :] * stride_B_n, mask=qn_mask, other=0.0).to(tl.float32)
    dB_acc = tl.zeros((CHUNK, BLOCK_S), dtype=tl.float32)

    for i in range(heads_per_split):
        h = pid_g * nheads_per_group + pid_s * heads_per_split + i
        dt_base = pid_b * stride_dt_b + h * stride_dt_h + pid_c * stride_dt_c
        dt_hat = tl.load(dt_ptr + dt_base + offs_q * stride_dt_q)
        dA_cs = tl.load(dA_cs_ptr + dt_base + offs_q * stride_dt_q)
        dA_end = tl.load(dA_cs_ptr + dt_base + (CHUNK - 1) * stride_dt_q)
        decay = tl.exp(dA_end - dA_cs)                                     # [Q]
        Bw = Bm * decay[:, None]                                           # [Q, S]
        dBw = tl.zeros((CHUNK, BLOCK_S), dtype=tl.float32)
        ddt = tl.zeros((CHUNK,), dtype=tl.float32)
        for p0 in range(0, hdim, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < hdim
            x = tl.load(x_ptr + pid_b * stride_x_b + l_idx[:, None] * stride_x_l + h * stride_x_h
                        + offs_p[None, :] * stride_x_p,
                        mask=q_mask[:, None] & p_mask[None, :], other=0.0).to(tl.float32)
            dst = tl.load(dstates_ptr + pid_b * stride_st_b + pid_c * stride_st_c + h * stride_st_h
                          + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n,
                          mask=p_mask[:, None] & (offs_n[None, :] < dstate), other=0.0)
            du = tl.dot(Bw, tl.trans(dst), input_precision=DOT_PREC)        # [Q, BLOCK_P]
            dBw += tl.dot(x * dt_hat[:, None], dst, input_precision=DOT_PREC)
            ddt += tl.sum(du * x, axis=1)
            dx = du * dt_hat[:, None]
            dx_ptrs = (dx_ptr + pid_b * stride_dx_b + l_idx[:, None] * stride_dx_l + h * stride_dx_h
                       + offs_p[None, :] * stride_dx_p)
            dx_mask = q_mask[:, None] & p_mask[None, :]
            if ACCUMULATE:
                dx += tl.load(dx_ptrs, mask=dx_mask, other=0.0).to(tl.float32)
            tl.store(dx_ptrs, dx, mask=dx_mask)
        dB_acc += dBw * decay[:, None]
        dlog_decay = tl.sum(dBw * Bw, axis=1)                              # d/d(dA_end - dA_cs[s])
        ddA = tl.where(offs_q == CHUNK - 1, tl.sum(dlog_decay, axis=0), 0.0) - dlog_decay
        if HAS_DDA_END:
            ddA_end = tl.load(ddA_end_ptr + pid_b * stride_ddAe_b + h * stride_ddAe_h
                              + pid_c * stride_ddAe_c)
            ddA += tl.where(offs_q == CHUNK - 1, ddA_end, 0.0)
        if ACCUMULATE:
            ddA += tl.load(ddA_cs_ptr + dt_base + offs_q * stride_dt_q)
            ddt += tl.load(ddt_ptr + dt_base + offs_q * stride_dt_q)
        tl.store(ddA_cs_ptr + dt_base + offs_q * stride_dt_q, ddA)
        tl.store(ddt_ptr + dt_base + offs_q * stride_dt_q, ddt)

    dB_ptrs = (dB_ptr + pid_s * stride_dB_s + pid_b * stride_dB_b + l_idx[:, None] * stride_dB_l
               + pid_g * stride_dB_g + offs_n[None, :] * stride_dB_n)
    if ACCUMULATE:
        dB_acc += tl.load(dB_ptrs, mask=qn_mask, other=0.0)
    tl.store(dB_ptrs, dB_acc, mask=qn_mask)


def block_s(dstate: int) -> int:
    return max(16, triton.next_power_of_2(dstate))


def chunk_state_fwd(x, B, dt_hat, dA_cs):
    """x [b, L, H, P], B [b, L, G, S], dt_hat / dA_cs [b, H, c, Q] -> states fp32 [b, c, H, P, S]."""
    bsz, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    _, _, nchunks, chunk_size = dt_hat.shape
    assert same_layout(dt_hat, dA_cs)
    states = empty(bsz, nchunks, nheads, hdim, dstate, device=x.device)
    BLOCK_P = min(64, max(16, triton.next_power_of_2(hdim)))
    grid = (bsz * nchunks, nheads, triton.cdiv(hdim, BLOCK_P))
    _chunk_state_fwd_kernel[grid](
        x, B, dt_hat, dA_cs, states,
        seqlen, nchunks, nheads // ngroups, hdim, dstate,
        *x.stride(), *B.stride(), *dt_hat.stride(), *states.stride(),
        CHUNK=chunk_size, BLOCK_P=BLOCK_P, BLOCK_S=block_s(dstate),
        DOT_PREC=dot_precision(x.dtype), num_warps=4,
    )
    return states


def chunk_state_bwd(x, B, dt_hat, dA_cs, dstates, ddA_chunk_end=None, *, nsplit: int = 1,
                    out=None):
    """Backward of :func:`chunk_state_fwd` given dstates [b, c, H, P, S].

    Returns ``(dx, dB_split, ddt_hat, ddA_cs)``: dx [b, L, H, P] (x's dtype),
    dB_split fp32 [nsplit, b, L, G, S] (sum over dim 0 for dB), ddt_hat / ddA_cs fp32
    [b, H, c, Q]. ``nsplit`` divides H/G: how many programs share a group's heads.
    ``out``: that same 4-tuple of buffers to accumulate into (they are returned).
    """
    bsz, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    _, _, nchunks, chunk_size = dt_hat.shape
    heads_per_group = nheads // ngroups
    assert heads_per_group % nsplit == 0
    dev = x.device
    if out is None:
        dx = empty(bsz, seqlen, nheads, hdim, device=dev, dtype=x.dtype)
        dB = empty(nsplit, bsz, seqlen, ngroups, dstate, device=dev)
        ddt = empty(bsz, nheads, nchunks, chunk_size, device=dev)
        ddA = empty(bsz, nheads, nchunks, chunk_size, device=dev)
    else:
        dx, dB, ddt, ddA = out
        assert dB.shape[0] == nsplit
    assert same_layout(dt_hat, dA_cs, ddt, ddA)
    ddAe = ddA_chunk_end if ddA_chunk_end is not None else dt_hat  # dummy pointer when absent
    ddAe_strides = ddA_chunk_end.stride() if ddA_chunk_end is not None else (0, 0, 0)
    grid = (bsz * nchunks, ngroups * nsplit)
    _chunk_state_bwd_kernel[grid](
        x, B, dt_hat, dA_cs, dstates, ddAe,
        dx, dB, ddt, ddA,
        seqlen, nchunks, heads_per_group, heads_per_group // nsplit, hdim, dstate,
        *x.stride(), *B.stride(), *dt_hat.stride(), *dstates.stride(), *ddAe_strides,
        *dx.stride(), *dB.stride(),
        CHUNK=chunk_size, BLOCK_P=min(32, max(16, triton.next_power_of_2(hdim))),
        BLOCK_S=block_s(dstate), HAS_DDA_END=ddA_chunk_end is not None,
        ACCUMULATE=out is not None, DOT_PREC=dot_precision(x.dtype), num_warps=8,
    )
    return dx, dB, ddt, ddA
