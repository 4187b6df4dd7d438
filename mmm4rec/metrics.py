"""Full-ranking metrics: HR@K (= Recall@K with one target), NDCG@K, MRR@K.

The rank of the target is the number of items scored strictly higher (0 = top).
Ranks are computed from score chunks, so a catalog never has to fit in one matrix,
and the sums are plain tensors, so ranks across processes add up with one all-reduce.
"""
from __future__ import annotations

import math

import torch

from .contract import DEFAULT_KS


def target_ranks(scores: torch.Tensor, target: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    """scores [b, n] over items 0..n-1, target [b] -> 0-based rank [b].

    ``history`` [b, L] (0 = padding): those items are excluded from the ranking
    (except the target itself), the optional history masking of the protocol.
    """
    scores = scores.clone()
    if history is not None:
        hist = history.clone()
        hist[hist == target[:, None]] = 0
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, hist, True)
        mask[:, 0] = False
        scores = scores.masked_fill(mask, float("-inf"))
    tgt = scores.gather(1, target[:, None])
    return (scores > tgt).sum(1)


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
    """0-based rank of each target among all items, scoring ``chunk`` items at a time.

    u [b, N] user vectors, V [|I|+1, N] item vectors (row 0 = padding, excluded unless
    ``rank_padding``), target [b]. Never materialises [b, |I|]: pass 1 reads each
    target's score from its chunk's matmul, pass 2 recomputes the same matmuls and counts
    the items scored higher. Within a chunk this is the one-matrix computation; items in
    *different* chunks whose scores tie exactly may be ordered differently by the last
    bit (BLAS rounding depends on the matrix shape), moving a rank by one only then.
    """
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


class RankingMetrics:
    """Accumulates weighted sums of HR/NDCG/MRR@K; ``compute()`` gives the means."""

    def __init__(self, ks=DEFAULT_KS):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3 * len(self.ks) + 1, dtype=torch.float64)

    def update(self, ranks: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        r = ranks.detach().to("cpu", torch.float64)
        w = torch.ones_like(r) if weight is None else weight.detach().to("cpu", torch.float64)
        vals = []
        for k in self.ks:
            hit = (r < k).to(torch.float64)
            vals += [(hit * w).sum(), (hit * w / torch.log2(r + 2)).sum(), (hit * w / (r + 1)).sum()]
        vals.append(w.sum())
        self.sums += torch.stack(vals)

    def compute(self, sums: torch.Tensor | None = None) -> dict[str, float]:
        s = self.sums if sums is None else sums
        n = max(float(s[-1]), 1.0)
        out = {}
        for i, k in enumerate(self.ks):
            out[f"hr@{k}"] = float(s[3 * i]) / n
            out[f"ndcg@{k}"] = float(s[3 * i + 1]) / n
            out[f"mrr@{k}"] = float(s[3 * i + 2]) / n
        out["count"] = float(s[-1])
        return out


def random_ranking_hr(k: int, num_items: int) -> float:
    """Expected HR@K of a uniformly random ranking over ``num_items`` candidates."""
    return min(k, num_items) / num_items


def ndcg_single(rank: int, k: int) -> float:
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0
