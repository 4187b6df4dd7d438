"""The dual-channel Fourier adaptive filter as one fused Triton kernel, forward and backward.

Reference twin: :func:`mmm4rec.kernels.fourier_ref.fourier_filter_ref` (torch.fft).

Shapes (b batch, H heads, L window length <= 512, F = L // 2 + 1 bins, R = b * H rows):

    d_t, d_v     [b, H, L]    time signals (any strides), fp32 / fp16 / bf16
    cl_a/b/c     (W_r [F, F], b_r [F], W_i [F, F], b_i [F]) complex linear maps
    returns d_f  [b, H, L]    d_t's dtype

    F_v = rfft(d_v), F_t = rfft(d_t)                      (ortho)
    d_f = irfft(CL_c(CL_a(F_v) * F_v + CL_b(F_t) * F_t), n=L)  (ortho)

Design. At these window lengths a DFT is cheapest as a small matrix product, so the
whole filter becomes a chain of row-tile GEMMs over the R independent rows, with the
non-linear (adaptive) products in between. ``rfft`` is x @ [cos | -sin] / sqrt(L) and
``irfft`` is X_r @ (c_k cos) + X_i @ (-c_k sin) / sqrt(L) with c_0 = c_{L/2} = 1
(bin 0 and, for even L, the Nyquist bin: their imaginary parts are dropped, exactly
as torch.fft.irfft does) and c_k = 2 otherwise. The four real DFT matrices are built
once per (L, device) in float64 and cached as fp32 [4, F, L].

One program owns BLOCK_M rows and runs four phases; each phase loops over BLOCK_N
output columns and BLOCK_K reduction steps (complex products are 4 real ``tl.dot``):

  fwd  1  F_v, F_t   = rfft(d_v), rfft(d_t)                  [M, L] x [L, F]
       2  K_v, K_t   = CL_a(F_v), CL_b(F_t);  S = K_v F_v + K_t F_t  (epilogue)
       3  O          = CL_c(S)                               [M, F] x [F, F]
       4  d_f        = irfft(O)                              [M, F] x [F, L]
  bwd  1  dO         = irfft^T(g)
       2  dS         = CL_c^H(dO);  dK_v = dS conj(F_v), dF_v = dS conj(K_v), same for t
       3  dF_v      += CL_a^H(dK_v),  dF_t += CL_b^H(dK_t)
       4  dd_v, dd_t = rfft^T(dF_v), rfft^T(dF_t)

A phase contracts over the full F axis of the previous phase's output, so the
intermediates go through a per-row fp32 workspace in global memory (a few KB per
row, L2-resident while the program runs; ``tl.debug_barrier`` orders the phases).
The forward workspace doubles as the saved activations (F_v, F_t, S, K_v, K_t), so
the backward recomputes nothing. The weight gradients are a reduction over all R
rows, a different parallelisation: a second kernel computes, per CL and per
[BLOCK_F, BLOCK_F] tile, dW = dZ^T Z as a complex GEMM over row blocks (split over
row ranges for occupancy; no atomics, deterministic), and the bias gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import UnsupportedShapeError, check_device, dot_precision, empty, num_sms
from .fourier_ref import dft_matrices, fourier_filter_ref  # the twin; the DFT matrices are shared

__all__ = [
    "MAX_LEN",
    "FourierFilterFn",
    "dft_matrices",
    "fourier_filter_ref",
    "fourier_filter_triton",
]

MAX_LEN = 512
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# workspace slots (fp32 [R, slots, F]); the weight-gradient kernel relies on CL i
# pairing primal slots (2i, 2i+1) of WS with cotangent slots (2i, 2i+1) of WS2.
_FV, _FT, _S, _KV, _KT, _O = (tl.constexpr(i) for i in (0, 2, 4, 6, 8, 10))  # real n, imag n+1
_WS_SLOTS = 12
_DKV, _DKT, _DO, _DFV, _DFT = (tl.constexpr(i) for i in (0, 2, 4, 6, 8))       # backward
_WS2_SLOTS = 10


@triton.jit
def _cgemm(zr_row, zi_row, stride_zk, m_mask, K,
           wr_ptr, wi_ptr, stride_wk, stride_wn, offs_n, n_mask,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           REAL_IN: tl.constexpr, REAL_OUT: tl.constexpr, CONJ: tl.constexpr,
           PREC: tl.constexpr):
    """(z_r + i z_i) @ (W_r + i W_i) for one [BLOCK_M, BLOCK_N] output tile.

    z rows start at the pointers ``zr_row`` / ``zi_row`` [BLOCK_M] (stride_zk along K);
    W element (k, n) sits at ``w_ptr + k * stride_wk + n * stride_wn``. CONJ uses
    conj(W); REAL_IN assumes z_i = 0; REAL_OUT skips the imaginary part.
    """
    acc_r = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        z_mask = m_mask[:, None] & k_mask[None, :]
        w_off = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        w_mask = k_mask[:, None] & n_mask[None, :]
        zr = tl.load(zr_row[:, None] + offs_k[None, :] * stride_zk, mask=z_mask, other=0.0)
        zr = zr.to(tl.float32)
        wr = tl.load(wr_ptr + w_off, mask=w_mask, other=0.0)
        wi = tl.load(wi_ptr + w_off, mask=w_mask, other=0.0)
        if CONJ:
            wi = -wi
        acc_r += tl.dot(zr, wr, input_precision=PREC)
        if not REAL_OUT:
            acc_i += tl.dot(zr, wi, input_precision=PREC)
        if not REAL_IN:
            zi = tl.load(zi_row[:, None] + offs_k[None, :] * stride_zk, mask=z_mask, other=0.0)
            acc_r -= tl.dot(zi, wi, input_precision=PREC)
            if not REAL_OUT:
                acc_i += tl.dot(zi, wr, input_precision=PREC)
    return acc_r, acc_i


@triton.jit
def _fourier_fwd_kernel(
    dt_ptr, dv_ptr, dft_ptr, w_ptr, bias_ptr, ws_ptr, out_ptr,
    nrows, nheads, L, F,
    stride_dt_b, stride_dt_h, stride_dt_l,
    stride_dv_b, stride_dv_h, stride_dv_l,
    stride_out_b, stride_out_h, stride_out_l,
    stride_ws_r, stride_ws_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < nrows
    b_idx = offs_m // nheads
    h_idx = offs_m % nheads
    dv_row = dv_ptr + b_idx * stride_dv_b + h_idx * stride_dv_h
    dt_row = dt_ptr + b_idx * stride_dt_b + h_idx * stride_dt_h
    ws_row = ws_ptr + offs_m * stride_ws_r
    FL = F * L
    FF = F * F

    # 1: spectra. DFT matrix [F, L]: element (k_in = time n, n_out = bin k) at k * L + n
    for n0 in range(0, F, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < F
        mn_mask = m_mask[:, None] & n_mask[None, :]
        vr, vi = _cgemm(dv_row, dv_row, stride_dv_l, m_mask, L, dft_ptr, dft_ptr + FL, 1, L,
                        offs_n, n_mask, BLOCK_M, BLOCK_N, BLOCK_K, True, False, False, PREC)
        tr, ti = _cgemm(dt_row, dt_row, stride_dt_l, m_mask, L, dft_ptr, dft_ptr + FL, 1, L,
                        offs_n, n_mask, BLOCK_M, BLOCK_N, BLOCK_K, True, False, False, PREC)
        tile = ws_row[:, None] + offs_n[None, :]
        tl.store(tile + _FV * stride_ws_s, vr, mask=mn_mask)
        tl.store(tile + (_FV + 1) * stride_ws_s, vi, mask=mn_mask)
        tl.store(tile + _FT * stride_ws_s, tr, mask=mn_mask)
        tl.store(tile + (_FT + 1) * stride_ws_s, ti, mask=mn_mask)
    tl.debug_barrier()

    # 2: adaptive kernels K = CL(F) (W [F_out, F_in]: element (k_in, n_out) at n * F + k)
    #    and S = K_v F_v + K_t F_t
    for n0 in range(0, F, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < F
        mn_mask = m_mask[:, None] & n_mask[None, :]
        kvr, kvi = _cgemm(ws_row + _FV * stride_ws_s, ws_row + (_FV + 1) * stride_ws_s, 1,
                          m_mask, F, w_ptr, w_ptr + FF, 1, F, offs_n, n_mask,
                          BLOCK_M, BLOCK_N, BLOCK_K, False, False, False, PREC)
        ktr, kti = _cgemm(ws_row + _FT * stride_ws_s, ws_row + (_FT + 1) * stride_ws_s, 1,
                          m_mask, F, w_ptr + 2 * FF, w_ptr + 3 * FF, 1, F, offs_n, n_mask,
                          BLOCK_M, BLOCK_N, BLOCK_K, False, False, False, PREC)
        kvr += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        kvi += tl.load(bias_ptr + F + offs_n, mask=n_mask, other=0.0)[None, :]
        ktr += tl.load(bias_ptr + 2 * F + offs_n, mask=n_mask, other=0.0)[None, :]
        kti += tl.load(bias_ptr + 3 * F + offs_n, mask=n_mask, other=0.0)[None, :]
        tile = ws_row[:, None] + offs_n[None, :]
        vr = tl.load(tile + _FV * stride_ws_s, mask=mn_mask, other=0.0)
        vi = tl.load(tile + (_FV + 1) * stride_ws_s, mask=mn_mask, other=0.0)
        tr = tl.load(tile + _FT * stride_ws_s, mask=mn_mask, other=0.0)
        ti = tl.load(tile + (_FT + 1) * stride_ws_s, mask=mn_mask, other=0.0)
        tl.store(tile + _S * stride_ws_s, kvr * vr - kvi * vi + ktr * tr - kti * ti, mask=mn_mask)
        tl.store(tile + (_S + 1) * stride_ws_s, kvr * vi + kvi * vr + ktr * ti + kti * tr,
                 mask=mn_mask)
        tl.store(tile + _KV * stride_ws_s, kvr, mask=mn_mask)
        tl.store(tile + (_KV + 1) * stride_ws_s, kvi, mask=mn_mask)
        tl.store(tile + _KT * stride_ws_s, ktr, mask=mn_mask)
        tl.store(tile + (_KT + 1) * stride_ws_s, kti, mask=mn_mask)
    tl.debug_barrier()

    # 3: O = CL_c(S)
    for n0 in range(0, F, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < F
        mn_mask = m_mask[:, None] & n_mask[None, :]
        o_r, o_i = _cgemm(ws_row + _S * stride_ws_s, ws_row + (_S + 1) * stride_ws_s, 1,
                          m_mask, F, w_ptr + 4 * FF, w_ptr + 5 * FF, 1, F, offs_n, n_mask,
                          BLOCK_M, BLOCK_N, BLOCK_K, False, False, False, PREC)
        o_r += tl.load(bias_ptr + 4 * F + offs_n, mask=n_mask, other=0.0)[None, :]
        o_i += tl.load(bias_ptr + 5 * F + offs_n, mask=n_mask, other=0.0)[None, :]
        tile = ws_row[:, None] + offs_n[None, :]
        tl.store(tile + _O * stride_ws_s, o_r, mask=mn_mask)
        tl.store(tile + (_O + 1) * stride_ws_s, o_i, mask=mn_mask)
    tl.debug_barrier()

    # 4: d_f = irfft(O) = O_r @ M2 + O_i @ M3 (M2/M3 [F, L]: element (k, n) at k * L + n)
    out_row = out_ptr + b_idx * stride_out_b + h_idx * stride_out_h
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        y, _ = _cgemm(ws_row + _O * stride_ws_s, ws_row + (_O + 1) * stride_ws_s, 1, m_mask, F,
                      dft_ptr + 2 * FL, dft_ptr + 3 * FL, L, 1, offs_n, n_mask,
                      BLOCK_M, BLOCK_N, BLOCK_K, False, True, True, PREC)
        tl.store(out_row[:, None] + offs_n[None, :] * stride_out_l, y,
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _fourier_bwd_kernel(
    g_ptr, dft_ptr, w_ptr, ws_ptr, ws2_ptr, ddt_ptr, ddv_ptr,
    nrows, nheads, L, F,
    stride_g_b, stride_g_h, stride_g_l,
    stride_dd_b, stride_dd_h, stride_dd_l,          # ddt, ddv (same layout)
    stride_ws_r, stride_ws_s, stride_ws2_r, stride_ws2_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < nrows
    b_idx = offs_m // nheads
    h_idx = offs_m % nheads
    g_row = g_ptr + b_idx * stride_g_b + h_idx * stride_g_h
    ws_row = ws_ptr + offs_m * stride_ws_r
    ws2_row = ws2_ptr + offs_m * stride_ws2_r
    FL = F * L
    FF = F * F

    # 1: dO = irfft^T(g): dO_r = g M2^T, dO_i = g M3^T (element (k_in = n, n_out = k) at k*L + n)
    for n0 in range(0, F, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < F
        mn_mask = m_mask[:, None] & n_mask[None, :]
        do_r, do_i = _cgemm(g_row, g_row, stride_g_l, m_mask, L,
                            dft_ptr + 2 * FL, dft_ptr + 3 * FL, 1, L, offs_n, n_mask,
                            BLOCK_M, BLOCK_N, BLOCK_K, True, False, False, PREC)
        tile = ws2_row[:, None] + offs_n[None, :]
        tl.store(tile + _DO * stride_ws2_s, do_r, mask=mn_mask)
        tl.store(tile + (_DO + 1) * stride_ws2_s, do_i, mask=mn_mask)
    tl.debug_barrier()

    # 2: dS = CL_c^H(dO) = dO @ conj(W_c) (element (k_in = j, n_out = k) at j * F + k);
    #    through the products: dK = dS conj(F), dF (direct) = dS conj(K)
    for n0 in range(0, F, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < F
        mn_mask = m_mask[:, None] & n_mask[None, :]
        ds_r, ds_i = _cgemm(ws2_row + _DO * stride_ws2_s, ws2_row + (_DO + 1) * stride_ws2_s, 1,
                            m_mask, F, w_ptr + 4 * FF, w_ptr + 5 * FF, F, 1, offs_n, n_mask,
                            BLOCK_M, BLOCK_N, BLOCK_K, False, False, True, PREC)
        tile = ws_row[:, None] + offs_n[None, :]
        vr = tl.load(tile + _FV * stride_ws_s, mask=mn_mask, other=0.0)
        vi = tl.load(tile + (_FV + 1) * stride_ws_s, mask=mn_mask, other=0.0)
        tr = tl.load(tile + _FT * stride_ws_s, mask=mn_mask, other=0.0)
        ti = tl.load(tile + (_FT + 1) * stride_ws_s, mask=mn_mask, other=0.0)
        kvr = tl.load(tile + _KV * stride_ws_s, mask=mn_mask, other=0.0)
        kvi = tl.load(tile + (_KV + 1) * stride_ws_s, mask=mn_mask, other=0.0)
        ktr = tl.load(tile + _KT * stride_ws_s, mask=mn_mask, other=0.0)
        kti = tl.load(tile + (_KT + 1) * stride_ws_s, mask=mn_mask, other=0.0)
        tile2 = ws2_row[:, None] + offs_n[None, :]
        tl.store(tile2 + _DKV * stride_ws2_s, ds_r * vr + ds_i * vi, mask=mn_mask)
        tl.store(tile2 + (_DKV + 1) * stride_ws2_s, ds_i * vr - ds_r * vi, mask=mn_mask)
        tl.store(tile2 + _DKT * stride_ws2_s, ds_r * tr + ds_i * ti, mask=mn_mask)
        tl.store(tile2 + (_DKT + 1) * stride_ws2_s, ds_i * tr - ds_r * ti, mask=mn_mask)
        tl.store(tile2 + _DFV * stride_ws2_s, ds_r * kvr + ds_i * kvi, mask=mn_mask)
        tl.store(tile2 + (_DFV + 1) * stride_ws2_s, ds_i * kvr - ds_r * kvi, mask=mn_mask)
        tl.store(tile2 + _DFT * stride_ws2_s, ds_r * ktr + ds_i * kti, mask=mn_mask)
        tl.store(tile2 + (_DFT + 1) * stride_ws2_s, ds_i * ktr - ds_r * kti, mask=mn_mask)
    tl.debug_barrier()

    # 3: dF += CL^H(dK) for both channels
    for n0 in range(0, F, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < F
        mn_mask = m_mask[:, None] & n_mask[None, :]
        av_r, av_i = _cgemm(ws2_row + _DKV * stride_ws2_s, ws2_row + (_DKV + 1) * stride_ws2_s, 1,
                            m_mask, F, w_ptr, w_ptr + FF, F, 1, offs_n, n_mask,
                            BLOCK_M, BLOCK_N, BLOCK_K, False, False, True, PREC)
        at_r, at_i = _cgemm(ws2_row + _DKT * stride_ws2_s, ws2_row + (_DKT + 1) * stride_ws2_s, 1,
                            m_mask, F, w_ptr + 2 * FF, w_ptr + 3 * FF, F, 1, offs_n, n_mask,
                            BLOCK_M, BLOCK_N, BLOCK_K, False, False, True, PREC)
        tile2 = ws2_row[:, None] + offs_n[None, :]
        av_r += tl.load(tile2 + _DFV * stride_ws2_s, mask=mn_mask, other=0.0)
        av_i += tl.load(tile2 + (_DFV + 1) * stride_ws2_s, mask=mn_mask, other=0.0)
        at_r += tl.load(tile2 + _DFT * stride_ws2_s, mask=mn_mask, other=0.0)
        at_i += tl.load(tile2 + (_DFT + 1) * stride_ws2_s, mask=mn_mask, other=0.0)
        tl.store(tile2 + _DFV * stride_ws2_s, av_r, mask=mn_mask)
        tl.store(tile2 + (_DFV + 1) * stride_ws2_s, av_i, mask=mn_mask)
        tl.store(tile2 + _DFT * stride_ws2_s, at_r, mask=mn_mask)
        tl.store(tile2 + (_DFT + 1) * stride_ws2_s, at_i, mask=mn_mask)
    tl.debug_barrier()

    # 4: dd = rfft^T(dF) = dF_r @ M0 + dF_i @ M1 (element (k_in = bin k, n_out = n) at k*L + n)
    ddv_row = ddv_ptr + b_idx * stride_dd_b + h_idx * stride_dd_h
    ddt_row = ddt_ptr + b_idx * stride_dd_b + h_idx * stride_dd_h
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        mn_mask = m_mask[:, None] & n_mask[None, :]
        gv, _ = _cgemm(ws2_row + _DFV * stride_ws2_s, ws2_row + (_DFV + 1) * stride_ws2_s, 1,
                       m_mask, F, dft_ptr, dft_ptr + FL, L, 1, offs_n, n_mask,
                       BLOCK_M, BLOCK_N, BLOCK_K, False, True, True, PREC)
        gt, _ = _cgemm(ws2_row + _DFT * stride_ws2_s, ws2_row + (_DFT + 1) * stride_ws2_s, 1,
                       m_mask, F, dft_ptr, dft_ptr + FL, L, 1, offs_n, n_mask,
                       BLOCK_M, BLOCK_N, BLOCK_K, False, True, True, PREC)
        tl.store(ddv_row[:, None] + offs_n[None, :] * stride_dd_l, gv, mask=mn_mask)
        tl.store(ddt_row[:, None] + offs_n[None, :] * stride_dd_l, gt, mask=mn_mask)


@triton.jit
def _fourier_wgrad_kernel(
    ws_ptr, ws2_ptr, dw_ptr, db_ptr,
    nrows, F, rows_per_split,
    stride_ws_r, stride_ws_s, stride_ws2_r, stride_ws2_s,
    stride_dw_split, stride_dw_s, stride_dw_j,       # dw fp32 [split, 6, F, F]
    stride_db_split, stride_db_s,                    # db fp32 [split, 6, F]
    BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
):
    """dW_r = dRe^T Z_r + dIm^T Z_i, dW_i = dIm^T Z_r - dRe^T Z_i, db_r = sum(dRe + dIm),
    db_i = sum(dIm - dRe) for CL i (Z, dZ = WS, WS2 slots 2i, 2i+1), over one row range."""
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_cs = tl.program_id(2)
    cl = pid_cs % 3
    split = pid_cs // 3
    offs_j = pid_j * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = pid_k * BLOCK_F + tl.arange(0, BLOCK_F)
    j_mask = offs_j < F
    k_mask = offs_k < F
    acc_r = tl.zeros((BLOCK_F, BLOCK_F), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_F, BLOCK_F), dtype=tl.float32)
    sum_r = tl.zeros((BLOCK_F,), dtype=tl.float32)
    sum_i = tl.zeros((BLOCK_F,), dtype=tl.float32)
    r_start = split * rows_per_split
    r_end = tl.minimum(nrows, r_start + rows_per_split)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < r_end
        d_off = offs_r[:, None] * stride_ws2_r + (2 * cl) * stride_ws2_s + offs_j[None, :]
        z_off = offs_r[:, None] * stride_ws_r + (2 * cl) * stride_ws_s + offs_k[None, :]
        dj_mask = r_mask[:, None] & j_mask[None, :]
        zk_mask = r_mask[:, None] & k_mask[None, :]
        d_re = tl.load(ws2_ptr + d_off, mask=dj_mask, other=0.0)
        d_im = tl.load(ws2_ptr + d_off + stride_ws2_s, mask=dj_mask, other=0.0)
        z_re = tl.load(ws_ptr + z_off, mask=zk_mask, other=0.0)
        z_im = tl.load(ws_ptr + z_off + stride_ws_s, mask=zk_mask, other=0.0)
        d_re_t = tl.trans(d_re)
        d_im_t = tl.trans(d_im)
        acc_r += tl.dot(d_re_t, z_re, input_precision=PREC)
        acc_r += tl.dot(d_im_t, z_im, input_precision=PREC)
        acc_i += tl.dot(d_im_t, z_re, input_precision=PREC)
        acc_i -= tl.dot(d_re_t, z_im, input_precision=PREC)
        sum_r += tl.sum(d_re, axis=0)
        sum_i += tl.sum(d_im, axis=0)
    dw = dw_ptr + split * stride_dw_split + offs_j[:, None] * stride_dw_j + offs_k[None, :]
    jk_mask = j_mask[:, None] & k_mask[None, :]
    tl.store(dw + (2 * cl) * stride_dw_s, acc_r, mask=jk_mask)
    tl.store(dw + (2 * cl + 1) * stride_dw_s, acc_i, mask=jk_mask)
    db = db_ptr + split * stride_db_split + offs_j
    b_mask = j_mask & (pid_k == 0)
    tl.store(db + (2 * cl) * stride_db_s, sum_r + sum_i, mask=b_mask)
    tl.store(db + (2 * cl + 1) * stride_db_s, sum_i - sum_r, mask=b_mask)


_BLOCK_M, _BLOCK_N, _BLOCK_K = 32, 32, 32
_BLOCK_F, _BLOCK_R = 32, 32


def _pick_wgrad_split(nrows: int, F: int, device) -> int:
    progs = 3 * triton.cdiv(F, _BLOCK_F) ** 2
    want = triton.cdiv(2 * num_sms(device), progs)
    return max(1, min(want, triton.cdiv(nrows, 8 * _BLOCK_R)))


class FourierFilterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d_t, d_v, wa_r, ba_r, wa_i, ba_i, wb_r, bb_r, wb_i, bb_i,
                wc_r, bc_r, wc_i, bc_i):
        bsz, nheads, L = d_t.shape
        F = L // 2 + 1
        nrows = bsz * nheads
        dev = d_t.device
        w = torch.stack([wa_r, wa_i, wb_r, wb_i, wc_r, wc_i]).to(torch.float32).contiguous()
        # effective biases of CL(z): real part b_r - b_i, imaginary part b_i + b_r
        bias = torch.stack([ba_r - ba_i, ba_i + ba_r, bb_r - bb_i, bb_i + bb_r,
                            bc_r - bc_i, bc_i + bc_r]).to(torch.float32).contiguous()
        dft = dft_matrices(L, dev)
        ws = empty(nrows, _WS_SLOTS, F, device=dev)
        out = empty(bsz, nheads, L, device=dev, dtype=d_t.dtype)
        prec = dot_precision(d_t.dtype)
        _fourier_fwd_kernel[(triton.cdiv(nrows, _BLOCK_M),)](
            d_t, d_v, dft, w, bias, ws, out,
            nrows, nheads, L, F,
            *d_t.stride(), *d_v.stride(), *out.stride(), ws.stride(0), ws.stride(1),
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, PREC=prec, num_warps=8,
        )
        ctx.save_for_backward(w, ws)
        ctx.meta = (bsz, nheads, L, d_t.dtype, d_v.dtype, prec,
                    [t.dtype for t in (wa_r, ba_r, wa_i, ba_i, wb_r, bb_r, wb_i, bb_i,
                                       wc_r, bc_r, wc_i, bc_i)])
        return out

    @staticmethod
    def backward(ctx, g):
        w, ws = ctx.saved_tensors
        bsz, nheads, L, dt_dtype, dv_dtype, prec, p_dtypes = ctx.meta
        F = L // 2 + 1
        nrows = bsz * nheads
        dev = ws.device
        ws2 = empty(nrows, _WS2_SLOTS, F, device=dev)
        ddt = empty(bsz, nheads, L, device=dev, dtype=dt_dtype)
        ddv = empty(bsz, nheads, L, device=dev, dtype=dv_dtype)
        if ddv.stride() != ddt.stride():
            raise AssertionError("d_t and d_v gradients must share a layout")
        _fourier_bwd_kernel[(triton.cdiv(nrows, _BLOCK_M),)](
            g, dft_matrices(L, dev), w, ws, ws2, ddt, ddv,
            nrows, nheads, L, F,
            *g.stride(), *ddt.stride(), ws.stride(0), ws.stride(1), ws2.stride(0), ws2.stride(1),
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, PREC=prec, num_warps=8,
        )
        split = _pick_wgrad_split(nrows, F, dev)
        rows_per_split = triton.cdiv(triton.cdiv(nrows, split), _BLOCK_R) * _BLOCK_R
        split = triton.cdiv(nrows, rows_per_split)
        dw = empty(split, 6, F, F, device=dev)
        db = empty(split, 6, F, device=dev)
        nf = triton.cdiv(F, _BLOCK_F)
        _fourier_wgrad_kernel[(nf, nf, 3 * split)](
            ws, ws2, dw, db, nrows, F, rows_per_split,
            ws.stride(0), ws.stride(1), ws2.stride(0), ws2.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2), db.stride(0), db.stride(1),
            BLOCK_F=_BLOCK_F, BLOCK_R=_BLOCK_R, PREC=prec, num_warps=4,
        )
        dw = dw[0] if split == 1 else dw.sum(0)
        db = db[0] if split == 1 else db.sum(0)
        grads = []
        for i in range(6):       # (W_r, b_r, W_i, b_i) of a, b, c
            grads += [dw[i].to(p_dtypes[2 * i]), db[i].to(p_dtypes[2 * i + 1])]
        return (ddt, ddv, *grads)


def _check(d_t, d_v, cls):
    if d_t.dim() != 3 or d_t.shape != d_v.shape:
        raise ValueError(f"fourier_filter: d_t {tuple(d_t.shape)} and d_v {tuple(d_v.shape)} "
                         "must both be [b, H, L]")
    L = d_t.shape[-1]
    F = L // 2 + 1
    for name, cl in zip("abc", cls):
        if len(cl) != 4:
            raise ValueError(f"fourier_filter: cl_{name} must be (W_r, b_r, W_i, b_i)")
        w_r, b_r, w_i, b_i = cl
        if w_r.shape != (F, F) or w_i.shape != (F, F) or b_r.shape != (F,) or b_i.shape != (F,):
            raise ValueError(f"fourier_filter: cl_{name} must hold [{F}, {F}] weights and [{F}] "
                             f"biases for L={L}")
    if L < 1 or L > MAX_LEN:
        raise UnsupportedShapeError(f"fourier_filter: window length {L} outside [1, {MAX_LEN}] "
                                    "(beyond it an FFT beats DFT-as-GEMM)")
    tensors = [d_t, d_v, *(t for cl in cls for t in cl)]
    for t in tensors:
        if t.dtype not in _FLOATS:
            raise UnsupportedShapeError(f"fourier_filter: dtype {t.dtype} (kernels: fp16/bf16/fp32)")
    if d_t.dtype != d_v.dtype:
        raise ValueError(f"fourier_filter: d_t is {d_t.dtype} but d_v is {d_v.dtype}")
    check_device(*tensors, what="fourier_filter")


def fourier_filter_triton(d_t, d_v, cl_a, cl_b, cl_c):
    """Fused dual-channel Fourier adaptive filter, differentiable in every input.

    Shapes (b batch, H heads, 1 <= L <= 512, F = L // 2 + 1):

        d_t, d_v         [b, H, L]   time signals (same dtype; fp32 / fp16 / bf16)
        cl_a, cl_b, cl_c             each (W_r [F, F], b_r [F], W_i [F, F], b_i [F]);
                                     CL(z) = (W_r z_r + b_r - W_i z_i - b_i)
                                           + i (W_i z_r + b_i + W_r z_i + b_r)
        returns d_f      [b, H, L]   d_t's dtype

        d_f = irfft(CL_c(CL_a(F_v) * F_v + CL_b(F_t) * F_t), n=L, ortho),
        F_v = rfft(d_v, ortho), F_t = rfft(d_t, ortho)

    fp32 compute (fp32 workspace and accumulators); raises
    :class:`UnsupportedShapeError` before launching outside these limits.
    """
    _check(d_t, d_v, (cl_a, cl_b, cl_c))
    return FourierFilterFn.apply(d_t, d_v, *cl_a, *cl_b, *cl_c)
