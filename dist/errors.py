"""The errors a training run reports as one clear line (``dist/train.py``), and the
non-finite loss guard.

Exit status of ``dist/train.py``: 0 success; 2 a configuration, data or storage error
(bad value, bad shard, unreachable endpoint, wrong credentials, missing bucket, an
output folder that cannot be used, a busy rendezvous port); 1 a training failure such
as a loss that is not finite (also one line), or anything unexpected (traceback).
"""
from __future__ import annotations

import os

import torch

__all__ = ["NonFiniteLossError", "NonFiniteGuard", "user_facing_error", "port_in_use_message", "should_print"]

#: set once the training loop runs: from then on a data/storage error may be one rank's own
#: (its shard, its loader worker), so every rank prints it; before, all ranks fail alike and
#: rank 0 alone prints
_state = {"in_loop": False}


def mark_training_loop() -> None:
    _state["in_loop"] = True


def should_print(error: BaseException, rank: int) -> bool:
    """Rank 0 prints every user-facing error; other ranks only their own data/storage
    errors inside the training loop (a rank-local shard or worker fault)."""
    from data_shards import DataError

    return rank == 0 or (_state["in_loop"] and isinstance(error, DataError))


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN/inf for more optimizer steps in a row than tolerated."""


class NonFiniteGuard:
    """Counts optimizer steps whose loss is not finite on any rank (one all-reduce of a
    single number per step, so every rank stops at the same step) and raises
    :class:`NonFiniteLossError` once more than ``tolerated`` come in a row
    (``train.max_nonfinite_steps``: bf16 overflow may skip a step now and then). It
    raises before the step's checkpoint, evaluation or export: a run never reports a
    best epoch or writes an export from weights a NaN loss left untrained."""

    def __init__(self, env, tolerated: int = 0):
        self.env = env
        self.tolerated = int(tolerated)
        self.in_a_row = 0
        self.total = 0

    def after_step(self, bad_micro_batches: int, step: int, epoch: int) -> None:
        flags = torch.tensor([float(bad_micro_batches > 0), 1.0], dtype=torch.float64)
        self.env.all_reduce_sum(flags)
        ranks_bad = int(flags[0])
        if not ranks_bad:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.tolerated:
            raise NonFiniteLossError(
                f"training loss is not finite (NaN/inf) at step {step} (epoch {epoch}) on {ranks_bad} of "
                f"{int(flags[1])} rank(s), {self.in_a_row} step(s) in a row (train.max_nonfinite_steps: "
                f"{self.tolerated}); stopped without evaluating or exporting. Check the data "
                f"(mmm4rec data inspect URL --verify finds NaN/inf features), the learning rate, or bf16 overflow")


def port_in_use_message(error: BaseException) -> str | None:
    """The one line for a rendezvous port that another process holds (EADDRINUSE)."""
    text = str(error)
    if "EADDRINUSE" not in text and "address already in use" not in text.lower():
        return None
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT", "?")
    return (f"rendezvous port {addr}:{port} is already in use (another run?); choose a free one: "
            f"deepspeed --master_port N, torchrun --master_port N, mmm4rec train --master-port N, or MASTER_PORT")


def user_facing_error(error: BaseException) -> tuple[int, str] | None:
    """``(exit status, one line)`` for an error a user can act on (``mmm4rec.errors``: a
    user error; and a busy rendezvous port), a non-finite loss (status 1, one line), else
    None (traceback)."""
    from mmm4rec.errors import EXIT_USER_ERROR, is_user_error, one_line

    if is_user_error(error):
        return EXIT_USER_ERROR, one_line(error)
    if isinstance(error, NonFiniteLossError):
        return 1, str(error)
    port = port_in_use_message(error)
    if port is not None:
        return EXIT_USER_ERROR, port
    return None
