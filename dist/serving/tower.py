"""The two self-contained programs of a retrieval export (``torch.export``, no project code needed):

* the **user tower**: looked-up rows of a history (one tensor per item table, in the
  order of ``table_names``) + item ids, timestamps and lengths -> user vectors [b, N];
* the **item encoder**: one item's rows -> its item vector [n, N] (adapters, per-modality
  normalisation, fusion weights and 1/temperature folded in), used by ``items add``.

Both wrap the model's own ``dense`` module in eval mode with the PyTorch reference kernels,
so they compute exactly what ``model.user_vectors`` / ``model.item_vectors`` compute.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mmm4rec.kernels import use_backend
from mmm4rec.models.base import SeqInput

__all__ = ["ItemEncoder", "UserTower", "export_program", "load_program"]


class UserTower(nn.Module):
    """``forward(*rows, item_seq, time_seq, item_seq_len) -> u [b, N]`` (rows in ``names`` order)."""

    def __init__(self, dense: nn.Module, names: list[str]):
        super().__init__()
        self.dense = dense
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        *rows, item_seq, time_seq, item_seq_len = args
        seq = SeqInput(dict(zip(self.names, rows)), item_seq, time_seq, item_seq_len)
        with use_backend("reference"):
            u, _ = self.dense(seq=seq)
        return u


class ItemEncoder(nn.Module):
    """``forward(*rows) -> V [n, N]`` (rows in ``names`` order, each [n, dim])."""

    def __init__(self, dense: nn.Module, names: list[str]):
        super().__init__()
        self.dense = dense
        self.names = list(names)

    def forward(self, *rows: torch.Tensor) -> torch.Tensor:
        _, v = self.dense(items=dict(zip(self.names, rows)))
        return v


def export_program(module: nn.Module, example: tuple[torch.Tensor, ...], path, batch_max: int = 1 << 20):
    """``torch.export`` ``module`` with a dynamic first (batch) dimension and save it to ``path``."""
    batch = torch.export.Dim("batch", min=1, max=batch_max)
    shapes = (tuple({0: batch} for _ in example),)   # forward(*args): one varargs tuple
    module = module.eval()
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return program


def load_program(path) -> nn.Module:
    """The callable module of a saved program (``torch.export.load``; only torch is needed)."""
    return torch.export.load(str(path)).module()
