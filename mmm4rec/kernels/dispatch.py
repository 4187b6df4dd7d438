"""One entry point per kernel: Triton on CUDA tensors, the PyTorch reference on CPU.

Backend choice, highest priority first:

1. :func:`set_backend` (``"auto"``, ``"triton"`` or ``"reference"``; ``None`` clears it),
   which the model config calls;
2. the environment variable ``MMM4REC_KERNELS`` (same values; read at call time);
3. ``"auto"``.

``"auto"`` runs Triton when the inputs are CUDA tensors and Triton imports, else the
reference. ``"triton"`` asks for the kernels whatever the device: CUDA tensors, or CPU
tensors under Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before triton is
imported; that is how the kernel tests run). Whenever the kernels cannot serve a call
(Triton does not import, CPU tensors without the interpreter, or a shape / dtype outside
the kernels' limits, reported as :class:`UnsupportedShapeError` before anything
launches) the call falls back to the reference and warns once per reason.
``"reference"`` always runs PyTorch.

Precision (mixed-precision training calls these under ``torch.autocast``): both paths
run with autocast switched off, on the dtypes they are given. The kernels take 16-bit
activations next to fp32 parameters and compute in fp32; the reference computes in fp32
whenever an input is 16-bit (``torch.fft`` takes no bf16, and the exp / cumsum of the
scan want fp32). Either way the output has the dtype of the first input (x, d_t).

Triton and the kernel modules are imported lazily, on the first call that needs them:
importing this package never imports Triton.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable

import torch

from ._common import (
    UnsupportedShapeError,
    interpreter_active,
    interpreting,
    triton_importable,
)
from .fourier_ref import fourier_filter_ref
from .ssd_ref import ssd_chunked_folded, ssd_quadratic_folded, ssd_rows_ref

__all__ = [
    "BACKENDS",
    "UnsupportedShapeError",
    "describe",
    "fourier_filter",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "ssd",
    "ssd_rows",
    "use_backend",
]

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "MMM4REC_KERNELS"

_backend_override: str | None = None
_warned: set = set()


def _validate(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source}: kernel backend must be one of {BACKENDS}, got {name!r}")
    return value


@contextlib.contextmanager
def use_backend(name: str | None):
    """Scope a backend choice (``None``: leave it as it is); the model wraps its forward in this."""
    global _backend_override
    if name is None:
        yield
        return
    previous = _backend_override
    _backend_override = _validate(name, "use_backend")
    try:
        yield
    finally:
        _backend_override = previous


def set_backend(name: str | None) -> None:
    """Choose the kernel backend for this process; ``None`` returns to the env var / auto."""
    global _backend_override
    _backend_override = None if name is None else _validate(name, "set_backend")


def get_backend() -> str:
    """The requested backend: ``set_backend``'s value, else ``$MMM4REC_KERNELS``, else auto."""
    if _backend_override is not None:
        return _backend_override
    env = os.environ.get(ENV_VAR)
    return _validate(env, ENV_VAR) if env else "auto"


