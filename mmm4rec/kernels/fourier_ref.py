"""PyTorch reference of the dual-channel Fourier adaptive filter (spec section 5).

Shapes (b batch, H heads, L window length, F = L // 2 + 1 frequency bins):

    d_t, d_v        [b, H, L]   time signals returned by the text / vision TiSSD
    cl_a, cl_b, cl_c            each a tuple (W_r [F, F], b_r [F], W_i [F, F], b_i [F]):
                                a complex linear map over the frequency axis
    returns d_f     [b, H, L]   real

    F_v = rfft(d_v, ortho), F_t = rfft(d_t, ortho)
    K_v = CL_a(F_v),  K_t = CL_b(F_t)                 (adaptive, input-dependent)
    d_f = irfft(CL_c(K_v * F_v + K_t * F_t), n=L, ortho)

A complex linear CL(z) with z = z_r + i z_i is, as in the authors' release,
    real = (W_r z_r + b_r) - (W_i z_i + b_i),   imag = (W_i z_r + b_i) + (W_r z_i + b_r).
The filter is circular over the window; it is causal-safe only because the loss
reads the last position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["complex_linear_ref", "fourier_filter_ref"]


def complex_linear_ref(zr, zi, w_r, b_r, w_i, b_i):
    """(zr, zi) [..., F] -> (real, imag) [..., F]."""
    real = F.linear(zr, w_r, b_r) - F.linear(zi, w_i, b_i)
    imag = F.linear(zr, w_i, b_i) + F.linear(zi, w_r, b_r)
    return real, imag


def fourier_filter_ref(d_t, d_v, cl_a, cl_b, cl_c):
    """Dual-channel adaptive filter through torch.fft. Shapes in the module docstring."""
    L = d_t.shape[-1]
    fv = torch.fft.rfft(d_v, dim=-1, norm="ortho")
    ft = torch.fft.rfft(d_t, dim=-1, norm="ortho")
    kv_r, kv_i = complex_linear_ref(fv.real, fv.imag, *cl_a)
    kt_r, kt_i = complex_linear_ref(ft.real, ft.imag, *cl_b)
    # complex products K * F, summed over the two channels
    sr = kv_r * fv.real - kv_i * fv.imag + kt_r * ft.real - kt_i * ft.imag
    si = kv_r * fv.imag + kv_i * fv.real + kt_r * ft.imag + kt_i * ft.real
    out_r, out_i = complex_linear_ref(sr, si, *cl_c)
    return torch.fft.irfft(torch.complex(out_r, out_i), n=L, dim=-1, norm="ortho")
