"""Distributed full-ranking evaluation.

Each rank ranks its own users (its part of the valid/test split, from the loader)
against ALL items: the item vectors are computed once per evaluation (the table
lookups are collective, so every rank encodes every item chunk), then each user's
target rank is the number of items scored strictly higher, as in
``mmm4rec.metrics.target_ranks``. The per-rank metric *sums* (``RankingMetrics``)
are all-reduced in float64, so the result equals the single-process evaluation of
the same data up to float rounding of the scores.

Catalogs larger than ``item_chunk_size`` are scored chunk by chunk
(``mmm4rec.metrics.chunked_target_ranks``), never materialising a ``[b, num_items]``
matrix.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from mmm4rec.metrics import RankingMetrics, chunked_target_ranks

from .env import rng_isolated

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], ks=(10, 20, 50), mask_history: bool = False,
             item_chunk_size: int = 65536) -> dict[str, float]:
    """HR/NDCG/MRR@ks over this split on all ranks (collective: every rank must call it
    with the same number of batches, which ``data_shards.SequenceLoader`` guarantees)."""
    model.eval()
    V = model.item_vectors(item_chunk_size)
    acc = RankingMetrics(ks)
    it = iter(batches)
    while True:
        with rng_isolated():
            batch = next(it, None)
        if batch is None:
            break
        batch = model.to_device(batch)
        u = model.user_vectors(batch)
        ranks = chunked_target_ranks(u, V, batch["target"], item_chunk_size, model.rank_padding,
                                     batch["item_seq"] if mask_history else None)
        acc.update(ranks, batch["weight"])
    sums = acc.sums.clone()
    model.env.all_reduce_sum(sums)
    model.train()
    return acc.compute(sums)
