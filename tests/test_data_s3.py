"""Shards on a real S3 endpoint (moto's server on 127.0.0.1, see ``s3_server.py``):
written there, read back identical to the local copy, streamed by ranks and workers."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from s3_server import s3_server  # noqa: F401  (session fixture)

from data_shards import (
    SequenceLoader,
    ShardError,
    ShardsConfig,
    StorageError,
    build_shards,
    import_dataset,
    iter_sequences,
    load_item_table,
    read_manifest,
)
from data_shards.features import FeatureFile

pytestmark = pytest.mark.s3
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


@pytest.fixture(scope="module")
def sets(s3_server, tmp_path_factory):  # noqa: F811
    """The scientific_mm sample (with its CLIP image features) built to disk and to S3."""
    sci = SAMPLES / "scientific_mm"
    data = import_dataset("unisrec", sci, image_features=FeatureFile(str(sci / "Scientific.feat3CLS"), dim=512))
    local = str(tmp_path_factory.mktemp("local") / "sci")
    remote = s3_server.make_bucket("mmm4rec-test") + "/shards/sci"
    kw = dict(shard_size=300, items_per_shard=600, progress=False)
    return (build_shards(data, local, **kw), local,
            build_shards(data, remote, storage_options=s3_server.storage_options, **kw), remote)


def test_s3_copy_is_identical_to_the_local_copy(sets, s3_server):  # noqa: F811
    m_local, local, m_s3, remote = sets
    opts = s3_server.storage_options
    assert m_s3 == m_local
    assert read_manifest(remote, opts) == m_local
    a, b = load_item_table(local), load_item_table(remote, opts)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.text_mask, b.text_mask)
    assert list(a.item_ids) == list(b.item_ids) and b.image_mask.sum() == 1585
    ra, rb = list(iter_sequences(local)), list(iter_sequences(remote, opts))
    assert len(ra) == len(rb) == 2928
    assert all(x["user"] == y["user"] and (x["items"] == y["items"]).all() for x, y in zip(ra, rb))


def test_s3_stream_matches_local_stream_batch_for_batch(sets, s3_server):  # noqa: F811
    _, local, _, remote = sets
    kw = dict(batch_size=128, max_len=20, num_workers=2, rank=1, world_size=2, seed=5, shuffle_buffer=2000)
    got = list(SequenceLoader(remote, "train", storage_options=s3_server.storage_options, **kw))
    want = list(SequenceLoader(local, "train", **kw))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=0, atol=0)


def test_two_ranks_two_workers_from_s3_exactly_once(sets, s3_server, monkeypatch):  # noqa: F811
    """Endpoint and credentials from the standard AWS variables, the rest from the config."""
    _, _, manifest, remote = sets
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    cfg = ShardsConfig(url=remote, batch_size=100, max_len=10, num_workers=2, seed=1)
    seen = collections.Counter()
    for rank in range(2):
        for b in SequenceLoader(cfg, "train", rank=rank, world_size=2):
            w = b["weight"] > 0
            seen.update(zip(b["user"][w].tolist(), b["target_time"][w].tolist()))
    assert sum(seen.values()) == len(seen) == manifest["splits"]["train"]["samples"]


def test_checksum_mismatch_on_s3_names_the_object(sets, s3_server, tmp_path):  # noqa: F811
    import s3fs

    _, local, _, _ = sets
    opts = s3_server.storage_options
    url = "s3://mmm4rec-test/shards/tampered"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.put(local, url.removeprefix("s3://"), recursive=True)
    manifest = json.loads(fs.cat_file(f"{url}/manifest.json"))
    fs.pipe_file(f"{url}/{manifest['sequences']['shards'][3]['path']}", b"x" * 1024)
    with pytest.raises(ShardError, match=r"s3://mmm4rec-test/shards/tampered/sequences/seq-00003\.tar: checksum "
                                         r"mismatch"):
        list(SequenceLoader(url, "test", batch_size=512, num_workers=0, storage_options=opts))


def test_storage_config_maps_to_s3fs_options(s3_server):  # noqa: F811
    from mmm4rec.config import from_dict

    cfg = from_dict(ShardsConfig, {"url": "s3://mmm4rec-test/shards/sci", "storage": {
        "endpoint_url": s3_server.endpoint_url, "key": "testing", "secret": "testing"}})
    assert cfg.storage.to_options() == s3_server.storage_options
    assert SequenceLoader(cfg, "valid").num_samples == 2928


def test_writing_to_a_missing_bucket_names_it(s3_server):  # noqa: F811
    data = import_dataset("lcrec", SAMPLES / "office")
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x/sequences/seq-00000\.tar \(endpoint "
                                           r"http://127\.0\.0\.1:\d+\): no such bucket \(The specified bucket does not "
                                           r"exist\)"):
        build_shards(data, "s3://no-such-bucket/x", storage_options=s3_server.storage_options, progress=False)
