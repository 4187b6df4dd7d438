"""Next-item cross-entropy at the last position (spec section 6): one dispatch for every
model (``SeqRecModel.loss`` and ``dist.model.DistRecModel.loss``).

u [b, N] user vectors, V [n, N] item vectors (scores = u @ V.T), weight [b] with 0
for padding rows (their loss is dropped; an all-padding batch gives 0 with a graph).

A loss kind (:data:`LOSSES`) says which item vectors it scores against
(:attr:`LossKind.item_ids`) and gives the per-row cross-entropy [b] (:attr:`LossKind.rows`);
:func:`next_item_loss` encodes, calls it and reduces: ``sum(weight * ce) / normaliser``,
the normaliser being the weight sum over *all* processes' rows (one process: its own).
``vocab_parallel`` (the full softmax over an item shard, completed across processes)
and ``sampled`` (sampled softmax with the log-Q correction) come from ``mmm4rec.catalog``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .contract import Batch, Loss

__all__ = ["LOSSES", "LossKind", "next_item_loss", "full_softmax_ce", "inbatch_softmax_ce",
           "excludes_padding_class"]


def _reduce(rows: torch.Tensor, weight: torch.Tensor | None, normaliser: torch.Tensor | float | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``sum(weight * rows) / normaliser``, weighted sum, weight sum); the normaliser
    defaults to the weight sum (at least 1)."""
    weight = torch.ones_like(rows) if weight is None else weight.to(rows.dtype)
    total, w = (rows * weight).sum(), weight.sum()
    if normaliser is None:
        normaliser = w.clamp(min=1.0)
    return total / normaliser, total, w


def excludes_padding_class(config) -> bool:
    """Whether the full softmax leaves item 0 (padding) out: yes unless the model config
    sets ``padding_class`` (the release keeps row 0 as a never-positive class) or
    ``rank_padding`` (padding ranked at evaluation, so trained against too)."""
    return not (getattr(config, "padding_class", False) or getattr(config, "rank_padding", False))


def full_softmax_rows(u, V, target, exclude_padding: bool = True, chunk_size: int | None = None) -> torch.Tensor:
    """Per-row CE [b] of the softmax over all items (fine-tuning). V holds rows 0..|I|;
    row 0 is padding.

    ``chunk_size`` bounds memory for huge catalogs: the log-partition is accumulated
    over item chunks with activation checkpointing, never materialising [b, |I|].
    """
    if chunk_size is None or chunk_size >= V.shape[0]:
        logits = u @ V.T
        if exclude_padding:
            logits = logits.clone()
            logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, target, reduction="none")
    start = 1 if exclude_padding else 0
    lse_parts = []
    for lo in range(start, V.shape[0], chunk_size):
        chunk = V[lo:lo + chunk_size]
        lse_parts.append(checkpoint(lambda a, c: torch.logsumexp(a @ c.T, dim=1), u, chunk, use_reentrant=False))
    lse = torch.logsumexp(torch.stack(lse_parts, dim=1), dim=1)
    pos = (u * V[target]).sum(-1)
    return lse - pos


