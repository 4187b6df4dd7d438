"""The chunked SSD scan in Triton: the four stages chained, one autograd entry point.

Reference twins: :func:`mmm4rec.kernels.ssd_ref.ssd_chunked_ref` (same algorithm, in
PyTorch) and :func:`~mmm4rec.kernels.ssd_ref.ssd_quadratic_ref` (the dual form).

Forward (4 launches)                       Backward (4 launches + 2 tiny reductions)
  1 chunk_cumsum   dt -> dt_hat, dA_cs       recompute stages 2-3 (states are not saved)
  2 chunk_state    x, B -> states            4' chunk_scan_bwd    dy -> dx, dB, dC, ddt_hat,
  3 state_passing  states -> prev_states                             ddA_cs, dD, dprev
  4 chunk_scan     x, B, C, prev -> y        3' state_passing_bwd dprev -> dstates, ddA_end
                                             2' chunk_state_bwd   dstates -> += dx, dB,
                                                                      ddt_hat, ddA_cs
                                             1' chunk_cumsum_bwd  -> ddt, dA, ddt_bias

A sequence that fits in one chunk (recommendation windows up to 64) carries no state:
stages 2-3 and 3'-2' are skipped and stage 4 runs without the carried-in term.
"""
from __future__ import annotations

import torch
import triton

from ._common import UnsupportedShapeError, check_device, num_sms
from .ssd_chunk_cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from .ssd_chunk_scan import chunk_scan_bwd, chunk_scan_fwd
from .ssd_chunk_state import block_s, chunk_state_bwd, chunk_state_fwd
from .ssd_ref import ssd_chunked_ref  # the twin
from .ssd_state_passing import state_passing_bwd, state_passing_fwd

__all__ = [
    "MAX_DSTATE",
    "SSDChunkedFn",
    "kernel_chunk_size",
    "ssd_chunked_ref",
    "ssd_chunked_triton",
]

MAX_DSTATE = 256
_MIN_CHUNK, _MAX_CHUNK = 16, 64    # tl.dot needs >= 16; the backward holds ~5 [Q, Q] fp32 tiles
_MAX_TILE = 64 * 64                # Q * BLOCK_S elements per [Q, S] tile (registers; A100 smem)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def kernel_chunk_size(chunk_size: int, seqlen: int, dstate: int) -> int:
    """The chunk length the kernels run with for a requested ``chunk_size``.

    The result does not depend on the chunk length (every chunking computes the same
    function), so the kernels are free to pick it: the largest power of two in
    [16, 64] not above ``chunk_size``, shrunk to what ``seqlen`` needs (L=20 runs one
    32-chunk, not a 64-chunk that is 70% padding) and to the register budget for S.
    """
    q = _MIN_CHUNK
    while q * 2 <= min(chunk_size, _MAX_CHUNK):
        q *= 2
    q = min(q, max(_MIN_CHUNK, triton.next_power_of_2(seqlen)))
    while q > _MIN_CHUNK and q * block_s(dstate) > _MAX_TILE:
        q //= 2
    return q


def _pick_nsplit(bsz: int, nchunks: int, ngroups: int, heads_per_group: int, device) -> int:
    """Programs sharing one group's heads in the backward: enough to fill the device."""
    target = 2 * num_sms(device)
    progs = bsz * nchunks * ngroups
    for d in range(1, heads_per_group + 1):
        if heads_per_group % d == 0 and progs * d >= target:
            return d
    return heads_per_group


def _check(x, dt, A, B, C, D, dt_bias):
    if x.dim() != 4 or dt.dim() != 3 or B.dim() != 4 or C.shape != B.shape:
        raise ValueError(f"ssd: bad ranks/shapes x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}")
    bsz, seqlen, nheads, _ = x.shape
    if dt.shape != (bsz, seqlen, nheads) or B.shape[:2] != (bsz, seqlen):
        raise ValueError(f"ssd: x {tuple(x.shape)}, dt {tuple(dt.shape)}, B {tuple(B.shape)} disagree")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t.shape != (nheads,):
            raise ValueError(f"ssd: {name} must be [{nheads}], got {tuple(t.shape)}")
    if nheads % B.shape[2]:
        raise ValueError(f"ssd: heads ({nheads}) must be a multiple of groups ({B.shape[2]})")
    if seqlen == 0:
        raise UnsupportedShapeError("ssd: empty sequence")
    if B.shape[3] > MAX_DSTATE:
        raise UnsupportedShapeError(f"ssd: state size {B.shape[3]} > {MAX_DSTATE}")
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("dt_bias", dt_bias)):
        if t.dtype not in _FLOATS:
            raise UnsupportedShapeError(f"ssd: {name} has dtype {t.dtype} (kernels: fp16/bf16/fp32)")
    check_device(x, dt, A, B, C, D, dt_bias, what="ssd")


