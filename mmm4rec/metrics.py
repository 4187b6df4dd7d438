"""Full-ranking metrics: HR@K (= Recall@K with one target), NDCG@K, MRR@K.

The rank of the target is the number of items scored strictly higher (0 = top).
Ranks are computed from score chunks, so a catalog never has to fit in one matrix,
and the sums are plain tensors, so ranks across processes add up with one all-reduce.
"""
from __future__ import annotations

import math

import torch

DEFAULT_KS = (10, 20, 50)


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
