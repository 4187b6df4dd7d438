"""Distributed full-ranking evaluation.

Each rank ranks its own users (its part of the valid/test split, from the loader)
against ALL items: the item vectors are computed once per evaluation (the table
lookups are collective, so every rank encodes every item chunk), then each user's
target rank is the number of items scored strictly higher, as in
``mmm4rec.metrics.target_ranks``. The per-rank metric *sums* (``RankingMetrics``)
are all-reduced in float64, so the result equals the single-process evaluation of
the same data up to float rounding of the scores.

Catalogs larger than ``item_chunk_size`` are scored chunk by chunk, never
materialising a ``[b, num_items]`` matrix: pass 1 reads each target's score from its
chunk's matmul, pass 2 recomputes the same matmuls and counts the items scored higher.
Within a chunk this is the one-matrix computation; items in *different* chunks whose
scores tie exactly may be ordered differently by the last bit (BLAS rounding depends
on the matrix shape), which moves a rank by one only on exact cross-chunk ties.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from mmm4rec.metrics import RankingMetrics, target_ranks

from .env import rng_isolated

__all__ = ["evaluate", "chunked_target_ranks"]


def _history_mask(history: torch.Tensor, target: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """bool [b, hi-lo]: items of the history (not the target, not padding) in ``lo..hi-1``."""
    hist = history.clone()
    hist[hist == target[:, None]] = 0
    inside = (hist >= lo) & (hist < hi) & (hist > 0)
    mask = torch.zeros(history.shape[0], hi - lo, dtype=torch.bool, device=history.device)
    rows = torch.arange(history.shape[0], device=history.device)[:, None].expand_as(hist)
    mask[rows[inside], hist[inside] - lo] = True
    return mask


def chunked_target_ranks(u: torch.Tensor, V: torch.Tensor, target: torch.Tensor, chunk: int,
                         rank_padding: bool = False, history: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all items, scoring ``chunk`` items at a time."""
    n = V.shape[0]
    if n <= chunk:
        scores = u @ V.T
        if not rank_padding:
            scores[:, 0] = float("-inf")
        return target_ranks(scores, target, history)
    # pass 1: the target's score, from exactly the matmul pass 2 compares against
    tgt = torch.empty(u.shape[0], dtype=u.dtype, device=u.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        inside = (target >= lo) & (target < hi)
        if inside.any():
            s = u @ V[lo:hi].T
            tgt[inside] = s[inside].gather(1, (target[inside] - lo)[:, None])[:, 0]
    ranks = torch.zeros(u.shape[0], dtype=torch.int64, device=u.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        s = u @ V[lo:hi].T
        if lo == 0 and not rank_padding:
            s[:, 0] = float("-inf")
        if history is not None:
            s = s.masked_fill(_history_mask(history, target, lo, hi), float("-inf"))
        ranks += (s > tgt[:, None]).sum(1)
    return ranks


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
