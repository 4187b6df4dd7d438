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

For windows up to ``DFT_MAX_LEN`` the transforms are products with the (cached) real DFT
matrices instead of ``torch.fft``: the same linear maps within fp32 rounding
(tests/test_model_fast_path.py::test_dft_matrices_equal_torch_fft), several times faster at the
model's window lengths on CPU, and free of pocketfft's per-call threading, which at 2
threads made an rfft forward+backward of [256, 8, 20] take ~100x its 1-thread time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DFT_MAX_LEN", "complex_linear_ref", "dft_matrices", "fourier_filter_ref", "irfft_ortho",
           "rfft_ortho"]

#: window lengths up to this use DFT matrix products, longer ones torch.fft
DFT_MAX_LEN = 256


_DFT_CACHE: dict = {}


def dft_matrices(L: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[4, F, L]: rfft real/imag rows (cos, -sin) / sqrt(L), then the irfft rows
    (c_k cos, -c_k sin) / sqrt(L) with c_k = 1 for bin 0 and the Nyquist bin, else 2.
    Shared by this path and the fused Triton kernel (cached per length, device, dtype)."""
    key = (int(L), torch.device(device), dtype)
    mat = _DFT_CACHE.get(key)
    if mat is None:
        F = L // 2 + 1
        k = torch.arange(F, dtype=torch.int64)[:, None]
        n = torch.arange(L, dtype=torch.int64)[None, :]
        ang = (k * n % L).to(torch.float64) * (2 * math.pi / L)   # exact phase, then one rounding
        cos, sin = torch.cos(ang), torch.sin(ang)
        c = torch.full((F, 1), 2.0, dtype=torch.float64)
        c[0] = 1.0
        sin_inv = -c * sin
        sin_inv[0] = 0.0                                          # irfft drops Im(bin 0)
        if L % 2 == 0:
            c[F - 1] = 1.0
            sin_inv[F - 1] = 0.0                                  # ... and Im(Nyquist)
        mat = torch.stack([cos, -sin, c * cos, sin_inv]) / math.sqrt(L)
        mat = mat.to(device=device, dtype=dtype).contiguous()
        _DFT_CACHE[key] = mat
    return mat


def rfft_ortho(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, imag) [..., L // 2 + 1] of ``torch.fft.rfft(x, dim=-1, norm="ortho")``."""
    L = x.shape[-1]
    if L > DFT_MAX_LEN:
        f = torch.fft.rfft(x, dim=-1, norm="ortho")
        return f.real, f.imag
    fwd = dft_matrices(L, x.device, x.dtype)[:2].reshape(-1, L)       # [2F, L]
    out = x @ fwd.T
    return out[..., :L // 2 + 1], out[..., L // 2 + 1:]


def irfft_ortho(re: torch.Tensor, im: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.fft.irfft(torch.complex(re, im), n=n, dim=-1, norm="ortho")``, real [..., n]."""
    if n > DFT_MAX_LEN:
        return torch.fft.irfft(torch.complex(re, im), n=n, dim=-1, norm="ortho")
    inv = dft_matrices(n, re.device, re.dtype)[2:].reshape(-1, n)     # [2F, n]
    return torch.cat([re, im], -1) @ inv


def complex_linear_ref(zr, zi, w_r, b_r, w_i, b_i):
    """(zr, zi) [..., F] -> (real, imag) [..., F]."""
    real = F.linear(zr, w_r, b_r) - F.linear(zi, w_i, b_i)
    imag = F.linear(zr, w_i, b_i) + F.linear(zi, w_r, b_r)
    return real, imag


def fourier_filter_ref(d_t, d_v, cl_a, cl_b, cl_c):
    """Dual-channel adaptive filter (DFT products or torch.fft). Shapes in the module docstring."""
    L = d_t.shape[-1]
    fv_r, fv_i = rfft_ortho(d_v)
    ft_r, ft_i = rfft_ortho(d_t)
    kv_r, kv_i = complex_linear_ref(fv_r, fv_i, *cl_a)
    kt_r, kt_i = complex_linear_ref(ft_r, ft_i, *cl_b)
    # complex products K * F, summed over the two channels
    sr = kv_r * fv_r - kv_i * fv_i + kt_r * ft_r - kt_i * ft_i
    si = kv_r * fv_i + kv_i * fv_r + kt_r * ft_i + kt_i * ft_r
    out_r, out_i = complex_linear_ref(sr, si, *cl_c)
    return irfft_ortho(out_r, out_i, L)