def _state_dtype(C: torch.Tensor) -> torch.dtype:
    # 16-bit runs keep the carried-in states in 16 bits (half the stage-4 traffic);
    # the recurrence itself always runs in fp32 registers.
    return C.dtype if C.dtype in (torch.float16, torch.bfloat16) else torch.float32


def _prev_states(x, B, C, dt_hat, dA_cs):
    """Stages 2-3: the state entering each chunk; None for a one-chunk sequence, which
    carries nothing in (recommendation windows of L <= 64 skip both stages entirely)."""
    if dt_hat.shape[2] == 1:
        return None
    states = chunk_state_fwd(x, B, dt_hat, dA_cs)
    return state_passing_fwd(states, dA_cs, out_dtype=_state_dtype(C))


class SSDChunkedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, chunk_size):
        Q = kernel_chunk_size(chunk_size, x.shape[1], B.shape[3])
        dt_hat, dA_cs = chunk_cumsum_fwd(dt, A, dt_bias, Q)
        prev = _prev_states(x, B, C, dt_hat, dA_cs)
        y = chunk_scan_fwd(x, B, C, dt_hat, dA_cs, prev, D)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, dt_hat, dA_cs)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, A, B, C, D, dt_bias, dt_hat, dA_cs = ctx.saved_tensors
        bsz, nheads, nchunks, _ = dt_hat.shape
        ngroups = B.shape[2]
        # recompute the states instead of keeping [b, c, H, P, S] alive between passes
        prev = _prev_states(x, B, C, dt_hat, dA_cs)
        nsplit = _pick_nsplit(bsz, nchunks, ngroups, nheads // ngroups, x.device)
        dx, dB, dC, ddt_hat, ddA_cs, dprev, dD = chunk_scan_bwd(
            dy, x, B, C, dt_hat, dA_cs, prev, D, nsplit=nsplit)
        if prev is not None:
            dstates, ddA_end = state_passing_bwd(dprev, prev, dA_cs)
            del dprev, prev
            chunk_state_bwd(x, B, dt_hat, dA_cs, dstates, ddA_end, nsplit=nsplit,
                            out=(dx, dB, ddt_hat, ddA_cs))
        ddt, dA, ddt_bias = chunk_cumsum_bwd(ddA_cs, ddt_hat, dt_hat, dt, A, dt_bias)
        dB = (dB[0] if nsplit == 1 else dB.sum(0)).to(B.dtype)
        dC = (dC[0] if nsplit == 1 else dC.sum(0)).to(C.dtype)
        return dx, ddt, dA, dB, dC, dD, ddt_bias, None


def ssd_chunked_triton(x, dt, A, B, C, D, dt_bias, chunk_size: int = 64):
    """Time-aware SSD (Mamba-2 chunked scan, dt-scaled skip) in Triton, differentiable.

    Shapes (b batch, L length, any L >= 1; H heads; P head dim; G groups, H % G == 0;
    S state size <= 256):

        x        [b, L, H, P]   scan input, NOT dt-scaled         fp32 / fp16 / bf16
        dt       [b, L, H]      step size BEFORE softplus
        A        [H]            decay rate (negative)
        B, C     [b, L, G, S]   input / output projections, group g serves heads
                                g*H/G .. (g+1)*H/G - 1
        D        [H]            skip weight, multiplies the dt-scaled input
        dt_bias  [H]            added inside the softplus
        chunk_size              upper bound on the chunk length (see kernel_chunk_size)
        returns y [b, L, H, P]  x's dtype

    With dt_hat = softplus(dt + dt_bias) and u = dt_hat * x:
        y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{k=s+1..t} dt_hat_k) u_s + D u_t.

    Gradients flow to all of x, dt, A, B, C, D, dt_bias. Inputs may be strided views
    (no copies are made). Compute is fp32 throughout (fp32 accumulators, fp32
    dt_hat / dA_cumsum / states); ``tl.dot`` runs IEEE fp32 for fp32 inputs unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set, and TF32 for 16-bit inputs.
    Raises :class:`UnsupportedShapeError` (before any launch) outside these limits;
    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    _check(x, dt, A, B, C, D, dt_bias)
    return SSDChunkedFn.apply(x, dt, A, B, C, D, dt_bias, int(chunk_size))
