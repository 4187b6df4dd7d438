"""Keep freed memory in the process for reuse (glibc malloc), for CPU training.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves blocks above its
mmap threshold (at most 32 MiB by default) with a fresh ``mmap`` and unmaps them on
``free``, and trims the heap top beyond its trim threshold: so each activation of a
training step at the paper's sizes ([batch, L, 1536] fp32 is 31 MiB at batch 256, 126 MiB
at 1024) arrives as new pages, zeroed by the kernel and faulted in one by one. Measured
with ``benchmarks/train_step.py``'s model (1 thread, 2 layers): 80,000 minor page faults
per step at batch 256 and 1.5 million at batch 1024 (2.1 s of system time out of 7.5 s);
with :func:`retain_freed_memory` 1,400 and 300,000, and the step 1.1x / 1.35x faster
(a first measurement of this tree; the step is faster either way, see docs/benchmarks.md).

The setting is process-wide and changes no numerics; the cost is memory: the process keeps
freed blocks (up to ``limit`` bytes at the heap top, plus whatever fragmentation holds)
for the next step instead of returning them, which raises the peak resident set that the
catalog-scale runs are sized by (docs/benchmarks.md, "Catalog scale"). So it is opt-in:
``MMM4REC_RETAIN_FREED_MEMORY=1`` makes the trainer apply it on CPU (``dist/env.py``
calls :func:`retain_freed_memory_if_asked`). This module imports nothing from the package
(``benchmarks/train_step.py`` loads it by path into the baseline tree's worker too).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["ENV_VAR", "retain_freed_memory", "retain_freed_memory_if_asked"]

ENV_VAR = "MMM4REC_RETAIN_FREED_MEMORY"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the largest value mallopt takes (a C int)
_INT_MAX = 2 ** 31 - 1


def retain_freed_memory(limit: int = _INT_MAX) -> bool:
    """Serve blocks up to ``limit`` bytes from the heap and keep up to ``limit`` freed bytes
    at its top (glibc ``mallopt``: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). Returns whether
    the setting was applied (False off Linux / glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):      # not glibc (e.g. musl has no mallopt)
        return False
    limit = max(0, min(int(limit), _INT_MAX))
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def retain_freed_memory_if_asked() -> bool:
    """:func:`retain_freed_memory` when ``$MMM4REC_RETAIN_FREED_MEMORY`` is ``1``."""
    return os.environ.get(ENV_VAR) == "1" and retain_freed_memory()
