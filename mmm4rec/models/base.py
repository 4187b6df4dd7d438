"""The model contract shared by MMM4Rec and SASRec.

A model is two modules:

* ``model.tables`` (:class:`ItemTables`): per-item rows, per domain, never
  transferred: frozen modality features, modality masks, trainable ID rows.
  ``dist/`` serves the same rows from torchrec ``EmbeddingCollection``s (sharded
  for huge catalogs); :meth:`SeqRecModel.table_specs` says what they are.
* ``model.dense``: everything else (the transferable weights). Its ``forward``
  takes looked-up rows, so DeepSpeed wraps it alone:

      u, V = dense(seq=SeqInput, items=item_rows)
      u [b, N] user vectors; V [n, N] item vectors with fusion weights and 1/tau
      folded in, so that the scores are u @ V.T.

The model implements :class:`mmm4rec.contract.RecModel` (``user_vectors``,
``item_vectors``, ``loss``) and offers ``full_sort_predict`` and ``save_pretrained`` /
``from_pretrained`` (the format: :mod:`mmm4rec.export_format`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from .. import losses
from ..config import ConfigError, from_dict
from ..contract import Batch, Loss

TableKind = Literal["feature", "trainable"]


@dataclass(frozen=True)
class TableSpec:
    """One per-item table: ``num_rows`` = num_items + 1 (row 0 = padding)."""

    name: str
    num_rows: int
    dim: int
    kind: TableKind          # "feature": frozen, filled from the ItemTable; "trainable": learned
    init: Literal["zeros", "normal"] = "zeros"


@dataclass
class SeqInput:
    """What the dense part sees of a batch. rows: looked-up rows of ``item_seq``."""

    rows: dict[str, torch.Tensor]   # name -> [b, L, dim]
    item_seq: torch.Tensor          # [b, L] int64
    time_seq: torch.Tensor          # [b, L] float64
    item_seq_len: torch.Tensor      # [b] int64
    target_time: torch.Tensor | None = None  # [b] float64

    @classmethod
    def from_batch(cls, batch: Batch, rows: dict[str, torch.Tensor]) -> SeqInput:
        return cls(rows, batch.item_seq, batch.time_seq, batch.item_seq_len, batch.target_time)


class ItemTables(nn.Module):
    """Plain (single-process) item tables: ``forward(ids [...]) -> {name: [..., dim]}``."""

    def __init__(self, specs: list[TableSpec]):
        super().__init__()
        self.specs = {s.name: s for s in specs}
        self.tables = nn.ModuleDict()
        for s in specs:
            emb = nn.Embedding(s.num_rows, s.dim)
            if s.init == "zeros":
                nn.init.zeros_(emb.weight)
            else:
                nn.init.normal_(emb.weight, 0.0, 0.02)
            emb.weight.requires_grad_(s.kind == "trainable")
            self.tables[s.name] = emb

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: emb(ids) for name, emb in self.tables.items()}

    def all_rows(self) -> dict[str, torch.Tensor]:
        """Every row in id order, ``{name: [num_rows, dim]}``: ``forward(arange(num_rows))``
        without the copy (the tables themselves; gradients reach them directly)."""
        return {name: emb.weight for name, emb in self.tables.items()}

    @torch.no_grad()
    def load_features(self, features: dict[str, torch.Tensor]) -> None:
        """Fill the frozen tables: ``features[name]`` is [num_rows, dim] (numpy or torch)."""
        for name, spec in self.specs.items():
            if spec.kind != "feature":
                continue
            if name not in features:
                raise ValueError(f"item table: no '{name}' features given (have {sorted(features)})")
            src = torch.as_tensor(features[name], dtype=torch.float32)
            if tuple(src.shape) != (spec.num_rows, spec.dim):
                raise ValueError(
                    f"item table '{name}': expected shape ({spec.num_rows}, {spec.dim}) "
                    f"(num_items + 1, dim), got {tuple(src.shape)}")
            self.tables[name].weight.copy_(src)


def item_table_features(table, names=("text", "image", "modality_mask"), image_dim: int | None = None) -> dict:
    """Map a ``data_shards.items.ItemTable`` onto the feature tables of the models.

    A table without images (e.g. an LC-Rec set built with ``mmm4rec data build``) gives a
    model that has an ``image_dim`` (kept so that its export fits an image domain) zero
    rows with a False image mask: a missing modality, never a fake vector."""
    import numpy as np

    n = len(table.text_mask)   # an ItemTable (all rows) or data_shards.ItemRows (a range)
    out = {}
    if "text" in names:
        out["text"] = table.text
    if "image" in names:
        out["image"] = table.image if table.image is not None else np.zeros((n, image_dim or 0), np.float32)
    if "modality_mask" in names:
        img_mask = table.image_mask if table.image is not None else np.zeros(n, bool)
        out["modality_mask"] = np.stack([table.text_mask, img_mask], axis=1).astype(np.float32)
    return out


class SeqRecModel(nn.Module):
    """Base of every model: ``tables`` + ``dense`` and the shared training/eval API."""

    model_type: str = ""
    gathers_sequence_rows: bool = False   # dense.forward takes seq_rows_from_items (see forward)
    config_cls: type = object
    dense_cls: type = nn.Module     # built as dense_cls(config): what DeepSpeed wraps in dist/

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_items = config.num_items
        self.tables = ItemTables(self.table_specs())
        self.dense = self.dense_cls(config)

    # --- to implement -----------------------------------------------------------
    @classmethod
    def table_specs_for(cls, config) -> list[TableSpec]:
        """The per-item tables a model with ``config`` needs (no model is built)."""
        raise NotImplementedError

    def table_specs(self) -> list[TableSpec]:
        return self.table_specs_for(self.config)

    # --- features ----------------------------------------------------------------
    def set_item_table(self, table) -> None:
        """Load frozen features from a ``data_shards.items.ItemTable``."""
        specs = [s.name for s in self.table_specs() if s.kind == "feature"]
        if specs:
            self.tables.load_features(item_table_features(table, specs,
                                                          image_dim=getattr(self.config, "image_dim", None)))

    # --- the contract (mmm4rec.contract.RecModel) --------------------------------
    def user_vectors(self, batch: Batch | Mapping) -> torch.Tensor:
        batch = Batch.of(batch)
        u, _ = self.dense(seq=SeqInput.from_batch(batch, self.tables(batch.item_seq)))
        return u

    def item_vectors(self, ids: torch.Tensor | None = None, chunk_size: int = 65536) -> torch.Tensor:
        if ids is None:
            ids = torch.arange(self.num_items + 1, device=self.device)
        return torch.cat([self.dense(items=self.tables(ids[lo:lo + chunk_size]))[1]
                          for lo in range(0, max(len(ids), 1), chunk_size)])

    def forward(self, batch: Batch | Mapping, item_ids: torch.Tensor | None = None):
        """(u [b, N], V [n, N]): users of ``batch`` and items ``item_ids`` (all when None)."""
        batch = Batch.of(batch)
        if item_ids is None:
            item_ids = torch.arange(self.num_items + 1, device=batch.item_seq.device)
            if self.gathers_sequence_rows:
                # the whole catalog is encoded: the sequence's rows come from it (no second
                # lookup and adapter pass over b x L rows)
                return self.dense(seq=SeqInput.from_batch(batch, {}), items=self.tables.all_rows(),
                                  seq_rows_from_items=True)
        return self.dense(seq=SeqInput.from_batch(batch, self.tables(batch.item_seq)),
                          items=self.tables(item_ids))

    def loss(self, batch: Batch | Mapping, kind: str = "full", normaliser: torch.Tensor | float | None = None,
             **options) -> Loss:
        """Next-item cross-entropy (``mmm4rec.losses.LOSSES``: full or in-batch softmax),
        reduced by ``normaliser`` (default: this batch's weight sum)."""
        return losses.next_item_loss(kind, self, batch, self.config, self.num_items, normaliser, **options)

    def calculate_loss(self, batch: Batch | Mapping, loss: str = "full", mask_duplicates: bool = False
                       ) -> torch.Tensor:
        """``loss(batch, loss).value``: the scalar to backward (the RecBole-style name)."""
        return self.loss(batch, loss, mask_duplicates=mask_duplicates).value

    @torch.no_grad()
    def full_sort_predict(self, batch: dict) -> torch.Tensor:
        """Scores of every item, [b, num_items + 1]; column 0 (padding) is -inf."""
        u, V = self(batch)
        scores = u @ V.T
        if not getattr(self.config, "rank_padding", False):
            scores[:, 0] = float("-inf")
        return scores

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- transfer ----------------------------------------------------------------
    def transferable_state_dict(self) -> dict[str, torch.Tensor]:
        """The dense weights: adapters and blocks, not the per-domain item tables."""
        return {k: v.detach().cpu().contiguous() for k, v in self.dense.state_dict().items()}

    def save_pretrained(self, out_dir: str | Path) -> None:
        from .. import export_format

        export_format.write_files(out_dir, self.model_type, self.config, self.transferable_state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> SeqRecModel:
        """Load an export (``model.safetensors`` + ``config.json``); ``overrides`` set config
        fields for the new domain (``num_items``, ``use_id``, dropout ...)."""
        from .. import export_format

        path = Path(path)
        cfg, state = export_format.read_export(path)
        if cfg["model_type"] != cls.model_type:
            raise ConfigError(f"{path}: export holds a {cfg['model_type']} model, not {cls.model_type}")
        config = from_dict(cls.config_cls, {**cfg["config"], **overrides})
        model = cls(config)
        model.load_transferable(state, source=str(path))
        return model

    def load_transferable(self, state: dict[str, torch.Tensor], source: str = "export") -> None:
        """Load dense weights, failing with the full list of shape/key mismatches; whole
        layers beyond the model's are dropped (``export_format.extra_layers``)."""
        from .. import export_format

        own = self.dense.state_dict()
        skipped = set(export_format.extra_layers(own, {k: tuple(v.shape) for k, v in state.items()}))
        state = {k: v for k, v in state.items() if k not in skipped}   # whole extra layers (export_format)
        export_format.check_compatible(own, {k: v.shape for k, v in state.items()}, source)
        self.dense.load_state_dict(state)

