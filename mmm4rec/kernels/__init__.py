"""Compute kernels with PyTorch reference twins; use the dispatchers in ``dispatch``."""
from .dispatch import fourier_filter, ssd  # noqa: F401
