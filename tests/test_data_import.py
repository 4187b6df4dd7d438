"""Importers on the real data in ../shared/data (``MMM4REC_SHARED_DATA``): counts against
its README, the 5-core leave-one-out Scientific set, and feature joins by ASIN.

Skipped, with the reason shown, where the shared data is absent."""
from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pytest

from data_shards import (
    FeatureFile,
    build_shards,
    import_dataset,
    iter_sequences,
    read_manifest,
)
from data_shards.samples import expand

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MMM4REC_SHARED_DATA", REPO.parent / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (SHARED / "README.md").is_file(),
                                reason=f"shared real data not found at {SHARED} (set MMM4REC_SHARED_DATA)")


def read_index(path: Path) -> dict[str, int]:
    """A UniSRec ``<id>\t<index>`` file."""
    return {k: int(v) for k, v in (line.split("\t") for line in path.read_text().splitlines())}


def counts(data, raw=True):
    c = data.meta.counts_raw if raw else data.meta.counts
    return c["users"], c["items"], c["interactions"]


@pytest.mark.parametrize("folder,fmt,expected", [
    ("missrec_scientific_mm_subset", "unisrec", (2928, 1585, 19712)),
    ("lcrec_office_2014", "lcrec", (4905, 2420, 53258)),
    ("recbole_ml-100k", "recbole", (943, 1682, 100000)),
    ("fixtures/scientific_mm_tiny", "unisrec", (40, 271, 314)),
    ("fixtures/ml-100k_tiny", "recbole", (30, 1019, 3941)),
])
def test_counts_before_filtering_match_the_readme(folder, fmt, expected):
    data = import_dataset(fmt, SHARED / folder, k_core=0)
    assert counts(data) == expected
    assert counts(data, raw=False) == expected  # k_core=0 keeps everything


def test_unisrec_scientific_counts_and_capped_histories():
    """README: 8,442 users, 4,385 items, 59,384 interactions. The last number sums the
    test rows, whose histories UniSRec caps at 50 items: 3 users have longer sequences
    (80, 60 and 56), which the importer rebuilds from their train rows: 59,427 in all,
    the number the UniSRec paper reports."""
    data = import_dataset("unisrec", SHARED / "unisrec_scientific", k_core=0)
    users, items, inters = counts(data)
    assert (users, items) == (8442, 4385)
    lengths = data.sequences.lengths
    assert int(np.minimum(lengths, 51).sum()) == 59384
    assert inters == 59427
    assert sorted(lengths[lengths > 51].tolist()) == [56, 60, 80]
    assert data.meta.time_source == "position"
    s = data.sequences[0]
    assert s.times.tolist() == [float(i) for i in range(1, len(s.items) + 1)]


def test_five_core_leave_one_out_scientific_matches_the_unisrec_split():
    data = import_dataset("unisrec", SHARED / "unisrec_scientific")  # k_core=5
    assert counts(data, raw=False)[:2] == (8442, 4385)
    # Our leave-one-out train samples (history capped at 50) are exactly UniSRec's train rows.
    index, users = (read_index(SHARED / "unisrec_scientific" / f"Scientific.{k}2index") for k in ("item", "user"))
    to_src = np.array([-1] + [index[a] for a in data.items.item_ids[1:]])
    ours = collections.Counter()
    for s in data.sequences:
        for smp in expand(s.user, s.items, s.times, "train", 50):
            ours[(users[s.user_id], tuple(to_src[smp["history"]].tolist()), int(to_src[smp["target"]]))] += 1
    theirs = collections.Counter()
    for line in (SHARED / "unisrec_scientific" / "Scientific.train.inter").read_text().splitlines()[1:]:
        u, hist, t = line.split("\t")
        theirs[(int(u), tuple(int(x) for x in hist.split()), int(t))] += 1
    assert sum(theirs.values()) == 34101
    assert ours == theirs


def test_recbole_sorts_by_timestamp():
    data = import_dataset("recbole", SHARED / "recbole_ml-100k")
    assert data.meta.time_source == "timestamp"
    assert all((np.diff(s.times) >= 0).all() for s in data.sequences)
    assert data.sequences[0].times[0] > 8e8
    assert data.items.item_text[1].startswith("Toy Story")  # title, then genres, then the rest


def test_lcrec_item_text_uses_title_brand_categories_description():
    data = import_dataset("lcrec", SHARED / "lcrec_office_2014")
    assert data.items.item_text[2] == ("Northwestern Bell Big-Button Corded Phone Plus with 13-Number Memory "
                                       "(20200-1). Northwestern Bell. Office Electronics, Telephones & Accessories, "
                                       "Corded Telephones. VISUAL RING INDICATOR RAISED KEYSWITH BRAILLE KEYPAD "
                                       "13-NUMBER MEMORY SPEAKERPHONE WITH LED INDICATOR & VOLUME CONTROL POWER "
                                       "FAILURE PROTECTION TONE/PULSE DIALING HEARING AID COMPATIBLE (HAC) "
                                       "ADJUSTABLE RINGER VOLUME ADJUSTABLE HANDSET VOLUME LAST NUMBER REDIAL HOLD "
                                       "& PAUSE FUNCTION FLASH CAPABILITY DESK/WALL-MOUNTABLE WHITE")
    assert "&amp;" not in data.items.item_text[3]  # HTML entities are unescaped


