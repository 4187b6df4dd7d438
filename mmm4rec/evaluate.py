"""Full-ranking evaluation in one process (dist/evaluation.py adds the all-reduce)."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .metrics import DEFAULT_KS, RankingMetrics, chunked_target_ranks


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], ks=DEFAULT_KS, mask_history: bool = False,
             item_chunk_size: int = 65536) -> dict[str, float]:
    """HR/NDCG/MRR@K over ``batches`` (weight-0 padding rows are ignored).

    Every item is encoded once per evaluation; users are ranked against the catalog
    ``item_chunk_size`` items at a time, so a huge catalog never needs a [b, |I|] matrix.
    """
    was_training = model.training
    model.eval()
    V = model.item_vectors()
    rank_padding = bool(getattr(model.config, "rank_padding", False))
    acc = RankingMetrics(ks)
    for batch in batches:
        ranks = chunked_target_ranks(model.user_vector(batch), V, batch["target"], item_chunk_size,
                                     rank_padding, batch["item_seq"] if mask_history else None)
        acc.update(ranks, batch.get("weight"))
    model.train(was_training)
    return acc.compute()
