"""Full-ranking evaluation (single process; dist/ adds the all-reduce of the sums)."""
from __future__ import annotations

from typing import Iterable

import torch

from .metrics import DEFAULT_KS, RankingMetrics, target_ranks


@torch.no_grad()
def rank_batch(model, batch: dict, mask_history: bool = False) -> torch.Tensor:
    """0-based rank of each row's target among all items, [b]."""
    scores = model.full_sort_predict(batch)
    return target_ranks(scores, batch["target"], batch["item_seq"] if mask_history else None)


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], ks=DEFAULT_KS, mask_history: bool = False) -> dict[str, float]:
    """HR/NDCG/MRR@K over ``batches`` (weight-0 padding rows are ignored)."""
    was_training = model.training
    model.eval()
    acc = RankingMetrics(ks)
    for batch in batches:
        acc.update(rank_batch(model, batch, mask_history), batch.get("weight"))
    model.train(was_training)
    return acc.compute()