def describe() -> str:
    """One line for ``mmm4rec env``: the requested backend, where it comes from, and what
    it means on this machine."""
    source = ("set_backend" if _backend_override is not None
              else ENV_VAR if os.environ.get(ENV_VAR) else "default")
    try:
        requested = get_backend()
    except ValueError as e:
        return str(e)
    if triton_importable():
        import triton

        tri = f"triton {triton.__version__}"
    else:
        tri = "triton not importable"
    if requested == "reference":
        what = "PyTorch reference everywhere"
    elif requested == "auto":
        what = "Triton on CUDA tensors, PyTorch reference on CPU tensors"
    else:
        what = "Triton on CUDA tensors; CPU tensors " + (
            "through the interpreter" if interpreting() else "fall back to the reference")
    return f"{requested} ({source}): {what}; {tri}"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_backend(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"``: what a call with these inputs would try first."""
    requested = get_backend()
    if requested == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    if requested == "auto":
        return "triton" if on_cuda and triton_importable() else "reference"
    return "triton"


_HALF = (torch.float16, torch.bfloat16)


def _to_fp32(a):
    if isinstance(a, (tuple, list)):
        return type(a)(_to_fp32(t) for t in a)
    return a.float() if torch.is_tensor(a) and a.dtype in _HALF else a


def _fp32_reference(ref_fn: Callable, args, tensors):
    """The reference in fp32 when an input is 16-bit, cast back to the first input's dtype."""
    if not any(t.dtype in _HALF for t in tensors):
        return ref_fn(*args)
    return ref_fn(*_to_fp32(args)).to(tensors[0].dtype)


def _run(kernel: str, triton_fn: Callable[[], Callable], ref_fn: Callable, args, tensors):
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return _dispatch(kernel, triton_fn, ref_fn, args, tensors)
    return _dispatch(kernel, triton_fn, ref_fn, args, tensors)


def _dispatch(kernel: str, triton_fn: Callable[[], Callable], reference: Callable, args, tensors):
    def ref_fn(*a):
        return _fp32_reference(reference, a, tensors)

    if resolve_backend(*tensors) == "reference":
        return ref_fn(*args)
    if not triton_importable():
        _warn_once(f"{kernel}:import",
                   f"mmm4rec.kernels.{kernel}: Triton is not importable; using the PyTorch reference")
        return ref_fn(*args)
    if not all(t.is_cuda for t in tensors):
        if not interpreting():
            _warn_once(f"{kernel}:device",
                       f"mmm4rec.kernels.{kernel}: Triton needs CUDA tensors (or TRITON_INTERPRET=1 "
                       "for CPU tensors); using the PyTorch reference")
            return ref_fn(*args)
        if not interpreter_active():
            _warn_once(f"{kernel}:late-interpret",
                       f"mmm4rec.kernels.{kernel}: TRITON_INTERPRET=1 was set after triton was "
                       "imported, so the interpreter is off; using the PyTorch reference")
            return ref_fn(*args)
    try:
        return triton_fn()(*args)
    except UnsupportedShapeError as e:
        _warn_once(f"{kernel}:{e}", f"mmm4rec.kernels.{kernel}: {e}; using the PyTorch reference")
        return ref_fn(*args)


def _ssd_triton():
    from .ssd_combined import ssd_chunked_triton

    return ssd_chunked_triton


def _fourier_triton():
    from .fourier_fused import fourier_filter_triton

    return fourier_filter_triton


def _ssd_reference(x, dt, A, B, C, D, dt_bias, chunk_size):
    """The PyTorch path: when one chunk covers the sequence the chunked scan IS the dual
    form on that chunk, and computing it directly skips the state stages (about 1.7x
    faster at L = 20 on CPU; :func:`ssd_quadratic_folded`, the dual form with the step
    factors folded into the L x L matrix); longer sequences take the linear-in-L chunked scan
    (:func:`ssd_chunked_folded`, the same folding per chunk)."""
    if x.shape[1] <= chunk_size:
        return ssd_quadratic_folded(x, dt, A, B, C, D, dt_bias)
    return ssd_chunked_folded(x, dt, A, B, C, D, dt_bias, chunk_size)


def ssd(x, dt, A, B, C, D, dt_bias, chunk_size: int = 64):
    """Time-aware SSD; shapes in :func:`mmm4rec.kernels.ssd_combined.ssd_chunked_triton`."""
    return _run("ssd", _ssd_triton, _ssd_reference, (x, dt, A, B, C, D, dt_bias, chunk_size),
                (x, dt, A, B, C, D, dt_bias))


def ssd_rows(x, dt, A, B, C_rows, D, dt_bias, rows):
    """The SSD output at chosen positions (``rows`` [b] or [b, R], ``C_rows`` = C there):
    O(L) PyTorch on every device (:func:`mmm4rec.kernels.ssd_ref.ssd_rows_ref`), autocast
    off and fp32 for 16-bit inputs like the other reference calls."""
    tensors = (x, dt, A, B, C_rows, D, dt_bias)
    args = (*tensors, rows)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _fp32_reference(ssd_rows_ref, args, tensors)
    return _fp32_reference(ssd_rows_ref, args, tensors)


def fourier_filter(d_t, d_v, cl_a, cl_b, cl_c):
    """Dual-channel Fourier filter; shapes in :mod:`mmm4rec.kernels.fourier_fused`."""
    tensors = (d_t, d_v, *cl_a, *cl_b, *cl_c)
    return _run("fourier_filter", _fourier_triton, fourier_filter_ref,
                (d_t, d_v, cl_a, cl_b, cl_c), tensors)
