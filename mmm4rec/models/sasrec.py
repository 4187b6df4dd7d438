"""SASRec (Kang & McAuley, ICDM 2018): ID-based causal self-attention baseline.

Same contract as MMM4Rec: ``tables`` holds the item ID embeddings (per domain),
``dense`` the positional embedding and Transformer. Scores are u . e_i.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import SeqInput, SeqRecModel, TableSpec
from .configs import SASRecConfig
from .tissd import init_weights


class SASRecDense(nn.Module):
    """forward(seq, items) -> (u [b, N], V [n, N]); rows: ``id`` [..., N]."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        N = cfg.hidden_size
        self.pos = nn.Embedding(cfg.max_len, N)
        self.norm = nn.LayerNorm(N, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout_prob)
        layer = nn.TransformerEncoderLayer(N, cfg.n_heads, cfg.inner_size, cfg.dropout_prob,
                                           activation="gelu", batch_first=True, layer_norm_eps=cfg.norm_eps)
        layer.self_attn.dropout = cfg.attn_dropout_prob
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.apply(lambda m: init_weights(m, cfg.init_range))
        # RecBole's SASRec init: every Embedding and attention projection N(0, init_range) too.
        # PyTorch's defaults (N(0, 1) positions, Xavier in_proj) left the positions 50x the item
        # rows (N(0, 0.02)), so after the input LayerNorm the sequence carried almost no item
        # identity and training sat on the popularity plateau for ~12 epochs (docs/transfer.md).
        nn.init.normal_(self.pos.weight, 0.0, cfg.init_range)
        for layer in self.encoder.layers:
            nn.init.normal_(layer.self_attn.in_proj_weight, 0.0, cfg.init_range)
            nn.init.zeros_(layer.self_attn.in_proj_bias)

    def forward(self, seq: SeqInput | None = None, items: dict[str, torch.Tensor] | None = None):
        u = v = None
        if seq is not None:
            b, L = seq.item_seq.shape
            pos = torch.arange(L, device=seq.item_seq.device)
            h = self.drop(self.norm(seq.rows["id"] + self.pos(pos)[None]))
            causal = torch.full((L, L), float("-inf"), device=h.device).triu(1)
            h = self.encoder(h, mask=causal)
            u = h[torch.arange(b, device=h.device), (seq.item_seq_len - 1).clamp(min=0)]
        if items is not None:
            v = items["id"]
        return u, v


class SASRec(SeqRecModel):
    model_type = "sasrec"
    config_cls = SASRecConfig
    dense_cls = SASRecDense

    @classmethod
    def table_specs_for(cls, c: SASRecConfig) -> list[TableSpec]:
        return [TableSpec("id", c.num_items + 1, c.hidden_size, "trainable", init="normal")]
