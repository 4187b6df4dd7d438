"""Launching ``dist/train.py`` from a test as the user would (``dist.cli.launcher_command``),
in its own process group, with its output in a log file; and waiting for it with a deadline
after which the whole group is killed. Used by test_dist_runs.py and test_faults.py."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_training(args: list[str], log_path: Path, env: dict, nproc: int = 1, launcher: str = "deepspeed",
                   master_port: int | None = None) -> subprocess.Popen:
    """``dist/train.py ARGS`` on ``nproc`` processes (one plain process for 1), output to ``log_path``."""
    from dist.cli import launcher_command

    cmd = launcher_command(nproc, args, launcher if nproc > 1 else "none", master_port=master_port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:   # the child has its own copy
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float) -> tuple[int, str]:
    """``(exit status, log text)``; past ``timeout`` seconds the process group is killed (status -9)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = -9
    return rc, log_path.read_text()
