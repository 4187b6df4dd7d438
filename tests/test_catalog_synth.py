"""Synthetic shard sets written range by range (``data_shards.synthetic``, ``mmm4rec data
synth``): the same shard set as the normal builder writes from the materialised data,
rows independent of the range asked for, each rank's rows readable alone, and memory
bounded by one item shard while writing."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from data_shards import build_shards, iter_sequences, load_item_rows, load_item_table, read_manifest
from data_shards.synthetic import build_synthetic, synthetic_data, synthetic_item_block
from mmm4rec.catalog import even_ranges

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS, USERS, DIM, PER_SHARD = 10_000, 60, 24, 1_500


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_streamed_set_equals_the_builders_from_the_materialised_data(tmp_path, dtype):
    """Byte for byte: every shard and the manifest."""
    kw = {"text_dim": DIM, "min_len": 3, "max_len": 9, "skew": 1.5, "seed": 5}
    streamed = tmp_path / "streamed"
    build_synthetic(str(streamed), N_ITEMS, USERS, feature_dtype=dtype, shard_size=25, items_per_shard=PER_SHARD,
                    progress=False, **kw)
    built = tmp_path / "built"
    build_shards(synthetic_data(N_ITEMS, USERS, **kw), str(built), shard_size=25, items_per_shard=PER_SHARD,
                 seed=5, progress=False, feature_dtype=dtype)
    a, b = _digests(streamed), _digests(built)
    assert len(a) == 1 + 3 + -(-N_ITEMS // PER_SHARD)
    assert a == b
    m = read_manifest(str(streamed))
    assert m["features"]["text"] == {"dim": DIM, "dtype": dtype, "encoder": f"synthetic N(0, 1/{DIM})",
                                     "present": N_ITEMS}
    assert m["features"]["image"]["dim"] == 0 and m["num_items"] == N_ITEMS and m["num_users"] == USERS
    seqs = list(iter_sequences(str(streamed)))
    assert len(seqs) == USERS and all(3 <= len(s["items"]) <= 9 for s in seqs)
    assert all(np.all(np.diff(s["times"]) > 0) for s in seqs)
    # the popularity skew: the lower half of the ids is drawn more often than the upper half
    ids = np.concatenate([s["items"] for s in seqs])
    assert (ids <= N_ITEMS // 2).mean() > 0.6


def test_rows_do_not_depend_on_the_range_asked_for():
    whole = synthetic_item_block(1, 9_001, 8, seed=2)["text"]
    for lo, hi in [(1, 2), (4_095, 4_098), (4_096, 8_193), (777, 9_001)]:
        np.testing.assert_array_equal(synthetic_item_block(lo, hi, 8, seed=2)["text"], whole[lo - 1:hi - 1])
    assert not np.array_equal(synthetic_item_block(1, 100, 8, seed=3)["text"], whole[:99])
    norms = np.linalg.norm(whole, axis=1)
    assert 0.5 < norms.mean() < 1.5 and np.isfinite(whole).all()


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_each_rank_reads_its_rows_of_a_streamed_set_in_16_bit(tmp_path_factory, ws):
    out = tmp_path_factory.mktemp("synth") / f"s{ws}"
    build_synthetic(str(out), N_ITEMS, USERS, text_dim=DIM, seed=1, items_per_shard=PER_SHARD, progress=False)
    full = load_item_table(str(out))          # float32 copy of the stored fp16 rows
    want = synthetic_item_block(1, N_ITEMS + 1, DIM, seed=1)["text"].astype(np.float16)
    np.testing.assert_array_equal(full.text[1:], want.astype(np.float32))
    for lo, hi in even_ranges(N_ITEMS + 1, ws):
        rows = load_item_rows(str(out), lo, hi, dtype=np.float16)
        assert rows.text.dtype == np.float16 and rows.text.shape == (hi - lo, DIM)
        np.testing.assert_array_equal(rows.text, full.text[lo:hi].astype(np.float16))
        assert rows.text_mask.tolist() == [i > 0 for i in range(lo, hi)] and not rows.image_mask.any()


def test_writing_memory_is_one_item_shard_not_the_catalog(tmp_path):
    """Peak Python allocations while writing 20x and 80x the items of one shard: the same
    (a shard's rows, its tar and the sequences), far below the catalog's float32 size."""
    def peak(n_items: int) -> int:
        tracemalloc.start()
        try:
            build_synthetic(str(tmp_path / f"m{n_items}"), n_items, 20, text_dim=64, items_per_shard=1_000,
                            progress=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    small, large = peak(20_000), peak(80_000)
    catalog = 80_000 * 64 * 4
    assert large < 0.25 * catalog, (large, catalog)
    assert large < 1.5 * small, (small, large)


def test_data_synth_command(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "data_shards.cli", "data", "synth", "--items", "3000", "--users", "30",
                        "--text-dim", "16", "--items-per-shard", "1000", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3,000" in r.stdout or "3000" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert [s["first_item"] for s in m["items"]["shards"]] == [1, 1001, 2001]
    assert m["features"]["text"]["dtype"] == "float16"
    bad = subprocess.run([sys.executable, "-m", "data_shards.cli", "data", "synth", "--items", "10", "--users", "3",
                          "--min-len", "1", "--out", str(tmp_path / "bad")], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "min_len" in bad.stderr
    h = subprocess.run([sys.executable, "-m", "data_shards.cli", "data", "synth", "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert h.returncode == 0 and "--items" in h.stdout


def test_inspect_verify_reads_block_by_block_and_names_a_non_finite_item(tmp_path, capsys):
    """``data inspect --verify`` checks every feature row range by range (no whole-table
    read) and names the item whose features are not finite."""
    import io

    from data_shards import cli
    from data_shards.shards import _npy, _tar_bytes, read_shard_records
    from data_shards.storage import Store

    out = tmp_path / "nan"
    build_synthetic(str(out), 3000, 20, text_dim=8, items_per_shard=1000, progress=False)
    assert cli.main(["data", "inspect", str(out), "--verify"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    entry = m["items"]["shards"][1]                          # items 1001..2000
    (rec,) = read_shard_records(Store(str(out)), entry)
    text = np.load(io.BytesIO(rec["text.npy"]))
    text[233, 5] = np.nan                                    # item 1234
    rec = {k: v for k, v in rec.items() if not k.startswith("__") or k == "__key__"}
    rec["text.npy"] = _npy(text)
    blob = _tar_bytes([rec])
    (out / entry["path"]).write_bytes(blob)
    entry.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (out / "manifest.json").write_text(json.dumps(m))
    assert cli.main(["data", "inspect", str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "item 1234" in err and "not finite" in err, err
