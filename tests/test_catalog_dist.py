"""``train.loss: sampled`` through the real stack: 2 processes, the deepspeed launcher,
popularity negatives with the log-Q correction (item counts from the train split),
in-batch negatives gathered across ranks, then the sharded evaluation and the export.
(The vocab-parallel full softmax and the sharded evaluation are checked against one
process in tests/test_dist_runs.py and tests/test_dist_accumulation.py.)"""
from __future__ import annotations

import csv

import pytest
from test_dist_runs import TINY_PT, _metrics, _ok, launch, sample_shards  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_sampled_softmax_pretraining_run(sample_shards, tmp_path):  # noqa: F811
    out = tmp_path / "sampled"
    _ok(launch(out, TINY_PT, ["train.loss=sampled", "train.sampled.negatives=64", "train.sampled.sampler=popularity",
                              "train.sampled.gather=true", "train.epochs=2", "train.steps_per_epoch=6",
                              "train.log_every_steps=1"]), "sampled-softmax pretraining")
    m = _metrics(out)
    assert m["world_size"] == 2 and m["epochs_run"] == 2 and m["test"]["count"] > 0
    with open(out / "logs" / "steps.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 12 and all(x == x and x > 0 for x in losses)
    assert losses[-1] < losses[0]                          # it learns
    assert (out / "export" / "model.safetensors").is_file()
