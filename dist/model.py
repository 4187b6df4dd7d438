"""The distributed model: torchrec item tables -> DeepSpeed dense engine -> loss.

``DistRecModel`` is the seam between the two libraries (``docs/training.md``):

    rows = tables.lookup(ids)                 torchrec: sharded rows, plain tensors out
    u, V = engine(seq=SeqInput, items=rows)   DeepSpeed: the model's dense part
    loss = CE(u, V) * (local weight * world / global weight)
    engine.backward(loss)                     dense grads (ZeRO) + table row grads accumulated
    tables.step(); engine.step()              at accumulation boundaries: one update of each

The loss is normalised by the *global* number of real samples of the micro-batch
(one scalar all-reduce), so padding rows and uneven ranks do not change the
gradient: 1 and N processes over the same global batch give the same update.
"""
from __future__ import annotations

import torch

from mmm4rec import losses
from mmm4rec.models import MODELS
from mmm4rec.models.base import SeqInput

from .engine import autocast

__all__ = ["DistRecModel", "build_dense"]

_BATCH_KEYS = ("item_seq", "time_seq", "item_seq_len", "target", "target_time", "weight")


def build_dense(model_type: str, config) -> tuple[torch.nn.Module, list]:
    """(dense module, table specs) of a model, without allocating its item tables
    (``dist/tables.py`` builds those, sharded); the dense weights are initialised from
    the (seeded) torch RNG."""
    cls = MODELS[model_type]
    return cls.dense_cls(config), cls.table_specs_for(config)


class DistRecModel:
    """Tables (``ShardedItemTables``) + dense engine (DeepSpeed) behind the model contract."""

    def __init__(self, model_type: str, config, tables, engine, env, precision: str = "fp32"):
        self.model_type = model_type
        self.config = config
        self.tables = tables
        self.engine = engine
        self.env = env
        self.precision = precision
        self.num_items = int(config.num_items)
        self.rank_padding = bool(getattr(config, "rank_padding", False))

    # ------------------------------------------------------------------ plumbing
    def to_device(self, batch: dict) -> dict:
        dev = self.env.device
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
                if k in _BATCH_KEYS}

    def _dense(self, seq: SeqInput | None, items: dict | None):
        with autocast(self.precision, self.env.device):
            u, v = self.engine(seq=seq, items=items)
        return (u.float() if u is not None else None), (v.float() if v is not None else None)

    def all_item_ids(self) -> torch.Tensor:
        return torch.arange(self.num_items + 1, device=self.env.device)

    def forward(self, batch: dict, item_ids: torch.Tensor | None):
        """(u [b, N], V [n, N]) for the batch's users and ``item_ids`` (None: no items)."""
        seq = SeqInput.from_batch(batch, self.tables.lookup(batch["item_seq"]))
        items = self.tables.lookup(item_ids) if item_ids is not None else None
        return self._dense(seq, items)

    # ------------------------------------------------------------------ training
    def train_loss(self, batch: dict, loss: str, mask_duplicates: bool = False,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss to backward, local weighted loss sum, local weight) for one micro-batch.

        The returned loss is this rank's share of the global mean over real rows:
        DeepSpeed's gradient average then equals the gradient of the global mean.
        """
        w = batch["weight"].float()
        local_w = w.sum()
        global_w = self.env.all_reduce_sum(local_w.detach().clone())
        if loss == "full":
            u, V = self.forward(batch, self.all_item_ids())
            mean = losses.full_softmax_ce(u, V, batch["target"], w,
                                          exclude_padding=losses.excludes_padding_class(self.config),
                                          chunk_size=chunk_size)
        elif loss == "inbatch":
            u, V = self.forward(batch, batch["target"])
            mean = losses.inbatch_softmax_ce(u, V, w, targets=batch["target"] if mask_duplicates else None)
        else:
            raise ValueError(f"train.loss must be 'full' or 'inbatch', got {loss!r}")
        share = local_w.clamp(min=1.0) * self.env.world_size / global_w.clamp(min=1.0)
        return mean * share, (mean.detach() * local_w), local_w

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def set_accumulation_boundary(self, boundary: bool) -> None:
        """Say, before a micro-batch's forward, whether it ends an optimizer step (the
        trainer decides: a short last window of an epoch ends early)."""
        self.engine.set_gradient_accumulation_boundary(bool(boundary))
        self._boundary = bool(boundary)

    def step(self) -> None:
        """After each micro-batch: at an accumulation boundary the item tables apply the
        gradient accumulated over the step's micro-batches (once) and DeepSpeed steps
        the dense optimizer (and LR schedule); in between, both only accumulate."""
        boundary = getattr(self, "_boundary", None)
        if boundary is None:
            boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self.tables.step()
        self.engine.step()

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def user_vectors(self, batch: dict) -> torch.Tensor:
        seq = SeqInput.from_batch(batch, self.tables.lookup(batch["item_seq"]))
        return self._dense(seq, None)[0]

    @torch.no_grad()
    def item_vectors(self, chunk_size: int = 65536) -> torch.Tensor:
        """V for items 0..num_items, [num_items + 1, N], looked up and encoded in chunks
        (every rank runs the same chunks: the lookups are collective)."""
        ids = self.all_item_ids()
        parts = [self._dense(None, self.tables.lookup(ids[i:i + chunk_size]))[1]
                 for i in range(0, len(ids), chunk_size)]
        return torch.cat(parts)
