"""Formats and processing on small files written here in the exact source formats
(Amazon 2018 raw, RecBole atomic), feature files in every supported container, and
multi-domain mixes of the bundled samples."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import (
    FeatureFile,
    ItemTable,
    SequenceLoader,
    build_shards,
    combine_domains,
    import_dataset,
    load_item_table,
)
from data_shards.formats import item_text_from_fields

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def write_amazon(tmp: Path, ratings: list[str], meta: list[dict | str]) -> tuple[Path, Path]:
    csv = tmp / "Industrial_and_Scientific.csv"
    csv.write_text("".join(r + "\n" for r in ratings))
    meta_path = tmp / "meta_Industrial_and_Scientific.json.gz"
    with gzip.open(meta_path, "wt", encoding="utf-8") as f:
        for m in meta:
            f.write((m if isinstance(m, str) else json.dumps(m)) + "\n")
    return csv, meta_path


def amazon_meta(asin: str, title: str) -> dict:
    return {"asin": asin, "title": title, "brand": "Acme", "category": ["Industrial & Scientific", "Lab"],
            "description": ["Great &amp; sturdy.", "Two parts."], "imageURL": [], "rank": "1 in Lab"}


def test_amazon2018_time_sort_metadata_filter_k_core_and_remap(tmp_path):
    ratings = [
        # item,user,rating,timestamp -- u1's rows out of time order; X has no metadata
        "B3,u1,5.0,300", "B1,u1,4.0,100", "B2,u1,3.0,200", "X9,u1,5.0,150",
        "B1,u2,5.0,10", "B2,u2,5.0,20", "B3,u2,5.0,20",
        "B2,u3,1.0,7", "B1,u3,2.0,8", "B3,u3,2.0,9",
        "B1,u4,5.0,1", "B4,u4,5.0,2",  # u4 has 2 rows and B4 one: both fall to the 3-core
    ]
    meta = [amazon_meta(a, f"Widget {a}") for a in ("B1", "B2", "B3", "B4")]
    csv, meta_path = write_amazon(tmp_path, ratings, meta)
    data = import_dataset("amazon2018", csv, meta=meta_path, k_core=3)
    assert data.meta.counts_raw == {"users": 4, "items": 5, "interactions": 12}
    assert data.meta.counts == {"users": 3, "items": 3, "interactions": 9}
    assert data.meta.dropped == {"interactions_without_item_metadata": 1, "interactions_below_k_core": 2}
    assert data.meta.time_source == "timestamp" and data.meta.name == "Industrial_and_Scientific"
    # items numbered 1.. in first-seen order of the ratings file: B3, B1, B2
    assert list(data.items.item_ids) == ["", "B3", "B1", "B2"]
    s = {seq.user_id: seq for seq in data.sequences}
    assert s["u1"].items.tolist() == [2, 3, 1] and s["u1"].times.tolist() == [100, 200, 300]
    assert s["u2"].items.tolist() == [2, 3, 1]  # equal timestamps keep file order
    assert data.items.item_text[2] == ("Widget B1. Acme. Industrial & Scientific, Lab. "
                                       "Great & sturdy. Two parts")
    assert data.meta.source["files"].keys() == {csv.name, meta_path.name}


def test_recbole_typed_header_and_item_text(tmp_path):
    (tmp_path / "toy.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                        + "".join(f"{u}\t{i}\t1\t{100 * u + t}\n" for u in (1, 2)
                                                  for t, i in enumerate((11, 12, 13))))
    (tmp_path / "toy.item").write_text("item_id:token\tyear:token\ttitle:token_seq\tgenre:token_seq\n"
                                       "11\t1999\tThe Matrix\tAction SciFi\n12\t1995\tHeat\tCrime\n"
                                       "13\t2001\tAmelie\tComedy\n")
    data = import_dataset("recbole", tmp_path, k_core=2)
    assert data.meta.counts == {"users": 2, "items": 3, "interactions": 6}
    assert data.items.item_text[1] == "The Matrix. Action SciFi. 1999"
    no_time = import_dataset("recbole", tmp_path, k_core=0, time_field="no_such_field")
    assert no_time.meta.time_source == "position"


def test_item_text_builder():
    assert item_text_from_fields("A &amp; B.", "", ["x", ["y", "z"]], None) == "A & B. x, y, z"
    assert item_text_from_fields(None, None, None, None) == ""


@pytest.fixture(scope="module")
def matrix_and_ids(tmp_path_factory):
    """A [10, 6] feature matrix whose rows belong to 10 office items (by LC-Rec id), shuffled."""
    tmp = tmp_path_factory.mktemp("feats")
    office = import_dataset("lcrec", SAMPLES / "office")
    rng = np.random.default_rng(0)
    picked = list(rng.choice(office.items.item_ids[1:], 10, replace=False))
    mat = rng.standard_normal((10, 6)).astype(np.float32)
    ids = tmp / "feat.ids"
    ids.write_text("".join(f"{k}\t{r}\n" for r, k in enumerate(picked)))
    return tmp, mat, ids, picked


@pytest.mark.parametrize("fmt", ["raw", "npy", "safetensors", "pt", "pt-dict"])
def test_feature_files_join_by_original_id(matrix_and_ids, fmt):
    tmp, mat, ids, picked = matrix_and_ids
    key = None
    if fmt == "raw":
        path = tmp / "f.bin"
        mat.astype("<f4").tofile(path)
    elif fmt == "npy":
        path = tmp / "f.npy"
        np.save(path, mat)
    elif fmt == "safetensors":
        from safetensors.numpy import save_file

        path, key = tmp / "f.safetensors", "image"
        save_file({"image": mat, "other": mat[:2]}, str(path))
    elif fmt == "pt":
        path = tmp / "f.pt"
        torch.save(torch.from_numpy(mat), path)
    else:
        path, key = tmp / "fd.pt", "feats"
        torch.save({"feats": torch.from_numpy(mat)}, path)
    ff = FeatureFile(str(path), dim=6 if fmt == "raw" else None, ids=str(ids), key=key)
    data = import_dataset("lcrec", SAMPLES / "office", image_features=ff)
    t = data.items
    assert t.image_dim == 6 and int(t.image_mask.sum()) == 10 and t.image_encoder == path.name
    for r, k in enumerate(picked):
        i = list(t.item_ids).index(k)
        assert t.image_mask[i]
        np.testing.assert_array_equal(t.image[i], mat[r])
    assert not t.image[~t.image_mask].any()


def test_pt_files_load_only_through_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"feats": torch.zeros(2, 3), "obj": _Opaque()}, path)
    from data_shards import DataError

    with pytest.raises(DataError, match=r"evil\.pt.*weights_only=True"):
        import_dataset("lcrec", SAMPLES / "office", image_features=FeatureFile(str(path), key="feats",
                                                                              ids=str(path)))


class _Opaque:
    """A pickled class: refused by torch.load(weights_only=True)."""


def test_combine_domains_prefixes_ids_and_pads_missing_images(tmp_path):
    office = import_dataset("lcrec", SAMPLES / "office", domain="office")
    sci = import_dataset("unisrec", SAMPLES / "scientific_mm", domain="scientific_mm",
                         image_features=FeatureFile(str(SAMPLES / "scientific_mm" / "Scientific.feat3CLS"), dim=512))
    mix = combine_domains([office, sci])
    assert mix.num_users == office.num_users + sci.num_users
    assert mix.num_items == office.num_items + sci.num_items
    assert mix.items.item_ids[1] == f"office:{office.items.item_ids[1]}"
    assert mix.items.item_ids[office.num_items + 1] == f"scientific_mm:{sci.items.item_ids[1]}"
    assert not mix.items.image_mask[1:office.num_items + 1].any()
    assert mix.items.image_mask[office.num_items + 1:].all()
    u = office.num_users  # first scientific user: its items are shifted past office's
    np.testing.assert_array_equal(mix.sequences[u].items, sci.sequences[0].items + office.num_items)
    assert mix.sequences[u].user_id == f"scientific_mm:{sci.sequences[0].user_id}"
    assert mix.sequences[u].domain == "scientific_mm"
    assert mix.meta.counts["interactions"] == 17284 + 19712
    manifest = build_shards(mix, str(tmp_path / "mix"), shard_size=500, progress=False)
    table = load_item_table(str(tmp_path / "mix"))
    assert list(table.domain[[1, mix.num_items]]) == ["office", "scientific_mm"]
    # shards mix domains: users are spread over shards at random
    first = SequenceLoader(str(tmp_path / "mix"), "test", batch_size=500, num_workers=0)
    doms = {mix.sequences[int(u)].domain for u in next(iter(first))["user"][:500]}
    assert doms == {"office", "scientific_mm"}
    assert manifest["dataset"]["domains"][0]["name"] == "office"


def test_combine_domains_refuses_different_text_dims():
    a = import_dataset("lcrec", SAMPLES / "office", domain="a")
    b = import_dataset("lcrec", SAMPLES / "office", domain="b")
    b.items = b.items.with_features(text=np.zeros((b.num_items + 1, 4), np.float32),
                                    text_mask=np.zeros(b.num_items + 1, bool))
    with pytest.raises(ValueError, match="text dims differ: a=0, b=4"):
        combine_domains([a, b])


def test_item_table_invariants():
    with pytest.raises(ValueError, match="row 0 is padding"):
        ItemTable(text=np.zeros((3, 2)), text_mask=np.array([True, True, False]))
    with pytest.raises(ValueError, match=r"image: expected \[3, dim\]"):
        ItemTable(text=np.zeros((3, 2)), text_mask=np.zeros(3, bool), image=np.zeros((2, 4)))
    t = ItemTable(text=np.zeros((3, 2)), text_mask=np.zeros(3, bool))
    assert (t.num_items, t.text_dim, t.image_dim, t.image_mask.tolist()) == (2, 2, 0, [False] * 3)
