"""mmm4rec.cpu_memory: freed blocks come back from the heap instead of fresh pages.

Each check runs in a child process: the setting is process-wide."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
import torch
from mmm4rec.cpu_memory import retain_freed_memory_if_asked
applied = retain_freed_memory_if_asked()
n = 48 * 2 ** 20 // 4                          # 48 MiB blocks: above glibc's default mmap threshold
def one_step():                                # a step's pattern: temporaries made and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(n); b = torch.ones(n); c = a + b; del a, b; d = c * 2; d.sum(); del c, d
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [one_step() for _ in range(8)]
print(applied, min(faults[4:]))
"""


def _run(asked: bool) -> tuple[bool, int]:
    import os

    env = dict(os.environ)
    env.pop("MMM4REC_RETAIN_FREED_MEMORY", None)
    if asked:
        env["MMM4REC_RETAIN_FREED_MEMORY"] = "1"
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_retained_memory_is_reused_without_page_faults():
    applied, faults = _run(asked=True)
    if not applied:
        pytest.skip("this libc has no mallopt (not glibc)")
    not_applied, faults_default = _run(asked=False)
    assert not_applied is False                 # opt-in: nothing changes unless asked
    pages = 48 * 2 ** 20 // 4096
    assert faults_default > 3 * pages           # default: each of the 4 blocks a fresh mapping, every step
    assert faults < pages // 20                 # retained: later steps reuse the freed blocks
