"""SSD stage 3: the recurrence over chunks, forward and backward.

Reference twin: :func:`mmm4rec.kernels.ssd_ref.ssd_state_passing_ref` (imported below).

Shapes (b batch, c chunks, H heads, P head dim, S state, Q chunk size):

    states       [b, c, H, P, S]  fp32, from stage 2 (contiguous)
    dA_cumsum    [b, H, c, Q]     fp32, from stage 1 (only [..., Q-1] is read)
    prev_states  [b, c, H, P, S]  the state entering each chunk (fp32, or ``out_dtype``)

    prev[0] = 0,   prev[k+1] = exp(dA_cs[k, Q-1]) * prev[k] + states[k]

One program owns a BLOCK-sized slice of the flattened P*S state of one (batch, head)
and walks the chunks in order, keeping the running state in fp32 registers.

Backward, given dprev (the cotangent of prev_states), walking the chunks backwards with
the cotangent ``g`` of the state leaving chunk k (zero after the last chunk):
    dstates[k] = g,   ddA_chunk_end[k] = exp(dA_cs[k, Q-1]) * <g, prev[k]>,
    g <- dprev[k] + exp(dA_cs[k, Q-1]) * g
``ddA_chunk_end`` is summed over the slices by the caller.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, same_layout
from .ssd_ref import ssd_state_passing_ref as state_passing_ref  # the twin

__all__ = ["state_passing_bwd", "state_passing_fwd", "state_passing_ref"]


@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, dA_cs_ptr, out_ptr,
    nchunks, dim,
    stride_st_b, stride_st_c, stride_st_h,
    stride_dA_b, stride_dA_h, stride_dA_c,
    stride_out_b, stride_out_c, stride_out_h,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)        # int64 offsets: b * stride may pass 2^31
    pid_h = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs = pid_m * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    st_ptrs = states_ptr + pid_b * stride_st_b + pid_h * stride_st_h + offs
    out_ptrs = out_ptr + pid_b * stride_out_b + pid_h * stride_out_h + offs
    dA_ptr = dA_cs_ptr + pid_b * stride_dA_b + pid_h * stride_dA_h + (CHUNK - 1)
    running = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(nchunks):
        tl.store(out_ptrs + c * stride_out_c, running, mask=mask)
        s = tl.load(st_ptrs + c * stride_st_c, mask=mask, other=0.0)
        running = running * tl.exp(tl.load(dA_ptr + c * stride_dA_c)) + s


@triton.jit
def _state_passing_bwd_kernel(
    dout_ptr, out_ptr, dA_cs_ptr, dstates_ptr, ddA_part_ptr,
    nchunks, dim,
    stride_out_b, stride_out_c, stride_out_h,        # out (prev states) and dout
    stride_dA_b, stride_dA_h, stride_dA_c,
    stride_ds_b, stride_ds_c, stride_ds_h,
    stride_part_b, stride_part_h, stride_part_c, stride_part_m,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)        # int64 offsets: b * stride may pass 2^31
    pid_h = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs = pid_m * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    out_ptrs = out_ptr + pid_b * stride_out_b + pid_h * stride_out_h + offs
    dout_ptrs = dout_ptr + pid_b * stride_out_b + pid_h * stride_out_h + offs
    ds_ptrs = dstates_ptr + pid_b * stride_ds_b + pid_h * stride_ds_h + offs
    dA_ptr = dA_cs_ptr + pid_b * stride_dA_b + pid_h * stride_dA_h + (CHUNK - 1)
    part_ptr = ddA_part_ptr + pid_b * stride_part_b + pid_h * stride_part_h + pid_m * stride_part_m
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        decay = tl.exp(tl.load(dA_ptr + c * stride_dA_c))
        tl.store(ds_ptrs + c * stride_ds_c, g, mask=mask)
        prev = tl.load(out_ptrs + c * stride_out_c, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptr + c * stride_part_c, decay * tl.sum(g * prev, axis=0))
        g = tl.load(dout_ptrs + c * stride_out_c, mask=mask, other=0.0).to(tl.float32) + decay * g


def _block(dim: int) -> int:
    return min(triton.next_power_of_2(dim), 1024)


def state_passing_fwd(states: torch.Tensor, dA_cs: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """states [b, c, H, P, S] fp32, dA_cs [b, H, c, Q] -> prev_states [b, c, H, P, S]."""
    bsz, nchunks, nheads, hdim, dstate = states.shape
    chunk_size = dA_cs.shape[-1]
    assert states.is_contiguous() and dA_cs.stride(-1) == 1
    dim = hdim * dstate
    out = empty(bsz, nchunks, nheads, hdim, dstate, device=states.device,
                dtype=out_dtype or torch.float32)
    BLOCK = _block(dim)
    grid = (bsz, nheads, triton.cdiv(dim, BLOCK))
    _state_passing_fwd_kernel[grid](
        states, dA_cs, out, nchunks, dim,
        *states.stride()[:3], *dA_cs.stride()[:3], *out.stride()[:3],
        CHUNK=chunk_size, BLOCK=BLOCK,
    )
    return out


def state_passing_bwd(dprev: torch.Tensor, prev: torch.Tensor, dA_cs: torch.Tensor):
    """dprev, prev [b, c, H, P, S] -> (dstates fp32 [b, c, H, P, S], ddA_chunk_end fp32 [b, H, c])."""
    bsz, nchunks, nheads, hdim, dstate = prev.shape
    chunk_size = dA_cs.shape[-1]
    assert prev.is_contiguous() and same_layout(prev, dprev) and dA_cs.stride(-1) == 1
    dim = hdim * dstate
    BLOCK = _block(dim)
    nblocks = triton.cdiv(dim, BLOCK)
    dstates = empty(bsz, nchunks, nheads, hdim, dstate, device=prev.device)
    ddA_part = empty(bsz, nheads, nchunks, nblocks, device=prev.device)
    _state_passing_bwd_kernel[(bsz, nheads, nblocks)](
        dprev, prev, dA_cs, dstates, ddA_part, nchunks, dim,
        *prev.stride()[:3], *dA_cs.stride()[:3], *dstates.stride()[:3], *ddA_part.stride(),
        CHUNK=chunk_size, BLOCK=BLOCK,
    )
    return dstates, ddA_part.sum(dim=-1)
