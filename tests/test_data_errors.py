"""Bad input: every case gives an error naming the file/shard and the record, and
``skip_bad`` skips bad records and reports how many, where and why."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_shards import (
    DataError,
    FeatureFile,
    ManifestError,
    SequenceLoader,
    ShardError,
    build_shards,
    import_dataset,
    load_item_table,
    read_manifest,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


@pytest.fixture
def sci(tmp_path) -> Path:
    """An editable copy of the scientific_mm sample without its (large) feature files."""
    d = tmp_path / "sci"
    d.mkdir()
    for f in (SAMPLES / "scientific_mm").iterdir():
        if "feat" not in f.name:
            shutil.copy(f, d / f.name)
    return d


def edit_line(path: Path, line_no: int, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line_no - 1] = new + "\n"
    path.write_text("".join(lines))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "office"
    build_shards(import_dataset("lcrec", SAMPLES / "office"), str(out), shard_size=400, progress=False)
    return out


def fresh_copy(shards: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(shards, dst)
    return dst


# ----------------------------------------------------------------------------- import

def test_missing_file_is_named(sci):
    (sci / "Scientific.item2index").unlink()
    with pytest.raises(DataError, match=r"Scientific\.item2index: missing file"):
        import_dataset("unisrec", sci)
    with pytest.raises(DataError, match=r"no_such_dir: missing directory"):
        import_dataset("lcrec", sci.parent / "no_such_dir")
    with pytest.raises(DataError, match=r"meta_X\.json\.gz: missing file"):
        (sci.parent / "X.csv").write_text("a,b,1,2\n")
        import_dataset("amazon2018", sci.parent / "X.csv")


def test_malformed_row_names_file_line_and_field(sci, tmp_path):
    edit_line(sci / "Scientific.test.inter", 5, "3\t1 2 x\t4")
    with pytest.raises(DataError, match=r"Scientific\.test\.inter:5: malformed row: invalid literal for int\(\).*'x'"):
        import_dataset("unisrec", sci)
    (tmp_path / "r.csv").write_text("B1,u1,5.0,100\nB2,u1,5.0\n")
    with gzip.open(tmp_path / "meta_r.json.gz", "wt") as f:
        f.write(json.dumps({"asin": "B1", "title": "t"}) + "\n")
    with pytest.raises(DataError, match=r"r\.csv:2: malformed row: expected 'item,user,rating,timestamp', got 3"):
        import_dataset("amazon2018", tmp_path / "r.csv")
    (tmp_path / "lc").mkdir()
    (tmp_path / "lc" / "D.inter.json").write_text('{"0": [0, 1,\n 2}')
    (tmp_path / "lc" / "D.item.json").write_text("{}")
    with pytest.raises(DataError, match=r"D\.inter\.json:2: not valid JSON"):
        import_dataset("lcrec", tmp_path / "lc")


def test_unknown_item_id_is_named(sci, tmp_path):
    edit_line(sci / "Scientific.valid.inter", 3, "1\t14 15 99999\t16")
    with pytest.raises(DataError, match=r"Scientific\.valid\.inter:3: unknown item id 99999 \(not in item2index\)"):
        import_dataset("unisrec", sci)
    src = SAMPLES / "office"
    inter = json.loads((src / "Office.inter.json").read_text())
    first = next(iter(inter))
    inter[first][2] = 123456
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "Office.inter.json").write_text(json.dumps(inter))
    shutil.copy(src / "Office.item.json", tmp_path / "o")
    with pytest.raises(DataError, match=rf"Office\.inter\.json: user {first}: unknown item id 123456"):
        import_dataset("lcrec", tmp_path / "o")


def test_feature_dimension_mismatch_is_named(tmp_path):
    feat = SAMPLES / "scientific_mm" / "Scientific.feat3CLS"
    with pytest.raises(DataError, match=r"Scientific\.feat3CLS: feature-dimension mismatch: 3246080 bytes is not "
                                        r"a whole number of float32 rows of dim 500"):
        import_dataset("unisrec", SAMPLES / "scientific_mm", image_features=FeatureFile(str(feat), dim=500))
    np.save(tmp_path / "f.npy", np.zeros((1585, 6), np.float32))
    with pytest.raises(DataError, match=r"f\.npy: feature-dimension mismatch: file has dim 6, expected 8"):
        import_dataset("unisrec", SAMPLES / "scientific_mm",
                       image_features=FeatureFile(str(tmp_path / "f.npy"), dim=8))
    np.save(tmp_path / "short.npy", np.zeros((10, 6), np.float32))
    with pytest.raises(DataError, match=r"short\.npy: has 10 rows but the dataset's own item index maps item"):
        import_dataset("unisrec", SAMPLES / "scientific_mm", image_features=FeatureFile(str(tmp_path / "short.npy")))


def test_skip_bad_skips_and_reports_how_many_where_and_why(sci):
    edit_line(sci / "Scientific.test.inter", 5, "3\t1 2 x\t4")               # malformed
    edit_line(sci / "Scientific.test.inter", 9, "7\t1 2 99999\t4")           # unknown item
    edit_line(sci / "Scientific.text", 4, "B000NOT_AN_ITEM\tsome text")      # unknown item (text file)
    with pytest.raises(DataError):  # off by default
        import_dataset("unisrec", sci)
    data = import_dataset("unisrec", sci, skip_bad=True, k_core=0)
    bad = data.meta.bad_records
    assert bad["skipped"] == 3
    assert bad["by_reason"] == {"malformed row": 1, "unknown item id": 2}
    wheres = [e["where"] for e in bad["examples"]]
    assert any(w.endswith("Scientific.test.inter:5") for w in wheres)
    assert any(w.endswith("Scientific.test.inter:9") for w in wheres)
    assert any(w.endswith("Scientific.text:4") for w in wheres)
    assert data.num_users == 2928 - 2  # the two users whose test rows were bad
    assert sum(t == "" for t in data.items.item_text[1:]) == 1  # the item whose text row was replaced


# ----------------------------------------------------------------------------- shards

def test_checksum_mismatch_names_the_shard(shards, tmp_path):
    d = fresh_copy(shards, tmp_path)
    shard = d / "sequences" / "seq-00001.tar"
    blob = bytearray(shard.read_bytes())
    blob[700] ^= 0xFF  # inside the first record's JSON
    shard.write_bytes(bytes(blob))
    loader = SequenceLoader(str(d), "test", batch_size=64, num_workers=0)
    with pytest.raises(ShardError, match=r"sequences/seq-00001\.tar: checksum mismatch: sha256 [0-9a-f]{64} but "
                                         r"the manifest says"):
        list(loader)
    item = d / "items" / "items-00000.tar"
    item.write_bytes(item.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ShardError, match=r"items/items-00000\.tar: checksum mismatch"):
        load_item_table(str(d))


def test_truncated_or_corrupt_tar_names_the_shard(shards, tmp_path):
    d = fresh_copy(shards, tmp_path)
    shard = d / "sequences" / "seq-00002.tar"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:len(blob) // 2 + 100])  # cut inside a member
    with pytest.raises(ShardError, match=r"seq-00002\.tar: checksum mismatch"):
        list(SequenceLoader(str(d), "test", batch_size=64, num_workers=0))
    with pytest.raises(ShardError, match=r"seq-00002\.tar: truncated or corrupt (tar|shard)"):
        list(SequenceLoader(str(d), "test", batch_size=64, num_workers=0, verify=False))
    shard.write_bytes(blob[:512 * 8])  # cut at a member boundary: fewer records than the manifest lists
    with pytest.raises(ShardError,
                       match=r"seq-00002\.tar: truncated or corrupt shard: \d+ records, the manifest says 400"):
        list(SequenceLoader(str(d), "test", batch_size=64, num_workers=0, verify=False))
    shard.write_bytes(b"\x00garbage" * 300)
    with pytest.raises(ShardError, match=r"seq-00002\.tar: truncated or corrupt tar"):
        list(SequenceLoader(str(d), "test", batch_size=64, num_workers=0, verify=False))
    shard.unlink()
    with pytest.raises(ShardError, match=r"seq-00002\.tar: missing file"):
        list(SequenceLoader(str(d), "test", batch_size=64, num_workers=0))


def test_errors_in_loader_workers_reach_the_caller(shards, tmp_path):
    d = fresh_copy(shards, tmp_path)
    (d / "sequences" / "seq-00000.tar").write_bytes(b"not a tar")
    with pytest.raises(ShardError, match=r"(?s)in DataLoader worker process.*seq-00000\.tar: checksum mismatch"):
        list(SequenceLoader(str(d), "train", batch_size=64, num_workers=2))


def test_manifest_from_a_newer_schema_or_missing(shards, tmp_path):
    d = fresh_copy(shards, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"manifest\.json: schema_version 99 is newer than this reader supports "
                                            r"\(1\)"):
        SequenceLoader(str(d), "train")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        read_manifest(str(d))
    (d / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"manifest\.json: missing manifest"):
        load_item_table(str(d))
