"""Helpers shared by the Triton kernels and the dispatcher. Imports no Triton.

* :class:`UnsupportedShapeError`: raised by a Triton entry point *before* launching
  when the inputs are outside what the kernels handle (chunk size, state size,
  window length, dtype, device). The dispatcher catches it and falls back to the
  PyTorch reference with a one-time warning.
* :func:`interpreter_active`: whether Triton runs through its CPU interpreter
  (``TRITON_INTERPRET=1``, set before triton was imported); then CPU tensors are
  legal kernel inputs.
* :func:`empty`: the allocator every kernel output goes through. Inside
  :func:`poison_outputs` it fills with NaN, so tests can prove that a kernel
  writes every element of every output it returns.
* :func:`dot_precision`: ``tl.dot``'s ``input_precision`` for a compute dtype.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = [
    "UnsupportedShapeError",
    "check_device",
    "dot_precision",
    "empty",
    "interpreter_active",
    "interpreting",
    "next_pow2",
    "num_sms",
    "poison_outputs",
    "same_layout",
    "triton_importable",
]


class UnsupportedShapeError(ValueError):
    """The inputs are valid but outside what the Triton kernels implement."""


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreter_active() -> bool:
    """``TRITON_INTERPRET=1`` is set *and* took effect.

    Triton chooses interpreter or compiler for every ``@triton.jit`` function when the
    defining module is imported, its own ``tl.cumsum`` & co. included, so the variable
    must be set before ``triton`` (and our kernel modules) are first imported.
    """
    if not interpreting():
        return False
    import sys

    std = sys.modules.get("triton.language.standard")
    ours = sys.modules.get("mmm4rec.kernels.ssd_chunk_cumsum")
    if std is None and ours is None:
        return True          # nothing imported yet: it will be imported interpreted
    from triton.runtime.interpreter import InterpretedFunction

    return ((std is None or isinstance(std.cumsum, InterpretedFunction))
            and (ours is None or isinstance(ours._softplus, InterpretedFunction)))


_TRITON_OK: bool | None = None


def triton_importable() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton
            import triton.language  # noqa: F401

            _TRITON_OK = True
        except Exception:  # noqa: BLE001 - ImportError, or a broken install raising at import
            _TRITON_OK = False
    return _TRITON_OK


_POISON = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within this block every kernel output starts as NaN (floating) instead of garbage."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def empty(*shape: int, device, dtype=torch.float32) -> torch.Tensor:
    t = torch.empty(*shape, device=device, dtype=dtype)
    if _POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` operand precision. Kernels always load into fp32 and accumulate in fp32.

    fp32 inputs: exact IEEE products unless the user opted into TF32 for matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), the same contract as ``torch.matmul``.
    16-bit inputs: TF32 tensor cores (their rounding is below the inputs' own).
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 under the interpreter / on CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def same_layout(*tensors: torch.Tensor) -> bool:
    """Same shape, and the same strides wherever a dim has more than one element
    (``is_contiguous`` ignores size-1 dims, so two contiguous tensors may differ there),
    so one set of strides addresses all of them."""
    first = tensors[0]
    return all(
        t.shape == first.shape
        and all(n == 1 or a == b for n, a, b in zip(first.shape, first.stride(), t.stride()))
        for t in tensors[1:]
    )


def check_device(*tensors: torch.Tensor, what: str) -> None:
    """CUDA tensors always run; CPU tensors only under ``TRITON_INTERPRET=1``."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) != 1:
        raise ValueError(f"{what}: all inputs must be on one device, got {sorted(map(str, devs))}")
    dev = devs.pop()
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and interpreter_active():
        return
    raise UnsupportedShapeError(
        f"{what}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1, set before triton "
        f"is imported, for CPU tensors), got device {dev}"
    )
