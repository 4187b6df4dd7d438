"""One entry point per kernel: Triton on CUDA tensors, the PyTorch reference on CPU.

(The kernels engineer replaces this with the full dispatcher; the API stays.)
"""
from __future__ import annotations

from .fourier_ref import fourier_filter_ref
from .ssd_ref import ssd_chunked_ref


def ssd(x, dt, A, B, C, D, dt_bias, chunk_size: int = 64):
    return ssd_chunked_ref(x, dt, A, B, C, D, dt_bias, chunk_size)


def fourier_filter(d_t, d_v, cl_a, cl_b, cl_c):
    return fourier_filter_ref(d_t, d_v, cl_a, cl_b, cl_c)
