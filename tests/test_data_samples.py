"""The bundled samples (data/samples/) and ``ensure_sample_shards``: what the quickstart
and the core tests use, so nothing here needs ../shared."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from data_shards import (
    SequenceLoader,
    ensure_sample_shards,
    load_item_table,
    read_manifest,
)
from data_shards.bundled import SAMPLES_DIR
from data_shards.features import TextEncoder
from mmm4rec.paths import text_cache_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory, pytestconfig):
    """The three samples built once into one directory: ``out``, ``urls`` {name: url}, ``cpu``
    seconds, ``cold`` (whether the text cache was empty) and the ``cache`` directory.

    The text vectors are cached in ``mmm4rec.paths.text_cache_dir()``, so only a first run (``cold``)
    encodes. CPU time (all threads of this process), not wall time, is measured: other
    test sessions may share the machine's two cores."""
    out = tmp_path_factory.mktemp("samples")
    cache = text_cache_dir()   # the machine-wide cache the quickstart and dist tests share
    cold = not any(cache.rglob("*.npz"))
    t0 = time.process_time()
    urls = {n: ensure_sample_shards(n, out, cache_dir=cache, progress=False)
            for n in ("office", "scientific_mm", "amazon_mix")}
    return SimpleNamespace(out=out, urls=urls, cpu=time.process_time() - t0, cold=cold, cache=cache)


def test_bundle_is_small_and_documented():
    assert SAMPLES_DIR == REPO / "data" / "samples"
    for f in SAMPLES_DIR.rglob("*"):
        if f.is_file():
            assert f.stat().st_size < 4 * 2**20, f
    assert sum(f.stat().st_size for f in (SAMPLES_DIR / "office").iterdir()) < 2**20
    text = (SAMPLES_DIR / "PROVENANCE.md").read_text()
    for needle in ("KIKIENAO/decorec", "3d93ec58", "yuyq18/APAO", "aa08fcfa", "Apache-2.0", "derive.py"):
        assert needle in text
    assert not any("ml-100k" in str(p) or "movielens" in str(p).lower() for p in SAMPLES_DIR.rglob("*"))


