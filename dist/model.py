"""The distributed model: torchrec item tables -> DeepSpeed dense engine -> loss.

``DistRecModel`` is the seam between the two libraries (``docs/training.md``):

    rows = tables.lookup(ids)                 torchrec: sharded rows, plain tensors out
    u, V = engine(seq=SeqInput, items=rows)   DeepSpeed: the model's dense part
                                              (full softmax / evaluation: V of this rank's
                                              own item rows only, mmm4rec/catalog.py)
    loss = sum(weight * CE(u, V)) / (global weight / world)   (mmm4rec.losses)
    engine.backward(loss)                     dense grads (ZeRO) + table row grads accumulated
    tables.step(); engine.step()              at accumulation boundaries: one update of each

The loss is normalised by the *global* number of real samples of the micro-batch
(one scalar all-reduce), divided by the world size because DeepSpeed averages the
gradients over ranks, so padding rows and uneven ranks do not change the gradient:
1 and N processes over the same global batch give the same update.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from mmm4rec import losses
from mmm4rec.contract import Batch, Loss
from mmm4rec.models import MODELS
from mmm4rec.models.base import SeqInput

from .engine import autocast

__all__ = ["DistRecModel", "build_dense"]

_ITEM_CHUNK = 65536   # items encoded / scored at a time by the vocab-parallel softmax


def build_dense(model_type: str, config) -> tuple[torch.nn.Module, list]:
    """(dense module, table specs) of a model, without allocating its item tables
    (``dist/tables.py`` builds those, sharded); the dense weights are initialised from
    the (seeded) torch RNG."""
    cls = MODELS[model_type]
    return cls.dense_cls(config), cls.table_specs_for(config)


class DistRecModel:
    """Tables (``ShardedItemTables``) + dense engine (DeepSpeed) behind the model contract
    (``mmm4rec.contract.RecModel``). Every method that looks items up is collective."""

    def __init__(self, model_type: str, config, tables, engine, env, precision: str = "fp32", sampled=None,
                 item_counts: torch.Tensor | None = None, rows_lr_factor: Callable[[int], float] | None = None):
        self.model_type = model_type
        self.config = config
        self.tables = tables
        self.engine = engine
        self.env = env
        self.precision = precision
        self.num_items = int(config.num_items)
        self.sampled = sampled                  # dist.config.SampledConfig (train.loss: sampled)
        self.item_counts = item_counts          # [num_items + 1] training-target counts (log-Q), or None
        self._sampler: Any = None               # mmm4rec.catalog.NegativeSampler, built on first use
        # the item table's LR factor at an optimizer step (schedule x train.param_groups.rows);
        # None: follow the dense engine's first param group
        self.rows_lr_factor = rows_lr_factor

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
        average is then the gradient of the global mean over real rows.

        ``full`` runs as the vocab-parallel softmax: this rank encodes only its own item
        range (:meth:`local_item_vectors`) and the softmax is completed across ranks
        (``mmm4rec.catalog``); ``sampled`` draws this micro-batch's negatives
        (``train.sampled``) and scores against them and the batch's targets."""
        batch = Batch.of(batch).to(self.device, non_blocking=True)
        if normaliser is None:
            # no weight: every row real (as mmm4rec.losses reads it)
            local = (batch.weight.float().sum() if batch.weight is not None
                     else torch.tensor(float(batch.target.shape[0]), device=batch.target.device))
            normaliser = self.env.all_reduce_sum(local.detach().clone()).clamp(min=1.0) / self.env.world_size
        encode = self.forward
        if kind == "full":   # logits [world x batch, chunk] at a time (default 65,536 items)
            kind, lo = "vocab_parallel", self.item_range[0]
            options = {**options, "item_offset": lo, "chunk_size": options.get("chunk_size") or _ITEM_CHUNK}

            def encode(b, _ids):
                seq = SeqInput.from_batch(b, self.tables.lookup(b.item_seq))
                return self._dense(seq, None)[0], self.local_item_vectors(options.get("chunk_size"))
        elif kind == "sampled":
            options = {**self._sampled_options(batch), **options}
        return losses.next_item_loss(kind, encode, batch, self.config, self.num_items, normaliser, **options)

    def _sampled_options(self, batch: Batch) -> dict:
        """Negatives (this rank's draw, from the global torch RNG: checkpointed and resumed
        with it) and the in-batch log-Q terms of ``train.sampled``."""
        from mmm4rec.catalog import NegativeSampler

        cfg = self.sampled
        if cfg is None:
            raise ValueError("loss 'sampled' needs train.sampled (DistRecModel(..., sampled=...))")
        if cfg.log_q and cfg.needs_counts and self.item_counts is None:
            raise ValueError("train.sampled: log_q for in-batch or popularity negatives needs the item counts")
        if self._sampler is None:
            counts = self.item_counts if cfg.sampler == "popularity" else None
            self._sampler = NegativeSampler(self.num_items, counts, alpha=cfg.alpha)
        sampler: NegativeSampler = self._sampler
        out = {"inbatch": cfg.inbatch, "gather": cfg.gather, "mask_hits": cfg.mask_hits}
        ids = sampler.sample(cfg.negatives, generator=None)[0].to(self.device) if cfg.negatives else None
        n_rows: torch.Tensor | None = None
        if cfg.inbatch and cfg.log_q:
            assert batch.weight is not None and self.item_counts is not None
            n_rows = (batch.weight > 0).sum().double()
            if cfg.gather:
                n_rows = self.env.all_reduce_sum(n_rows.detach().clone())
            p_data = self.item_counts.to(self.device, torch.float64)
            p_data = p_data / p_data[1:].sum().clamp(min=1.0)

        def log_q(items: torch.Tensor) -> torch.Tensor:
            """log of the expected count of ``items`` among a row's candidates of every source
            (in-batch: the other rows' targets, ~ the data's target distribution; sampled)."""
            e = torch.zeros(items.shape, dtype=torch.float64, device=self.device)
            if n_rows is not None:
                e += (n_rows - 1).clamp(min=1.0) * p_data[items]
            if ids is not None:
                e += cfg.negatives * sampler.prob(items).to(self.device)
            return torch.log(e.clamp(min=1e-30)).float()

        if ids is not None:
            out["negatives"] = (ids, log_q(ids) if cfg.log_q else torch.zeros(len(ids), device=self.device))
        if n_rows is not None:
            out["inbatch_log_q"] = log_q(batch.target)
        return out

    # ------------------------------------------------------------------ this rank's items
    @property
    def item_range(self) -> tuple[int, int]:
        """``(lo, hi)``: the items this rank encodes for the full softmax and evaluation:
        the rows its table shards hold (row-wise sharding), else torchrec's row-wise split."""
        span = self.tables.local_range()
        if span is None:
            from mmm4rec.catalog import even_ranges

            span = even_ranges(self.num_items + 1, self.env.world_size)[self.env.rank]
        return span

    def local_item_vectors(self, chunk_size: int | None = None) -> torch.Tensor:
        """V [hi - lo, N] of this rank's items only (:attr:`item_range`), encoded
        ``chunk_size`` rows at a time (with gradients in training: to the adapters and
        to the local ID/fusion rows). No rank ever encodes or holds the whole catalog."""
        lo, hi = self.item_range
        if self.tables.local_range() is None:     # rows looked up: one collective call per rank
            return self._dense(None, self.tables.rows_of_range(lo, hi))[1]
        step = max(1, chunk_size or _ITEM_CHUNK)
        if not torch.is_grad_enabled() and hi > lo:   # evaluation: filled in place (no second copy for a cat)
            out = None
            for a in range(lo, hi, step):
                v = self._dense(None, self.tables.rows_of_range(a, min(hi, a + step)))[1]
                if out is None:
                    out = v.new_empty(hi - lo, v.shape[1])
                out[a - lo:a - lo + v.shape[0]] = v
            assert out is not None
            return out
        parts = [self._dense(None, self.tables.rows_of_range(a, min(hi, a + step)))[1] for a in range(lo, hi, step)]
        if not parts:
            N = self.config.hidden_size
            return torch.zeros(0, N, device=self.device)
        return torch.cat(parts)

    def ranking(self, item_chunk_size: int = 65536, mask_history: bool = False):
        """Sharded evaluation (``mmm4rec.evaluate.evaluate``'s ``ranking`` hook): this rank's
        item vectors are encoded once; ``ranks(u, batch)`` counts, on every rank, its items
        scored strictly higher than each user's target and sums the counts across ranks
        (``mmm4rec.catalog.sharded_target_ranks``). Collective per batch."""
        from mmm4rec.catalog import sharded_target_ranks

        lo, _ = self.item_range
        with torch.no_grad():
            V = self.local_item_vectors(item_chunk_size)
        rank_padding = bool(getattr(self.config, "rank_padding", False))

        def ranks(u: torch.Tensor, batch: Batch) -> torch.Tensor:
            return sharded_target_ranks(u, V, lo, batch.target, rank_padding=rank_padding,
                                        history=batch.item_seq if mask_history else None, chunk_size=item_chunk_size)
        return ranks

    def top_k(self, k: int, item_chunk_size: int = 65536, exclude_history: bool = False):
        """Sharded top-K (``mmm4rec.evaluate.top_k_lists``' hook): this rank's item vectors
        are encoded once; ``topk(u, batch)`` takes every rank's top-K of the gathered users
        among its own items and merges the ranks' lists (``mmm4rec.catalog.sharded_topk``):
        no rank holds the catalog's vectors. Collective per batch."""
        from mmm4rec.catalog import sharded_topk

        lo, _ = self.item_range
        with torch.no_grad():
            V = self.local_item_vectors(item_chunk_size)
        rank_padding = bool(getattr(self.config, "rank_padding", False))

        def topk(u: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            return sharded_topk(u, V, lo, k, rank_padding=rank_padding,
                                history=batch.item_seq if exclude_history else None, chunk_size=item_chunk_size)
        return topk

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
