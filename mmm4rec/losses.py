"""Next-item cross-entropy at the last position (spec section 6).

u [b, N] user vectors, V [n, N] item vectors (scores = u @ V.T), weight [b] with 0
for padding rows (their loss is dropped; an all-padding batch gives 0 with a graph).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _weighted_mean(loss: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return loss.mean()
    weight = weight.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp(min=1.0)


def excludes_padding_class(config) -> bool:
    """Whether the full softmax leaves item 0 (padding) out: yes unless the model config
    sets ``padding_class`` (the release keeps row 0 as a never-positive class) or
    ``rank_padding`` (padding ranked at evaluation, so trained against too)."""
    return not (getattr(config, "padding_class", False) or getattr(config, "rank_padding", False))


def full_softmax_ce(u, V, target, weight=None, exclude_padding: bool = True, chunk_size: int | None = None):
    """Softmax over all items (fine-tuning). V holds rows 0..|I|; row 0 is padding.

    ``chunk_size`` bounds memory for huge catalogs: the log-partition is accumulated
    over item chunks with activation checkpointing, never materialising [b, |I|].
    """
    if chunk_size is None or chunk_size >= V.shape[0]:
        logits = u @ V.T
        if exclude_padding:
            logits = logits.clone()
            logits[:, 0] = float("-inf")
        return _weighted_mean(F.cross_entropy(logits, target, reduction="none"), weight)
    start = 1 if exclude_padding else 0
    lse_parts = []
    for lo in range(start, V.shape[0], chunk_size):
        chunk = V[lo:lo + chunk_size]
        lse_parts.append(checkpoint(lambda a, c: torch.logsumexp(a @ c.T, dim=1), u, chunk, use_reentrant=False))
    lse = torch.logsumexp(torch.stack(lse_parts, dim=1), dim=1)
    pos = (u * V[target]).sum(-1)
    return _weighted_mean(lse - pos, weight)


def inbatch_softmax_ce(u, V_targets, weight=None, targets: torch.Tensor | None = None):
    """In-batch softmax (pre-training): the other targets of the micro-batch are negatives.

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
    return _weighted_mean(ce, weight)
