"""The batch type and the model contract (docs/architecture.md).

A light module (torch only, no models, no kernels): ``data_shards`` builds
:class:`Batch`, the models, ``dist/`` and the evaluator consume it, and every model --
the single-process ``SeqRecModel`` (MMM4Rec, SASRec) and ``dist.model.DistRecModel`` --
implements :class:`RecModel`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

__all__ = ["Batch", "Loss", "RecModel", "DEFAULT_KS"]

#: the evaluation cut-offs when none are configured (HR/NDCG/MRR@K)
DEFAULT_KS = (10, 20, 50)


@dataclass(eq=False)
class Batch(Mapping):
    """One batch, b rows, L = ``max_len`` (the reader's output, the models' input).

    ``weight`` is 1 for a real sample and 0 for the padding rows that keep ranks in
    step. The mapping interface (``batch["target"]``, ``batch.items()``) is kept for
    code that treats a batch as the dict it used to be; new code uses the attributes.
    """

    item_seq: torch.Tensor              # int64 [b, L] history, oldest first, right-padded with 0
    time_seq: torch.Tensor              # float64 [b, L] history timestamps; 0 in padding
    item_seq_len: torch.Tensor          # int64 [b] real history items, 1..L
    target: torch.Tensor                # int64 [b] the next item, 1..num_items
    weight: torch.Tensor | None = None  # float32 [b] (None: every row real)
    target_time: torch.Tensor | None = None   # float64 [b] (only the ``time_leak`` flag reads it)
    user: torch.Tensor | None = None    # int64 [b] user index within the shard set, -1 for padding

    @classmethod
    def of(cls, batch: Batch | Mapping[str, Any]) -> Batch:
        """``batch`` itself, or a Batch of a dict with the same keys (unknown keys dropped)."""
        if isinstance(batch, Batch):
            return batch
        return cls(**{f.name: batch[f.name] for f in dataclasses.fields(cls) if batch.get(f.name) is not None})

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(**{k: v.to(device, non_blocking=non_blocking) for k, v in self.items()})

    def rows(self, index) -> Batch:
        """The rows ``index`` (slice, indices or mask) of every field."""
        return Batch(**{k: v[index] for k, v in self.items()})

    # ---- mapping view (the keys present, in the order of docs/architecture.md)
    def __getitem__(self, key: str) -> torch.Tensor:
        value = getattr(self, key, None) if key in _FIELDS else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (k for k in _FIELDS if getattr(self, k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


_FIELDS = tuple(f.name for f in dataclasses.fields(Batch))


class Loss(NamedTuple):
    """A loss over one (micro-)batch: ``value`` (to backward) = ``total`` / normaliser."""

    value: torch.Tensor    # weighted cross-entropy sum / the normaliser given (with a graph)
    total: torch.Tensor    # this process's weighted cross-entropy sum (detached)
    weight: torch.Tensor   # this process's weight sum (detached)


@runtime_checkable
class RecModel(Protocol):
    """What the trainers, the evaluator and the export need of a model.

    Scores are ``user_vectors(batch) @ item_vectors(ids).T`` (fusion weights and the
    temperature folded into the item vectors). Item 0 is padding.
    """

    config: Any
    num_items: int
    training: bool

    @property
    def device(self) -> torch.device: ...

    def user_vectors(self, batch: Batch | Mapping) -> torch.Tensor:
        """u [b, N] of the batch's users."""

    def item_vectors(self, ids: torch.Tensor | None = None, chunk_size: int = 65536) -> torch.Tensor:
        """V [n, N] of items ``ids`` (all, 0..num_items, when None), encoded ``chunk_size`` at a
        time; a contiguous range ``lo..hi`` is ``ids=torch.arange(lo, hi)``."""

    def loss(self, batch: Batch | Mapping, kind: str = "full", normaliser: torch.Tensor | None = None,
             **options) -> Loss:
        """Next-item cross-entropy of kind ``kind`` (``mmm4rec.losses.LOSSES``), reduced by
        ``normaliser`` (default: the weight sum over every process's rows)."""

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...
