"""SSD stage 4: the output of each chunk, forward and backward.

Reference twin: :func:`mmm4rec.kernels.ssd_ref.ssd_chunk_scan_ref` (imported below).

Shapes (b batch, L length, H heads, P head dim, G groups, S state, Q chunk, c chunks):

    x            [b, L, H, P]     (any strides; not dt-scaled)
    B, C         [b, L, G, S]     (any strides; grouped)
    dt_hat       [b, H, c, Q]     fp32, from stage 1
    dA_cumsum    [b, H, c, Q]     fp32, from stage 1
    prev_states  [b, c, H, P, S]  from stage 3 (the state entering each chunk), or None
                                  when nothing is carried in (a one-chunk sequence)
    D            [H]
    y            [b, L, H, P]     x's dtype

Within a chunk, with u = dt_hat * x and K[t, s] = (C_t . B_s) exp(dA_cs[t] - dA_cs[s]) for
s <= t (0 above the diagonal):

    y = K @ u  +  exp(dA_cs)[:, None] * (C @ prev^T)  +  D * u

Forward: one program per (chunk, head, P-block): CB = C B^T by one ``tl.dot`` over S,
the decay mask from dA_cumsum, then ``K' @ x`` (K' = K with dt_hat folded into its
columns) and ``C @ prev^T``, both [Q, BLOCK_P] tiles, plus the skip term.

Backward, given dy (dK, dCB are [Q, Q], dy_off = exp(dA_cs) * (dy @ prev) is [Q, S]):

    du = K^T dy + D dy     dx = dt_hat * du        ddt_hat = sum_p x * du
    dK = dy u^T            dCB = dK * decay        dC = dCB B + dy_off    dB = dCB^T C
    dprev = (exp(dA_cs) * dy)^T C                  dD = sum(dy * u)
    ddA_cs = rowsum(dK * K) - colsum(dK * K) + sum_n dy_off * C

One program per (chunk, group, head split): CB is computed once per group and reused
for each of its heads; dB and dC are summed over those heads in registers and written
once per split (fp32 [split, b, L, G, S]; the caller sums the splits). Per head, one
pass over P blocks yields dx, ddt_hat, dD, dprev and the [Q, Q] / [Q, S] accumulators
dK and dy_off; dB, dC and ddA_cs follow from them after the pass.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import dot_precision, empty, same_layout
from .ssd_chunk_state import block_s
from .ssd_ref import ssd_chunk_scan_ref as chunk_scan_ref  # the twin

__all__ = ["chunk_scan_bwd", "chunk_scan_fwd", "chunk_scan_ref"]


@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, dA_cs_ptr, prev_ptr, D_ptr, y_ptr,
    seqlen, nchunks, nheads_per_group, hdim, dstate,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_pv_b, stride_pv_c, stride_pv_h, stride_pv_p, stride_pv_n,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_PREV: tl.constexpr, DOT_PREC: tl.constexpr,
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
    qn_mask = q_mask[:, None] & (offs_n[None, :] < dstate)
    qp_mask = q_mask[:, None] & (offs_p[None, :] < hdim)

    dt_base = pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    dt_hat = tl.load(dt_ptr + dt_base + offs_q * stride_dt_q)
    dA_cs = tl.load(dA_cs_ptr + dt_base + offs_q * stride_dt_q)
    Cm = tl.load(C_ptr + pid_b * stride_C_b + l_idx[:, None] * stride_C_l + pid_g * stride_C_g
                 + offs_n[None, :] * stride_C_n, mask=qn_mask, other=0.0).to(tl.float32)
    Bm = tl.load(B_ptr + pid_b * stride_B_b + l_idx[:, None] * stride_B_l + pid_g * stride_B_g
                 + offs_n[None, :] * stride_B_n, mask=qn_mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * stride_x_b + l_idx[:, None] * stride_x_l + pid_h * stride_x_h
                + offs_p[None, :] * stride_x_p, mask=qp_mask, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + pid_h).to(tl.float32)

    # intra-chunk: K' = (C B^T) * exp(dA_cs[t] - dA_cs[s]) * dt_hat[s] on s <= t
    cb = tl.dot(Cm, tl.trans(Bm), input_precision=DOT_PREC)              # [Q, Q]
    causal = offs_q[:, None] >= offs_q[None, :]
    seg = tl.where(causal, dA_cs[:, None] - dA_cs[None, :], float("-inf"))
    k = cb * tl.exp(seg) * dt_hat[None, :]
    acc = tl.dot(k, x, input_precision=DOT_PREC)                         # [Q, BLOCK_P]
    # the carried-in state (none when the sequence is one chunk) and the skip on u
    if HAS_PREV:
        prev = tl.load(prev_ptr + pid_b * stride_pv_b + pid_c * stride_pv_c + pid_h * stride_pv_h
                       + offs_p[:, None] * stride_pv_p + offs_n[None, :] * stride_pv_n,
                       mask=(offs_p[:, None] < hdim) & (offs_n[None, :] < dstate),
                       other=0.0).to(tl.float32)                          # [BLOCK_P, BLOCK_S]
        acc += tl.exp(dA_cs)[:, None] * tl.dot(Cm, tl.trans(prev), input_precision=DOT_PREC)
    acc += (D * dt_hat)[:, None] * x

    tl.store(y_ptr + pid_b * stride_y_b + l_idx[:, None] * stride_y_l + pid_h * stride_y_h
             + offs_p[None, :] * stride_y_p, acc, mask=qp_mask)


@triton.jit
def _chunk_scan_bwd_kernel(
    dy_ptr, x_ptr, B_ptr, C_ptr, dt_ptr, dA_cs_ptr, prev_ptr, D_ptr,
    dx_ptr, dB_ptr, dC_ptr, ddt_ptr, ddA_cs_ptr, dprev_ptr, dD_part_ptr,
    seqlen, nchunks, nheads_per_group, heads_per_split, hdim, dstate,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,   # dt_hat, dA_cs, ddt, ddA_cs
    stride_pv_b, stride_pv_c, stride_pv_h, stride_pv_p, stride_pv_n,   # prev, dprev
    stride_dx_b, stride_dx_l, stride_dx_h, stride_dx_p,
    stride_dB_s, stride_dB_b, stride_dB_l, stride_dB_g, stride_dB_n,   # dB, dC
    stride_dD_b, stride_dD_c, stride_dD_h,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_PREV: tl.constexpr, DOT_PREC: tl.constexpr,
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
    n_mask = offs_n < dstate
    qn_mask = q_mask[:, None] & n_mask[None, :]

    Cm = tl.load(C_ptr + pid_b * stride_C_b + l_idx[:, None] * stride_C_l + pid_g * stride_C_g
                 + offs_n[None, :] * stride_C_n, mask=qn_mask, other=0.0).to(tl.float32)
    Bm = tl.load(B_ptr + pid_b * stride_B_b + l_idx[:, None] * stride_B_l + pid_g * stride_B_g
                 + offs_n[None, :] * stride_B_n, mask=qn_mask, other=0.0).to(tl.float32)
    cb = tl.dot(Cm, tl.trans(Bm), input_precision=DOT_PREC)              # [Q, Q], once per group
    causal = offs_q[:, None] >= offs_q[None, :]
    dB_acc = tl.zeros((CHUNK, BLOCK_S), dtype=tl.float32)
    dC_acc = tl.zeros((CHUNK, BLOCK_S), dtype=tl.float32)

    for i in range(heads_per_split):
        h = pid_g * nheads_per_group + pid_s * heads_per_split + i
        dt_base = pid_b * stride_dt_b + h * stride_dt_h + pid_c * stride_dt_c
        dt_hat = tl.load(dt_ptr + dt_base + offs_q * stride_dt_q)
        dA_cs = tl.load(dA_cs_ptr + dt_base + offs_q * stride_dt_q)
        D = tl.load(D_ptr + h).to(tl.float32)
        decay = tl.exp(tl.where(causal, dA_cs[:, None] - dA_cs[None, :], float("-inf")))
        k = cb * decay                                                    # [Q, Q]
        exp_cs = tl.exp(dA_cs)
        dk = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
        dy_off = tl.zeros((CHUNK, BLOCK_S), dtype=tl.float32)
        ddt = tl.zeros((CHUNK,), dtype=tl.float32)
        dD = tl.zeros((CHUNK,), dtype=tl.float32)
        for p0 in range(0, hdim, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < hdim
            qp_mask = q_mask[:, None] & p_mask[None, :]
            pn_mask = p_mask[:, None] & n_mask[None, :]
            x = tl.load(x_ptr + pid_b * stride_x_b + l_idx[:, None] * stride_x_l + h * stride_x_h
                        + offs_p[None, :] * stride_x_p, mask=qp_mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + pid_b * stride_dy_b + l_idx[:, None] * stride_dy_l
                         + h * stride_dy_h + offs_p[None, :] * stride_dy_p,
                         mask=qp_mask, other=0.0).to(tl.float32)
            u = x * dt_hat[:, None]
            dk += tl.dot(dy, tl.trans(u), input_precision=DOT_PREC)
            if HAS_PREV:
                pv_off = (pid_b * stride_pv_b + pid_c * stride_pv_c + h * stride_pv_h
                          + offs_p[:, None] * stride_pv_p + offs_n[None, :] * stride_pv_n)
                prev = tl.load(prev_ptr + pv_off, mask=pn_mask, other=0.0).to(tl.float32)
                dy_off += tl.dot(dy, prev, input_precision=DOT_PREC)
                dprev = tl.dot(tl.trans(dy * exp_cs[:, None]), Cm, input_precision=DOT_PREC)
                tl.store(dprev_ptr + pv_off, dprev, mask=pn_mask)
            du = tl.dot(tl.trans(k), dy, input_precision=DOT_PREC) + D * dy
            ddt += tl.sum(du * x, axis=1)
            dD += tl.sum(dy * u, axis=1)
            tl.store(dx_ptr + pid_b * stride_dx_b + l_idx[:, None] * stride_dx_l + h * stride_dx_h
                     + offs_p[None, :] * stride_dx_p, du * dt_hat[:, None], mask=qp_mask)
        dcb = dk * decay
        dC_acc += tl.dot(dcb, Bm, input_precision=DOT_PREC)
        dB_acc += tl.dot(tl.trans(dcb), Cm, input_precision=DOT_PREC)
        g = dk * k
        ddA = tl.sum(g, axis=1) - tl.sum(g, axis=0)
        if HAS_PREV:
            dy_off = dy_off * exp_cs[:, None]
            dC_acc += dy_off
            ddA += tl.sum(dy_off * Cm, axis=1)
        tl.store(ddA_cs_ptr + dt_base + offs_q * stride_dt_q, ddA)
        tl.store(ddt_ptr + dt_base + offs_q * stride_dt_q, ddt)
        tl.store(dD_part_ptr + pid_b * stride_dD_b + pid_c * stride_dD_c + h * stride_dD_h,
                 tl.sum(dD, axis=0))

    dBC_off = (pid_s * stride_dB_s + pid_b * stride_dB_b + l_idx[:, None] * stride_dB_l
               + pid_g * stride_dB_g + offs_n[None, :] * stride_dB_n)
    tl.store(dB_ptr + dBC_off, dB_acc, mask=qn_mask)
    tl.store(dC_ptr + dBC_off, dC_acc, mask=qn_mask)


def chunk_scan_fwd(x, B, C, dt_hat, dA_cs, prev_states, D):
    """Shapes in the module docstring. Returns y [b, L, H, P] in x's dtype.

    ``prev_states=None`` means no state is carried in (a one-chunk sequence).
    """
    bsz, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    _, _, nchunks, chunk_size = dt_hat.shape
    assert same_layout(dt_hat, dA_cs) and C.shape == B.shape
    has_prev = prev_states is not None
    y = empty(bsz, seqlen, nheads, hdim, device=x.device, dtype=x.dtype)
    BLOCK_P = min(64, max(16, triton.next_power_of_2(hdim)))
    grid = (bsz * nchunks, nheads, triton.cdiv(hdim, BLOCK_P))
    _chunk_scan_fwd_kernel[grid](
        x, B, C, dt_hat, dA_cs, prev_states if has_prev else dt_hat, D, y,
        seqlen, nchunks, nheads // ngroups, hdim, dstate,
        *x.stride(), *B.stride(), *C.stride(), *dt_hat.stride(),
        *(prev_states.stride() if has_prev else (0,) * 5),
        *y.stride(),
        CHUNK=chunk_size, BLOCK_P=BLOCK_P, BLOCK_S=block_s(dstate), HAS_PREV=has_prev,
        DOT_PREC=dot_precision(x.dtype), num_warps=4 if chunk_size <= 64 else 8,
    )
    return y


def chunk_scan_bwd(dy, x, B, C, dt_hat, dA_cs, prev_states, D, *, nsplit: int = 1):
    """Backward of :func:`chunk_scan_fwd` given dy [b, L, H, P].

    Returns ``(dx, dB_split, dC_split, ddt_hat, ddA_cs, dprev, dD)``: dx [b, L, H, P]
    (x's dtype); dB_split, dC_split fp32 [nsplit, b, L, G, S] (sum over dim 0);
    ddt_hat, ddA_cs fp32 [b, H, c, Q]; dprev fp32 [b, c, H, P, S] (None without
    prev_states); dD [H] (D's dtype). ``nsplit`` divides H/G: how many programs share
    a group's heads.
    """
    bsz, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    _, _, nchunks, chunk_size = dt_hat.shape
    heads_per_group = nheads // ngroups
    assert heads_per_group % nsplit == 0 and same_layout(dt_hat, dA_cs)
    dev = x.device
    dx = empty(bsz, seqlen, nheads, hdim, device=dev, dtype=x.dtype)
    dB = empty(nsplit, bsz, seqlen, ngroups, dstate, device=dev)
    dC = empty(nsplit, bsz, seqlen, ngroups, dstate, device=dev)
    ddt = empty(bsz, nheads, nchunks, chunk_size, device=dev)
    ddA = empty(bsz, nheads, nchunks, chunk_size, device=dev)
    dD_part = empty(bsz, nchunks, nheads, device=dev)
    has_prev = prev_states is not None
    if has_prev:
        dprev = empty(bsz, nchunks, nheads, hdim, dstate, device=dev)
        assert same_layout(prev_states, dprev)
    assert same_layout(dt_hat, ddt)
    grid = (bsz * nchunks, ngroups * nsplit)
    _chunk_scan_bwd_kernel[grid](
        dy, x, B, C, dt_hat, dA_cs, prev_states if has_prev else dt_hat, D,
        dx, dB, dC, ddt, ddA, dprev if has_prev else ddt, dD_part,
        seqlen, nchunks, heads_per_group, heads_per_group // nsplit, hdim, dstate,
        *dy.stride(), *x.stride(), *B.stride(), *C.stride(), *dt_hat.stride(),
        *(prev_states.stride() if has_prev else (0,) * 5), *dx.stride(), *dB.stride(),
        *dD_part.stride(),
        CHUNK=chunk_size, BLOCK_P=min(32, max(16, triton.next_power_of_2(hdim))),
        BLOCK_S=block_s(dstate), HAS_PREV=has_prev, DOT_PREC=dot_precision(x.dtype),
        num_warps=8,
    )
    return dx, dB, dC, ddt, ddA, dprev if has_prev else None, dD_part.sum(dim=(0, 1)).to(D.dtype)