def test_samples_share_the_feature_layout(built):
    urls = built.urls
    # reported, not asserted: speed is the benchmarks' business (docs/data.md)
    print(f"building the samples took {built.cpu:.0f} CPU seconds (cold text cache: {built.cold})")
    office, sci, mix = (read_manifest(urls[n]) for n in ("office", "scientific_mm", "amazon_mix"))
    for m in (office, sci, mix):
        assert m["features"]["text"]["dim"] == 384 and m["features"]["image"]["dim"] == 512
        assert m["features"]["text"]["encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (office["num_users"], office["num_items"], office["num_interactions"]) == (1499, 398, 17284)
    assert (sci["num_users"], sci["num_items"], sci["num_interactions"]) == (2928, 1585, 19712)
    assert office["features"]["image"]["present"] == 0 and sci["features"]["image"]["present"] == 1585
    # amazon_mix: the four folders' counts of PROVENANCE.md, mixed as separate domains (ids prefixed)
    assert (mix["num_users"], mix["num_items"], mix["num_interactions"]) == (346 + 220 + 369 + 394, 473, 9514)
    assert mix["features"]["image"]["present"] == 0
    table = load_item_table(urls["amazon_mix"])
    assert sorted(set(table.domain[1:])) == ["amazon2014-beauty", "amazon2014-health", "amazon2014-toy",
                                             "amazon2018-game"]
    assert table.image.shape == (474, 512) and not table.image.any() and table.text_mask[1:].all()


def test_item_tables(built):
    urls = built.urls
    office, sci = load_item_table(urls["office"]), load_item_table(urls["scientific_mm"])
    assert office.image.shape == (399, 512) and not office.image_mask.any() and not office.image.any()
    assert office.text_mask[1:].all() and not office.text_mask[0]
    norms = np.linalg.norm(sci.text[1:], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # MiniLM vectors are normalised
    raw = np.fromfile(SAMPLES_DIR / "scientific_mm" / "Scientific.feat3CLS", dtype="<f4").reshape(-1, 512)
    index = dict(line.split("\t") for line in (SAMPLES_DIR / "scientific_mm" / "Scientific.item2index").read_text()
                 .splitlines())
    for i in (1, 2, 777, 1585):
        np.testing.assert_array_equal(sci.image[i], raw[int(index[sci.item_ids[i]])])
    assert (sci.domain[1:] == "scientific_mm").all() and sci.item_ids[0] == ""


def test_rebuild_is_a_no_op_and_a_forced_rebuild_does_not_re_encode(built, monkeypatch):
    out, urls = built.out, built.urls
    before = (Path(urls["office"]) / "manifest.json").stat().st_mtime_ns
    assert ensure_sample_shards("office", out, progress=False) == urls["office"]
    assert (Path(urls["office"]) / "manifest.json").stat().st_mtime_ns == before

    def no_model(self):
        raise AssertionError("the text cache should have made encoding unnecessary")

    monkeypatch.setattr(TextEncoder, "model", no_model)
    old = read_manifest(urls["office"])
    ensure_sample_shards("office", out, cache_dir=built.cache, force=True, progress=False)
    new = read_manifest(urls["office"])
    assert [s["sha256"] for s in new["items"]["shards"]] == [s["sha256"] for s in old["items"]["shards"]]


def test_samples_stream(built):
    urls = built.urls
    for url in urls.values():
        loader = SequenceLoader(url, "train", batch_size=128, max_len=20, num_workers=0)
        n = sum(int(b["weight"].sum()) for b in loader)
        assert n == read_manifest(url)["splits"]["train"]["samples"]


def test_unknown_sample_name(tmp_path):
    with pytest.raises(ValueError, match="unknown sample dataset 'movies'"):
        ensure_sample_shards("movies", tmp_path)


def _build_office(out: str) -> str:
    return ensure_sample_shards("office", out, progress=False)


def test_concurrent_builders_never_expose_a_partial_shard_set(tmp_path, built):
    """Ranks, test sessions and Slurm jobs share the sample cache: builders racing on
    one directory all return the same, complete, verified shard set."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=ctx) as pool:
        urls = list(pool.map(_build_office, [str(tmp_path)] * 3))
    assert len(set(urls)) == 1
    assert load_item_table(urls[0]).num_items == load_item_table(built.urls["office"]).num_items
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dirs left


def test_amazon_mix_sample_is_documented_and_imports(tmp_path):
    """data/samples/amazon_mix: four Amazon domains (never MovieLens), sha256 as in
    PROVENANCE.md, 5-core with real timestamps; where ../shared is present, derive.py
    re-creates it byte for byte."""
    import hashlib
    import importlib.util
    import os

    from data_shards import import_dataset

    mix = SAMPLES_DIR / "amazon_mix"
    text = (SAMPLES_DIR / "PROVENANCE.md").read_text()
    assert "Tiny-Snow/SeqRecBenchmark-Datasets" in text and "3bc413ed" in text
    files = sorted(mix.glob("*/*"))
    assert [f.parent.name for f in files[::2]] == ["amazon2014-beauty", "amazon2014-health", "amazon2014-toy",
                                                   "amazon2018-game"]
    for f in files:
        assert f"`{f.name}` {hashlib.sha256(f.read_bytes()).hexdigest()}" in text, f
    for d in sorted(mix.iterdir()):
        data = import_dataset("recbole", d)
        assert data.meta.counts == data.meta.counts_raw and data.meta.time_source == "timestamp"
    shared = Path(os.environ.get("MMM4REC_SHARED_DATA", REPO.parent / "shared" / "data")) / "seqrec_benchmark"
    if not shared.is_dir():
        pytest.skip(f"re-derivation not checked: real data not found at {shared} (set MMM4REC_SHARED_DATA)")
    spec = importlib.util.spec_from_file_location("derive", SAMPLES_DIR / "derive.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    for d in derive.MIX_DOMAINS:
        derive.derive_mix_domain(shared / d, tmp_path / d)
        for f in (mix / d).iterdir():
            assert (tmp_path / d / f.name).read_bytes() == f.read_bytes(), f
