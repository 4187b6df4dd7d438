"""User sequences -> (history, target) samples -> batches.

This is the contract between the data pipeline and the models (see
``docs/architecture.md``). Leave-one-out after a per-user time sort, as in the
model spec section 6: for a user with n interactions (1-indexed positions),

* ``train`` samples have targets at positions 2..n-2 (every prefix),
* ``valid`` has the target at position n-1,
* ``test``  has the target at position n,

and each history is the last ``max_len`` items before the target.

``train_targets: all`` (the release's pretraining, ``ShardsConfig``): every prefix of
every user is a train sample (targets at positions 2..n), except for a small slice of
*monitor* users (``monitor_mask``: a hash of the user index, a fraction
``monitor_users``), who give only their valid (n-1) and test (n) samples and no train
sample at all. Users that are trained on give no valid/test sample, so nothing that is
evaluated was trained on.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from mmm4rec.contract import Batch

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")
TrainTargets = Literal["loo", "all"]
TRAIN_TARGETS: tuple[str, ...] = ("loo", "all")

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def monitor_mask(users: np.ndarray, fraction: float) -> np.ndarray:
    """bool [U]: which of the user indices ``users`` [U] are monitor users (``train_targets: all``).

    A user is one when ``splitmix64(user) / 2**64 < fraction``: a fixed function of the
    user index alone (the same on every rank, worker, shard layout and run), so about
    ``fraction`` of the users, spread evenly over shards and domains.
    """
    u = np.asarray(users, dtype=np.int64).astype(np.uint64)
    if fraction <= 0 or u.size == 0:
        return np.zeros(u.shape, dtype=bool)
    with np.errstate(over="ignore"):
        z = u + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _check_targets(train_targets: str) -> None:
    if train_targets not in TRAIN_TARGETS:
        raise ValueError(f"train_targets: must be one of {TRAIN_TARGETS}, got {train_targets!r}")


def target_positions(n: int, split: str, train_targets: str = "loo", monitor: bool = False) -> range:
    """0-based target indices of a length-``n`` sequence for ``split``.

    ``train_targets="all"``: a ``monitor`` user's train targets are none and its
    valid/test as with ``loo``; any other user's train targets are 1..n-1 and its
    valid/test none."""
    _check_targets(train_targets)
    if train_targets == "all":
        if split in ("valid", "test") and not monitor:
            return range(0)
        if split == "train":
            return range(0) if monitor else range(1, max(n, 1))
    if split == "train":
        return range(1, max(n - 2, 1))
    if split == "valid":
        return range(n - 2, n - 1) if n >= 3 else range(0)
    if split == "test":
        return range(n - 1, n) if n >= 2 else range(0)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def num_samples(n: int, split: str, train_targets: str = "loo", monitor: bool = False) -> int:
    return len(target_positions(n, split, train_targets, monitor))


def expand(user: int, items: np.ndarray, times: np.ndarray, split: str, max_len: int,
           train_targets: str = "loo", monitor: bool = False) -> Iterator[dict]:
    """Yield the samples of one user sequence for ``split`` (oldest item first)."""
    for t in target_positions(len(items), split, train_targets, monitor):
        lo = max(0, t - max_len)
        yield {
            "user": int(user),
            "history": np.asarray(items[lo:t], dtype=np.int64),
            "history_time": np.asarray(times[lo:t], dtype=np.float64),
            "target": int(items[t]),
            "target_time": float(times[t]),
        }


def collate(samples: Sequence[dict], max_len: int, pad_to: int | None = None) -> Batch:
    """Stack samples into a batch (``mmm4rec.contract.Batch``, docs/architecture.md).

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
    return Batch(item_seq=item_seq, time_seq=time_seq, item_seq_len=seq_len, target=target, weight=weight,
                 target_time=target_time, user=user)


# --------------------------------------------------------------------------- vectorised twins
# The streaming reader enumerates and batches samples with these; tests check them
# against target_positions / expand / collate above.

