"""Full-ranking evaluation, one process or many (``mmm4rec.contract.RecModel``).

Each process ranks its own users (its part of the split, from the loader) against
all items: the item vectors are encoded once per evaluation, then each user's target
rank is the number of items scored strictly higher
(``mmm4rec.metrics.chunked_target_ranks``, never a ``[b, |I|]`` matrix). A model with a
``ranking`` method ranks itself: the distributed model's is sharded (each rank encodes
only its own items; ``mmm4rec.catalog.sharded_target_ranks`` sums the counts). The metric
*sums* (``RankingMetrics``) are summed across processes by the ``all_reduce`` hook
(float64), so N processes give the one-process result up to float rounding.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from .contract import DEFAULT_KS, Batch, RecModel
from .metrics import RankingMetrics, chunked_target_ranks

__all__ = ["evaluate", "target_ranks_all_items"]

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
