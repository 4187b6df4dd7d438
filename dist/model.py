"""The distributed model: torchrec item tables -> DeepSpeed dense engine -> loss.

``DistRecModel`` is the seam between the two libraries (``docs/training.md``):

    rows = tables.lookup(ids)                 torchrec: sharded rows, plain tensors out
    u, V = engine(seq=SeqInput, items=rows)   DeepSpeed: the model's dense part
    loss = sum(weight * CE(u, V)) / (global weight / world)   (mmm4rec.losses)
    engine.backward(loss)                     dense grads (ZeRO) + table row grads accumulated
    tables.step(); engine.step()              at accumulation boundaries: one update of each

The loss is normalised by the *global* number of real samples of the micro-batch
(one scalar all-reduce), divided by the world size because DeepSpeed averages the
gradients over ranks, so padding rows and uneven ranks do not change the gradient:
1 and N processes over the same global batch give the same update.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from mmm4rec import losses
from mmm4rec.contract import Batch, Loss
from mmm4rec.models import MODELS
from mmm4rec.models.base import SeqInput

from .engine import autocast

__all__ = ["DistRecModel", "build_dense"]


def build_dense(model_type: str, config) -> tuple[torch.nn.Module, list]:
    """(dense module, table specs) of a model, without allocating its item tables
    (``dist/tables.py`` builds those, sharded); the dense weights are initialised from
    the (seeded) torch RNG."""
    cls = MODELS[model_type]
    return cls.dense_cls(config), cls.table_specs_for(config)


class DistRecModel:
    """Tables (``ShardedItemTables``) + dense engine (DeepSpeed) behind the model contract
    (``mmm4rec.contract.RecModel``). Every method that looks items up is collective."""

    def __init__(self, model_type: str, config, tables, engine, env, precision: str = "fp32"):
        self.model_type = model_type
        self.config = config
        self.tables = tables
        self.engine = engine
        self.env = env
        self.precision = precision
        self.num_items = int(config.num_items)

    # ------------------------------------------------------------------ plumbing
    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def training(self) -> bool:
        return self.engine.training

    def _dense(self, seq: SeqInput | None, items: dict | None):
        with autocast(self.precision, self.env.device):
            u, v = self.engine(seq=seq, items=items)
        return (u.float() if u is not None else None), (v.float() if v is not None else None)

    def all_item_ids(self) -> torch.Tensor:
        return torch.arange(self.num_items + 1, device=self.env.device)

    def forward(self, batch: Batch, item_ids: torch.Tensor | None):
        """(u [b, N], V [n, N]) for the batch's users and ``item_ids`` (None: all items)."""
        if item_ids is None:
            item_ids = self.all_item_ids()
        seq = SeqInput.from_batch(batch, self.tables.lookup(batch.item_seq))
        return self._dense(seq, self.tables.lookup(item_ids))

    # ------------------------------------------------------------------ training
    def loss(self, batch: Batch | Mapping, kind: str = "full", normaliser: torch.Tensor | None = None,
             **options) -> Loss:
        """This rank's share of the loss of one micro-batch (``mmm4rec.losses``): reduced by
        ``normaliser``, by default the weight sum over all ranks (one scalar all-reduce)
        divided by the world size, because DeepSpeed averages the ranks' gradients: the
        average is then the gradient of the global mean over real rows."""
        batch = Batch.of(batch).to(self.device, non_blocking=True)
        if normaliser is None:
            # no weight: every row real (as mmm4rec.losses reads it)
            local = (batch.weight.float().sum() if batch.weight is not None
                     else torch.tensor(float(batch.target.shape[0]), device=batch.target.device))
            normaliser = self.env.all_reduce_sum(local.detach().clone()).clamp(min=1.0) / self.env.world_size
        return losses.next_item_loss(kind, self.forward, batch, self.config, self.num_items, normaliser, **options)

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

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def eval(self) -> None:
        self.engine.eval()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def user_vectors(self, batch: Batch | Mapping) -> torch.Tensor:
        batch = Batch.of(batch).to(self.device, non_blocking=True)
        seq = SeqInput.from_batch(batch, self.tables.lookup(batch.item_seq))
        return self._dense(seq, None)[0]

    @torch.no_grad()
    def item_vectors(self, ids: torch.Tensor | None = None, chunk_size: int = 65536) -> torch.Tensor:
        """V [n, N] of items ``ids`` (all, 0..num_items, when None), looked up and encoded in
        chunks (every rank must pass the same ids: the lookups are collective)."""
        ids = self.all_item_ids() if ids is None else ids.to(self.device)
        parts = [self._dense(None, self.tables.lookup(ids[i:i + chunk_size]))[1]
                 for i in range(0, len(ids), chunk_size)]
        return torch.cat(parts)
