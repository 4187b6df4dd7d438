"""Synthetic shard sets of any catalog size, written without holding the catalog.

``mmm4rec data synth`` (and :func:`build_synthetic`) writes a shard set whose item table
is generated range by range (:func:`synthetic_item_block`: text vectors of norm ~1,
every block of ``BLOCK`` ids from its own seeded generator, so a row is the same
whatever the shard size or the range asked for) and whose users are drawn by seed
(:func:`synthetic_sequences`: lengths uniform in ``min_len..max_len``, items skewed
towards low ids by ``skew``, increasing timestamps). The item shards go through
:func:`data_shards.shards.write_shard_set` one at a time, so memory is one shard's rows
(20,000 x 384 in fp16: 15 MB) plus the sequences, at 10^7 items as at 10^3: what the
catalog-scale run needs (docs/benchmarks.md). The data carry no signal beyond the
popularity skew: metrics of a model trained on them are near those of a random ranking.

:func:`synthetic_data` materialises the same set in memory (small catalogs: tests).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .interactions import DatasetMeta, InteractionData, Sequences
from .items import ItemTable
from .shards import ItemSource, write_shard_set

__all__ = ["BLOCK", "build_synthetic", "synthetic_data", "synthetic_item_block", "synthetic_sequences",
           "synthetic_text"]

#: ids per independently seeded block of feature rows
BLOCK = 4096
_DOMAIN = "synthetic"


def _item_ids(lo: int, hi: int) -> list[str]:
    return [f"s{i}" for i in range(lo, hi)]


def synthetic_text(lo: int, hi: int, text_dim: int, seed: int = 0) -> np.ndarray:
    """float32 text vectors [hi - lo, text_dim] of items ``lo..hi-1`` (ids >= 1): N(0,
    1/text_dim) entries (norm ~1); every ``BLOCK`` ids from their own seeded generator."""
    if lo < 1 or hi < lo:
        raise ValueError(f"synthetic_text: rows {lo}..{hi - 1} (ids start at 1)")
    text = np.empty((hi - lo, text_dim), np.float32)
    scale = np.float32(1.0 / np.sqrt(text_dim))
    for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1 if hi > lo else lo // BLOCK):
        b_lo = b * BLOCK
        a, z = max(lo, b_lo), min(hi, b_lo + BLOCK)
        rng = np.random.default_rng([seed, b])
        if a > b_lo:   # the block's earlier rows: drawn and dropped, so a row never depends on the range
            rng.standard_normal((a - b_lo, text_dim), dtype=np.float32)
        rng.standard_normal((z - a, text_dim), dtype=np.float32, out=text[a - lo:z - lo])
        text[a - lo:z - lo] *= scale
    return text


def synthetic_item_block(lo: int, hi: int, text_dim: int, seed: int = 0) -> dict[str, Any]:
    """Rows ``lo..hi-1`` (ids >= 1) of the synthetic item table, as an item block of
    :class:`~data_shards.shards.ItemSource`: :func:`synthetic_text`, every text present,
    no image."""
    text = synthetic_text(lo, hi, text_dim, seed)
    n = hi - lo
    return {"text": text, "text_mask": np.ones(n, bool), "image": None, "image_mask": np.zeros(n, bool),
            "item_ids": _item_ids(lo, hi), "item_text": [""] * n, "domain": [_DOMAIN] * n}


def synthetic_sequences(num_users: int, num_items: int, min_len: int = 5, max_len: int = 20, skew: float = 1.0,
                        seed: int = 0) -> Sequences:
    """``num_users`` sequences of uniform length in ``min_len..max_len``; item ids
    ``1 + floor(num_items * U ** (1 + skew))`` (U uniform: ``skew`` 0 is uniform over the
    catalog, larger favours low ids), timestamps increasing from 2020-01-01."""
    if num_users < 1 or num_items < 1 or not 2 <= min_len <= max_len or skew < 0:
        raise ValueError(f"synthetic_sequences: need users >= 1 ({num_users}), items >= 1 ({num_items}), "
                         f"2 <= min_len ({min_len}) <= max_len ({max_len}), skew >= 0 ({skew})")
    rng = np.random.default_rng([seed, 1])
    lengths = rng.integers(min_len, max_len + 1, num_users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    items = 1 + np.minimum((num_items * rng.random(total) ** (1.0 + skew)).astype(np.int64), num_items - 1)
    gaps = rng.integers(60, 86_400, total).astype(np.float64)
    starts = np.repeat(offsets[:-1], lengths)
    csum = np.cumsum(gaps)
    times = 1_577_836_800.0 + csum - (csum[starts] - gaps[starts])   # per user: from its own first gap
    return Sequences(offsets, items, times, [f"u{u}" for u in range(num_users)], [_DOMAIN] * num_users)


def _meta(num_users: int, num_items: int, num_interactions: int, params: Mapping[str, Any]) -> DatasetMeta:
    counts = {"users": num_users, "items": num_items, "interactions": num_interactions}
    return DatasetMeta(name=_DOMAIN, format="synthetic", time_source="timestamp", k_core=0, counts_raw=dict(counts),
                       counts=counts, source={"generator": "data_shards.synthetic", **params})


def _params(num_items, num_users, text_dim, min_len, max_len, skew, seed) -> dict[str, Any]:
    return {"num_items": num_items, "num_users": num_users, "text_dim": text_dim, "min_len": min_len,
            "max_len": max_len, "skew": skew, "seed": seed}


def build_synthetic(out_url: str, num_items: int, num_users: int, *, text_dim: int = 384, min_len: int = 5,
                    max_len: int = 20, skew: float = 1.0, seed: int = 0, feature_dtype: str = "float16",
                    shard_size: int = 1000, items_per_shard: int = 20000,
                    storage_options: Mapping[str, Any] | None = None, progress: bool = True) -> dict:
    """Write the synthetic shard set (see the module docstring) to ``out_url``, the item
    shards range by range; returns the manifest."""
    if text_dim < 1:
        raise ValueError(f"text_dim: must be >= 1, got {text_dim}")
    seqs = synthetic_sequences(num_users, num_items, min_len, max_len, skew, seed)
    source = ItemSource(num_items, text_dim, 0, lambda lo, hi: synthetic_item_block(lo, hi, text_dim, seed),
                        text_encoder=f"synthetic N(0, 1/{text_dim})")
    meta = _meta(num_users, num_items, seqs.num_interactions,
                 _params(num_items, num_users, text_dim, min_len, max_len, skew, seed))
    return write_shard_set(seqs, meta, source, out_url, shard_size, storage_options, items_per_shard=items_per_shard,
                           seed=seed, progress=progress, feature_dtype=feature_dtype)


def synthetic_data(num_items: int, num_users: int, *, text_dim: int = 384, min_len: int = 5, max_len: int = 20,
                   skew: float = 1.0, seed: int = 0) -> InteractionData:
    """The same data set in memory (the whole item table: small catalogs only)."""
    seqs = synthetic_sequences(num_users, num_items, min_len, max_len, skew, seed)
    rows = synthetic_item_block(1, num_items + 1, text_dim, seed)
    table = ItemTable(text=np.concatenate([np.zeros((1, text_dim), np.float32), rows["text"]]),
                      text_mask=np.concatenate([[False], rows["text_mask"]]), item_ids=[""] + rows["item_ids"],
                      item_text=[""] + rows["item_text"], domain=[""] + rows["domain"],
                      text_encoder=f"synthetic N(0, 1/{text_dim})")
    meta = _meta(num_users, num_items, seqs.num_interactions,
                 _params(num_items, num_users, text_dim, min_len, max_len, skew, seed))
    return InteractionData(sequences=seqs, items=table, meta=meta)