def inbatch_softmax_rows(u, V_targets, weight=None, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row CE [b] of the in-batch softmax (pre-training): the other targets of the
    micro-batch are negatives.

    V_targets [b, N] = item vectors of the batch's targets. Padding rows (weight 0) are
    neither positives nor negatives. ``targets`` given: duplicates of the positive item
    among the negatives are masked (the release does not).
    """
    logits = u @ V_targets.T
    if weight is not None:
        logits = logits.masked_fill((weight <= 0)[None, :], float("-inf"))
    if targets is not None:
        dup = (targets[:, None] == targets[None, :]) & ~torch.eye(len(targets), dtype=torch.bool, device=u.device)
        logits = logits.masked_fill(dup, float("-inf"))
    labels = torch.arange(u.shape[0], device=u.device)
    ce = F.cross_entropy(logits, labels, reduction="none")
    if weight is not None:
        ce = torch.where(weight > 0, ce, torch.zeros_like(ce))
    return ce


def full_softmax_ce(u, V, target, weight=None, exclude_padding: bool = True, chunk_size: int | None = None,
                    normaliser=None):
    """:func:`full_softmax_rows`, weighted and reduced by ``normaliser`` (default: weight sum)."""
    return _reduce(full_softmax_rows(u, V, target, exclude_padding, chunk_size), weight, normaliser)[0]


def inbatch_softmax_ce(u, V_targets, weight=None, targets: torch.Tensor | None = None, normaliser=None):
    """:func:`inbatch_softmax_rows`, weighted and reduced by ``normaliser`` (default: weight sum)."""
    return _reduce(inbatch_softmax_rows(u, V_targets, weight, targets), weight, normaliser)[0]


@dataclass(frozen=True)
class LossKind:
    """``item_ids(batch, num_items, **options)``: the items whose vectors the loss needs
    (None: all, 0..num_items; e.g. a rank's item shard, or targets + sampled negatives);
    ``rows(u, V, batch, config, **options)``: per-row CE [b] (may reduce across ranks,
    e.g. a vocab-parallel log-partition)."""

    item_ids: Callable[..., torch.Tensor | None]
    rows: Callable[..., torch.Tensor]


def _full(u, V, batch: Batch, config, chunk_size: int | None = None, **_) -> torch.Tensor:
    return full_softmax_rows(u, V, batch.target, excludes_padding_class(config), chunk_size)


def _inbatch(u, V, batch: Batch, config, mask_duplicates: bool = False, **_) -> torch.Tensor:
    return inbatch_softmax_rows(u, V, batch.weight, batch.target if mask_duplicates else None)


def _vocab_parallel(u, V, batch: Batch, config, item_offset: int = 0, chunk_size: int | None = None, group=None,
                    **_) -> torch.Tensor:
    """The full softmax with V = this process's item range only (``mmm4rec.catalog``)."""
    from .catalog import vocab_parallel_ce

    return vocab_parallel_ce(u, V, item_offset, batch.target, batch.weight,
                             exclude_padding=excludes_padding_class(config), chunk_size=chunk_size, group=group)


def _sampled_ids(batch: Batch, num_items: int, negatives=None, **_) -> torch.Tensor:
    return batch.target if negatives is None else torch.cat([batch.target, negatives[0].to(batch.target.device)])


def _sampled(u, V, batch: Batch, config, negatives=None, inbatch: bool = True, gather: bool = False,
             inbatch_log_q=None, mask_hits: bool = True, group=None, **_) -> torch.Tensor:
    """Sampled softmax (``mmm4rec.catalog.sampled_softmax_ce``): V = the targets' vectors,
    then those of ``negatives = (ids, log expected counts)``."""
    from .catalog import sampled_softmax_ce

    b = batch.target.shape[0]
    neg_ids, neg_log_q = negatives if negatives is not None else (None, None)
    return sampled_softmax_ce(u, V[:b], batch.target, batch.weight, inbatch=inbatch, inbatch_log_q=inbatch_log_q,
                              gather=gather, neg_ids=neg_ids, V_neg=V[b:] if neg_ids is not None else None,
                              neg_log_q=neg_log_q, mask_hits=mask_hits, group=group)


#: loss kind -> :class:`LossKind` (``train.loss`` of the experiment config; ``dist``'s
#: model runs ``full`` as ``vocab_parallel`` over its item shard)
LOSSES: dict[str, LossKind] = {
    "full": LossKind(item_ids=lambda batch, num_items, **_: None, rows=_full),
    "inbatch": LossKind(item_ids=lambda batch, num_items, **_: batch.target, rows=_inbatch),
    "vocab_parallel": LossKind(item_ids=lambda batch, num_items, **_: None, rows=_vocab_parallel),
    "sampled": LossKind(item_ids=_sampled_ids, rows=_sampled),
}


def next_item_loss(kind: str, encode: Callable[[Batch, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
                   batch: Batch | Mapping, config, num_items: int, normaliser: torch.Tensor | float | None = None,
                   **options) -> Loss:
    """The loss ``kind`` of ``batch``: ``encode(batch, item_ids) -> (u, V)`` (item_ids None:
    all items) gives the vectors, ``options`` go to the kind (``chunk_size``,
    ``mask_duplicates``); reduced by ``normaliser`` (default: this batch's weight sum)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {kind!r}")
    spec, batch = LOSSES[kind], Batch.of(batch)
    u, V = encode(batch, spec.item_ids(batch, num_items, **options))
    value, total, weight = _reduce(spec.rows(u, V, batch, config, **options), batch.weight, normaliser)
    return Loss(value, total.detach(), weight.detach())