def num_samples_array(lengths: np.ndarray, split: str, train_targets: str = "loo",
                      monitor: np.ndarray | None = None) -> np.ndarray:
    """int64 [U]: ``num_samples(n, split, train_targets, m)`` for every sequence length in
    ``lengths`` [U] (``monitor``: bool [U], the monitor users; only read with ``all``)."""
    n = np.asarray(lengths, dtype=np.int64)
    _check_targets(train_targets)
    if train_targets == "all":
        m = np.zeros(n.shape, bool) if monitor is None else np.asarray(monitor, dtype=bool)
        if split == "train":
            return np.where(m, 0, np.maximum(n - 1, 0))
        if split in ("valid", "test"):
            return np.where(m, num_samples_array(n, split), 0)
    if split == "train":
        return np.maximum(n - 3, 0)
    if split == "valid":
        return (n >= 3).astype(np.int64)
    if split == "test":
        return (n >= 2).astype(np.int64)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def sample_index(lengths: np.ndarray, split: str, train_targets: str = "loo",
                 monitor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of sequences with ``lengths`` [U], in (sequence, target) order.

    Returns ``(seq, target)``, both int64 [S]: the sample's sequence and its 0-based
    target index, exactly the order of ``expand`` over the sequences in turn.
    """
    n = np.asarray(lengths, dtype=np.int64)
    k = num_samples_array(n, split, train_targets, monitor)
    seq = np.repeat(np.arange(len(n), dtype=np.int64), k)
    if split == "train":
        starts = np.cumsum(k) - k
        target = np.arange(len(seq), dtype=np.int64) - np.repeat(starts, k) + 1
    else:
        target = n[seq] - (2 if split == "valid" else 1)
    return seq, target


def collate_index(items: np.ndarray, times: np.ndarray, offsets: np.ndarray, users: np.ndarray,
                  seq: np.ndarray, target: np.ndarray, max_len: int, pad_to: int | None = None
                  ) -> Batch:
    """``collate`` without building samples: gather histories straight from CSR sequences.

    ``items`` int64 / ``times`` float64 [T] hold sequences back to back, sequence ``j``
    at ``offsets[j]:offsets[j+1]`` with user index ``users[j]``; sample ``r`` of the
    batch is target index ``target[r]`` of sequence ``seq[r]`` (both int64 [b]). Rows
    ``b..pad_to-1`` are weight-0 padding, as in ``collate``.
    """
    b = len(seq)
    rows = b if pad_to is None else max(pad_to, b)
    hist_len = np.minimum(target, max_len)                      # [b]
    start = offsets[seq] + target - hist_len                    # [b] first history item
    j = np.arange(max_len)
    valid = j[None, :] < hist_len[:, None]                      # [b, L]
    idx = np.where(valid, start[:, None] + j[None, :], 0)
    tgt = offsets[seq] + target
    item_seq = np.zeros((rows, max_len), np.int64)
    time_seq = np.zeros((rows, max_len), np.float64)
    item_seq[:b] = np.where(valid, items[idx], 0)
    time_seq[:b] = np.where(valid, times[idx], 0.0)
    item_seq[b:, 0] = 1
    out: dict[str, np.ndarray] = {
        "user": np.full(rows, -1, np.int64),
        "item_seq": item_seq,
        "time_seq": time_seq,
        "item_seq_len": np.ones(rows, np.int64),
        "target": np.ones(rows, np.int64),
        "target_time": np.zeros(rows, np.float64),
        "weight": np.zeros(rows, np.float32),
    }
    if b and (hist_len < 1).any():
        raise ValueError(f"sample of user {int(users[seq][hist_len < 1][0])} has an empty history")
    out["user"][:b] = users[seq]
    out["item_seq_len"][:b] = hist_len
    out["target"][:b] = items[tgt]
    out["target_time"][:b] = times[tgt]
    out["weight"][:b] = 1.0
    return Batch(**{k: torch.from_numpy(v) for k, v in out.items()})
