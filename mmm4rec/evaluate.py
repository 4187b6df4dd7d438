"""Full-ranking evaluation, one process or many (``mmm4rec.contract.RecModel``).

Each process ranks its own users (its part of the split, from the loader) against
all items: the item vectors are encoded once per evaluation, then each user's target
rank is the number of items scored strictly higher
(``mmm4rec.metrics.chunked_target_ranks``, never a ``[b, |I|]`` matrix). A model with a
``ranking`` method ranks itself: the distributed model's is sharded (each rank encodes
only its own items; ``mmm4rec.catalog.sharded_target_ranks`` sums the counts). The metric
*sums* (``RankingMetrics``) are summed across processes by the ``all_reduce`` hook
(float64), so N processes give the one-process result up to float rounding.

:func:`top_k_lists` gives each user's top-K items the same way: from all item vectors
(:func:`top_k_all_items`), or, for a model with a ``top_k`` method (the distributed
model), from each rank's own items, the ranks' lists merged
(``mmm4rec.catalog.sharded_topk``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from .contract import DEFAULT_KS, Batch, RecModel
from .metrics import RankingMetrics, chunked_target_ranks

__all__ = ["evaluate", "target_ranks_all_items", "top_k_all_items", "top_k_lists"]

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def target_ranks_all_items(model: RecModel, item_chunk_size: int = 65536, mask_history: bool = False
                           ) -> Callable[[torch.Tensor, Batch], torch.Tensor]:
    """The default ranking: every process holds all item vectors, encoded once here;
    returns ``ranks(u, batch) -> int64 [b]``. (A catalog-sharded ranking counts the
    items scoring strictly higher within its own shard and sums the counts across ranks.)"""
    V = model.item_vectors(None, item_chunk_size)
    rank_padding = bool(getattr(model.config, "rank_padding", False))

    def ranks(u: torch.Tensor, batch: Batch) -> torch.Tensor:
        return chunked_target_ranks(u, V, batch.target, item_chunk_size, rank_padding,
                                    batch.item_seq if mask_history else None)
    return ranks


@torch.no_grad()
def evaluate(model: RecModel, batches: Iterable[Batch | Mapping], ks=DEFAULT_KS, mask_history: bool = False,
             item_chunk_size: int = 65536, all_reduce: AllReduce | None = None,
             ranking: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None) -> dict[str, float]:
    """HR/NDCG/MRR@ks over ``batches`` (weight-0 padding rows are ignored).

    ``all_reduce`` sums a tensor over processes and returns it (None: one process); with it,
    ``evaluate`` is collective: every process must call it with the same number of
    batches (``data_shards.SequenceLoader`` guarantees that). ``ranking(u, batch)``
    gives the target ranks (default :func:`target_ranks_all_items`).
    """
    was_training = model.training
    model.eval()
    if ranking is None and hasattr(model, "ranking"):   # a model whose catalog is sharded ranks it so
        ranking = model.ranking(item_chunk_size, mask_history)
    ranking = ranking or target_ranks_all_items(model, item_chunk_size, mask_history)
    acc = RankingMetrics(ks)
    for batch in batches:
        batch = Batch.of(batch).to(model.device, non_blocking=True)
        acc.update(ranking(model.user_vectors(batch), batch), batch.weight)
    sums = acc.sums.clone()
    if all_reduce is not None:
        sums = all_reduce(sums)
    model.train(was_training)
    return acc.compute(sums)


TopK = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]]


def top_k_all_items(model: RecModel, k: int, item_chunk_size: int = 65536, exclude_history: bool = False) -> TopK:
    """The default top-K: every process holds all item vectors, encoded once here;
    returns ``topk(u, batch) -> (scores [b, k], item ids [b, k])`` (ties: the lower id
    first; item 0 never, unless the model ranks the padding; ``exclude_history``: the
    batch's history items never)."""
    from .catalog import local_topk

    V = model.item_vectors(None, item_chunk_size)
    rank_padding = bool(getattr(model.config, "rank_padding", False))

    def topk(u: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return local_topk(u, V, 0, k, rank_padding=rank_padding,
                          history=batch.item_seq if exclude_history else None, chunk_size=item_chunk_size)
    return topk


@torch.no_grad()
def top_k_lists(model: RecModel, batches: Iterable[Batch | Mapping], k: int = 10, item_chunk_size: int = 65536,
                exclude_history: bool = False) -> Iterator[dict]:
    """``{"user", "items": [k ids], "scores": [k floats]}`` for every real row of
    ``batches`` (this process's users), best first. A model with ``top_k(k,
    item_chunk_size, exclude_history)`` ranks itself (sharded: collective per batch, so
    every process must consume all of its batches); else :func:`top_k_all_items`."""
    was_training = model.training
    model.eval()
    make = getattr(model, "top_k", None)
    topk = make(k, item_chunk_size, exclude_history) if make is not None else \
        top_k_all_items(model, k, item_chunk_size, exclude_history)
    try:
        for batch in batches:
            batch = Batch.of(batch).to(model.device, non_blocking=True)
            scores, ids = topk(model.user_vectors(batch), batch)
            real = batch.weight > 0 if batch.weight is not None else torch.ones_like(batch.target, dtype=torch.bool)
            users = batch.user if batch.user is not None else torch.full_like(batch.target, -1)
            for r in torch.nonzero(real).flatten().tolist():
                keep = ids[r] >= 0
                yield {"user": int(users[r]), "items": ids[r][keep].tolist(), "scores": scores[r][keep].tolist()}
    finally:
        model.train(was_training)
