"""mmm4rec.cpu_memory: freed blocks come back from the heap instead of fresh pages.

Each check runs in a child process: the setting is process-wide."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
import torch
from mmm4rec.cpu_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "on" else False
n = 48 * 2 ** 20 // 4                          # 48 MiB blocks: above glibc's default mmap threshold
def one_step():                                # a step's pattern: temporaries made and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(n); b = torch.ones(n); c = a + b; del a, b; d = c * 2; d.sum(); del c, d
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [one_step() for _ in range(8)]
print(applied, min(faults[4:]))
"""


def _run(mode: str, env_off: bool = False) -> tuple[bool, int]:
    import os

    env = dict(os.environ)
    env.pop("MMM4REC_RETAIN_FREED_MEMORY", None)
    if env_off:
        env["MMM4REC_RETAIN_FREED_MEMORY"] = "0"
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_retained_memory_is_reused_without_page_faults():
    applied, faults = _run("on")
    if not applied:
        pytest.skip("this libc has no mallopt (not glibc)")
    _, faults_default = _run("off")
    pages = 48 * 2 ** 20 // 4096
    assert faults_default > 3 * pages           # default: each of the 4 blocks a fresh mapping, every step
    assert faults < pages // 20                 # retained: later steps reuse the freed blocks


def test_environment_variable_turns_it_off():
    applied, _ = _run("on", env_off=True)
    assert applied is False
