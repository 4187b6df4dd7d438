"""Start-up without the whole catalog: each process reads only its own item rows from
the shard set (``data_shards.load_item_rows``), so its start-up memory is about
|I| / W rows."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from data_shards import ItemTable, build_shards, load_item_rows, load_item_table
from data_shards.interactions import DatasetMeta, InteractionData, Sequences
from data_shards.storage import Store
from mmm4rec.catalog import even_ranges
from mmm4rec.models.base import item_table_features

N_ITEMS, DIM, PER_SHARD = 6000, 128, 200


def synthetic_set(out: str, n_items: int = N_ITEMS, dim: int = DIM, image_dim: int = 0) -> str:
    rng = np.random.default_rng(0)
    users = 40
    lens = rng.integers(5, 12, users)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    items = rng.integers(1, n_items + 1, int(lens.sum()))
    seqs = Sequences(offsets, items, np.arange(len(items), dtype=np.float64), [f"u{i}" for i in range(users)],
                     ["syn"] * users)
    text = rng.standard_normal((n_items + 1, dim)).astype(np.float32)
    text[0] = 0
    mask = np.ones(n_items + 1, bool)
    mask[0] = False
    image = None
    if image_dim:
        image = rng.standard_normal((n_items + 1, image_dim)).astype(np.float32)
        image[0] = 0
    table = ItemTable(text=text, text_mask=mask, image=image, image_mask=mask.copy() if image_dim else None,
                      item_ids=[""] + [f"i{k}" for k in range(1, n_items + 1)])
    counts = {"users": users, "items": n_items, "interactions": len(items)}
    meta = DatasetMeta(name="syn", format="synthetic", time_source="position", k_core=0, counts_raw=counts,
                       counts=counts)
    build_shards(InteractionData(seqs, table, meta), out, shard_size=20, items_per_shard=PER_SHARD, progress=False)
    return out


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return synthetic_set(str(tmp_path_factory.mktemp("catalog") / "syn"), image_dim=16)


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_each_rank_reads_exactly_its_rows(shard_set, ws, monkeypatch):
    full = load_item_table(shard_set)
    read = []
    orig = Store.read
    monkeypatch.setattr(Store, "read", lambda self, rel: read.append(rel) or orig(self, rel))
    for lo, hi in even_ranges(N_ITEMS + 1, ws):
        read.clear()
        rows = load_item_rows(shard_set, lo, hi)
        np.testing.assert_array_equal(rows.text, full.text[lo:hi])
        np.testing.assert_array_equal(rows.image, full.image[lo:hi])
        np.testing.assert_array_equal(rows.text_mask, full.text_mask[lo:hi])
        np.testing.assert_array_equal(rows.image_mask, full.image_mask[lo:hi])
        feats = item_table_features(rows, ("text", "image", "modality_mask"))
        want = item_table_features(full, ("text", "image", "modality_mask"))
        for k, v in feats.items():
            np.testing.assert_array_equal(v, want[k][lo:hi])
        shards = sorted(r for r in read if r.startswith("items/"))
        first = max(lo - 1, 0) // PER_SHARD                      # items 1.. are in shard (id - 1) // PER_SHARD
        last = (hi - 2) // PER_SHARD
        assert shards == [f"items/items-{k:05d}.tar" for k in range(first, last + 1)], (lo, hi, shards)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del out
    return peak


def test_start_up_memory_of_a_rank_halves_with_two_ranks(shard_set):
    """What a rank allocates to read its features (rows + the model's feature columns):
    rank 0 of 2 about half of a single rank's, rank 1 of 2 too, fp16 half again."""
    def load(lo, hi, dtype=np.float32):
        return lambda: item_table_features(load_item_rows(shard_set, lo, hi, dtype=dtype),
                                           ("text", "image", "modality_mask"))
    one = _peak_bytes(load(0, N_ITEMS + 1))
    halves = [_peak_bytes(load(lo, hi)) for lo, hi in even_ranges(N_ITEMS + 1, 2)]
    for h in halves:
        assert 0.4 < h / one <= 0.6, (h, one)
    half16 = _peak_bytes(load(*even_ranges(N_ITEMS + 1, 2)[0], dtype=np.float16))
    assert half16 / halves[0] < 0.75, (half16, halves[0])


def test_bad_ranges_and_missing_rows_are_refused(shard_set, tmp_path):
    with pytest.raises(ValueError, match="outside 0..6000"):
        load_item_rows(shard_set, 10, N_ITEMS + 2)
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shard_set, broken)
    m = json.loads((broken / "manifest.json").read_text())
    m["items"]["shards"] = m["items"]["shards"][1:]          # the first range's shard lost
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Exception, match="miss 200 of items 0..600"):
        load_item_rows(str(broken), 0, 601)
    load_item_rows(str(broken), 201, 601)                   # other ranges still load