def test_clip_image_features_join_the_full_scientific_set_by_asin(tmp_path):
    mm = SHARED / "missrec_scientific_mm_subset"
    feat = FeatureFile(str(mm / "Scientific.feat3CLS"), dim=512, ids=str(mm / "Scientific.item2index"),
                       encoder="CLIP ViT-B/32 image")
    data = import_dataset("unisrec", SHARED / "unisrec_scientific", image_features=feat)
    table = data.items
    assert table.image.shape == (4386, 512) and int(table.image_mask.sum()) == 1585
    assert not table.image[~table.image_mask].any()  # missing = zero row + False mask, never a fake vector
    raw = np.fromfile(mm / "Scientific.feat3CLS", dtype="<f4").reshape(-1, 512)
    rows = read_index(mm / "Scientific.item2index")
    for i in np.flatnonzero(table.image_mask)[::97]:
        np.testing.assert_array_equal(table.image[i], raw[rows[table.item_ids[i]]])
    manifest = build_shards(data, str(tmp_path / "sci"), shard_size=2000, progress=False)
    assert manifest["features"]["image"] == {"dim": 512, "dtype": "float32", "encoder": "CLIP ViT-B/32 image",
                                             "present": 1585}
    assert manifest["splits"]["train"]["samples"] == 34101
    assert read_manifest(str(tmp_path / "sci"))["dataset"]["source"]["files"]["Scientific.feat3CLS"]
    assert sum(1 for _ in iter_sequences(str(tmp_path / "sci"))) == 8442


SEQREC = {   # seqrec_benchmark/README.md: users, items, interactions
    "amazon2014-beauty": (22332, 12086, 198215),
    "amazon2014-toy": (19124, 11758, 165247),
    "amazon2018-game": (50597, 16874, 453637),
    "movielens-1m": (6040, 3416, 999611),
}


@pytest.mark.parametrize("name", list(SEQREC))
def test_seqrec_benchmark_counts_titles_and_real_timestamps(name):
    """The RecBole importer reads the seqrec_benchmark sets as they are: README counts,
    5-core already (the filter drops nothing), the title as item text, unix-second times."""
    data = import_dataset("recbole", SHARED / "seqrec_benchmark" / name)
    assert counts(data) == SEQREC[name] == counts(data, raw=False)
    assert data.meta.time_source == "timestamp" and data.meta.dropped == {}
    assert all((np.diff(s.times) >= 0).all() for s in data.sequences[:500])
    assert 8e8 < data.sequences.times.min() and data.sequences.times.max() < 1.6e9
    raw_titles = dict(line.split("\t", 1) for line in
                      (SHARED / "seqrec_benchmark" / name / f"{name}.item").read_text().splitlines()[1:])
    assert data.items.item_text[1] == raw_titles[data.items.item_ids[1]].strip()


def test_user_sample_per_domain_is_seeded_nested_and_recorded():
    """``max_users``: a seeded uniform draw of users (each keeps all its interactions with
    k_core=0); the same seed gives the same users, a smaller sample is inside a larger one."""
    path = SHARED / "seqrec_benchmark" / "amazon2014-toy"
    full = import_dataset("recbole", path, k_core=0)
    small = import_dataset("recbole", path, k_core=0, max_users=300, sample_seed=7)
    again = import_dataset("recbole", path, k_core=0, max_users=300, sample_seed=7)
    large = import_dataset("recbole", path, k_core=0, max_users=1000, sample_seed=7)
    other = import_dataset("recbole", path, k_core=0, max_users=300, sample_seed=8)
    users = lambda d: set(d.sequences.user_ids)   # noqa: E731
    assert len(users(small)) == 300 and users(small) == users(again) and users(small) < users(large)
    assert users(small) != users(other)
    assert small.meta.sample == {"max_users": 300, "seed": 7, "users_before": 19124}
    assert small.meta.counts_raw == full.meta.counts_raw
    by_id = {s.user_id: len(s.items) for s in full.sequences}
    assert all(len(s.items) == by_id[s.user_id] for s in small.sequences)   # whole histories
    assert small.meta.dropped["interactions_of_unsampled_users"] == \
        full.sequences.num_interactions - small.sequences.num_interactions
    assert import_dataset("recbole", path, k_core=0, max_users=10**6).meta.counts == full.meta.counts
    with pytest.raises(ValueError, match="max_users must be >= 1"):
        import_dataset("recbole", path, max_users=0)
