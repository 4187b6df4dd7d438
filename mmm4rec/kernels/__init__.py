"""Compute kernels with PyTorch reference twins; use the dispatchers in ``dispatch``.

``ssd`` / ``fourier_filter`` pick Triton (CUDA tensors) or the PyTorch reference (CPU);
``set_backend("auto" | "triton" | "reference")`` or ``$MMM4REC_KERNELS`` override it.
Design, tests and benchmark: docs/kernels.md.
"""
from ._common import UnsupportedShapeError
from .dispatch import fourier_filter, get_backend, set_backend, ssd, ssd_rows, use_backend

__all__ = ["UnsupportedShapeError", "fourier_filter", "get_backend", "set_backend", "ssd", "ssd_rows",
           "use_backend"]
