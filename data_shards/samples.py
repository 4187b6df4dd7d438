"""User sequences -> (history, target) samples -> batches.

This is the contract between the data pipeline and the models (see
``docs/architecture.md``). Leave-one-out after a per-user time sort, as in the
model spec section 6: for a user with n interactions (1-indexed positions),

* ``train`` samples have targets at positions 2..n-2 (every prefix),
* ``valid`` has the target at position n-1,
* ``test``  has the target at position n,

and each history is the last ``max_len`` items before the target.
"""
from __future__ import annotations

from typing import Iterator, Literal, Sequence

import numpy as np
import torch

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")


def target_positions(n: int, split: str) -> range:
    """0-based target indices of a length-``n`` sequence for ``split``."""
    if split == "train":
        return range(1, max(n - 2, 1))
    if split == "valid":
        return range(n - 2, n - 1) if n >= 3 else range(0)
    if split == "test":
        return range(n - 1, n) if n >= 2 else range(0)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def num_samples(n: int, split: str) -> int:
    return len(target_positions(n, split))


def expand(user: int, items: np.ndarray, times: np.ndarray, split: str, max_len: int) -> Iterator[dict]:
    """Yield the samples of one user sequence for ``split`` (oldest item first)."""
    for t in target_positions(len(items), split):
        lo = max(0, t - max_len)
        yield {
            "user": int(user),
            "history": np.asarray(items[lo:t], dtype=np.int64),
            "history_time": np.asarray(times[lo:t], dtype=np.float64),
            "target": int(items[t]),
            "target_time": float(times[t]),
        }


def collate(samples: Sequence[dict], max_len: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack samples into the batch dict of ``docs/architecture.md``.

    ``pad_to`` appends weight-0 padding rows (history = [item 1], target 1) so that
    every rank can run the same number of same-sized steps.
    """
    b = len(samples) if pad_to is None else max(pad_to, len(samples))
    item_seq = torch.zeros(b, max_len, dtype=torch.int64)
    time_seq = torch.zeros(b, max_len, dtype=torch.float64)
    seq_len = torch.ones(b, dtype=torch.int64)
    target = torch.ones(b, dtype=torch.int64)
    target_time = torch.zeros(b, dtype=torch.float64)
    user = torch.full((b,), -1, dtype=torch.int64)
    weight = torch.zeros(b, dtype=torch.float32)
    item_seq[:, 0] = 1
    for r, s in enumerate(samples):
        h = s["history"][-max_len:]
        n = len(h)
        if n == 0:
            raise ValueError(f"sample of user {s['user']} has an empty history")
        item_seq[r, 0] = 0
        item_seq[r, :n] = torch.from_numpy(np.asarray(h, dtype=np.int64))
        time_seq[r, :n] = torch.from_numpy(np.asarray(s["history_time"][-max_len:], dtype=np.float64))
        seq_len[r] = n
        target[r] = s["target"]
        target_time[r] = s["target_time"]
        user[r] = s["user"]
        weight[r] = 1.0
    return {
        "user": user,
        "item_seq": item_seq,
        "time_seq": time_seq,
        "item_seq_len": seq_len,
        "target": target,
        "target_time": target_time,
        "weight": weight,
    }