# ---------------------------------------------------------------------- the torchrec tables
def _tables_worker(rank, ws, feature_dtype):
    import torch

    from dist.config import TablesConfig
    from dist.env import DistEnv
    from dist.tables import ShardedItemTables
    from mmm4rec.models.base import TableSpec

    rows = 101
    specs = [TableSpec("text", rows, 6, "feature"), TableSpec("modality_mask", rows, 2, "feature"),
             TableSpec("id_text", rows, 4, "trainable", "normal")]
    env = DistEnv(rank=rank, world_size=ws, local_rank=0, device=torch.device("cpu"))
    tables = ShardedItemTables(specs, TablesConfig(feature_dtype=feature_dtype), env, seed=3)
    g = np.random.default_rng(0)
    src = {"text": g.standard_normal((rows, 6)).astype(np.float32), "modality_mask": np.ones((rows, 2), np.float32)}
    lo, hi = tables.feature_rows()
    for a in range(lo, hi, 7):          # block by block, as dist/build.py does
        tables.load_features({k: v[a:min(hi, a + 7)] for k, v in src.items()}, row_offset=a)
    mine = tables.rows_of_range(*tables.local_range())
    looked = tables.lookup(torch.arange(*tables.local_range()))
    return {"range": tables.local_range(), "feature_rows": (lo, hi), "mine": {k: v.detach() for k, v in mine.items()},
            "looked": {k: v.detach() for k, v in looked.items()}, "text": torch.from_numpy(src["text"][lo:hi])}


@pytest.mark.parametrize("ws,feature_dtype", [(2, "fp32"), (3, "fp16")])
def test_each_rank_loads_and_reads_only_its_table_rows(ws, feature_dtype):
    import torch
    from test_catalog import run_group

    out = run_group(ws, _tables_worker, feature_dtype)
    assert [o["range"] for o in out] == even_ranges(101, ws) == [o["feature_rows"] for o in out]
    for o in out:
        tol = 1e-3 if feature_dtype == "fp16" else 0.0
        assert torch.allclose(o["mine"]["text"], o["text"], atol=tol, rtol=tol)
        for k in ("text", "modality_mask", "id_text"):      # the local read = torchrec's lookup
            assert torch.equal(o["mine"][k], o["looked"][k]), k
        assert o["mine"]["id_text"].abs().sum() > 0          # trainable rows initialised


def test_planner_is_told_the_memory_per_rank():
    """tables.memory_per_rank_gb reaches torchrec's planner: 10^6 items x (384 + 64)
    columns on 2 ranks (~0.9 GB of rows per rank) plan within 1 GB, not within 0.5 GB
    (a ConfigError naming the setting), and fp16 features fit 0.5 GB."""
    import torch

    from dist.config import TablesConfig
    from dist.tables import pack_specs, run_planner, table_planner
    from mmm4rec.config import ConfigError
    from mmm4rec.models.base import TableSpec

    class Env:
        world_size, device = 2, torch.device("cpu")

    packed = pack_specs([TableSpec("text", 1_000_001, 384, "feature"),
                         TableSpec("id_text", 1_000_001, 64, "trainable", "normal")])

    def plan(**kw):
        cfg = TablesConfig(**kw)
        root, sharders, planner = table_planner(packed, cfg, Env())
        return run_planner(lambda: planner.plan(root, sharders), cfg)

    plan(memory_per_rank_gb=1.0)
    with pytest.raises(ConfigError, match="memory_per_rank_gb=0.5"):
        plan(memory_per_rank_gb=0.5)
    plan(memory_per_rank_gb=0.5, feature_dtype="fp16")
