"""``train.loss: sampled`` through the real stack: 2 processes, the deepspeed launcher,
popularity negatives with the log-Q correction (item counts from the train split),
in-batch negatives gathered across ranks, then the sharded evaluation, the test users'
top-K lists merged across the ranks (``eval.top_k_lists``) and the export.
(The vocab-parallel full softmax and the sharded evaluation are checked against one
process in tests/test_dist_runs.py and tests/test_dist_accumulation.py.)"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_dist_runs import TINY_PT, _metrics, _ok, launch, sample_shards  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_sampled_softmax_pretraining_run(sample_shards, tmp_path):  # noqa: F811
    out = tmp_path / "sampled"
    _ok(launch(out, TINY_PT, ["train.loss=sampled", "train.sampled.negatives=64", "train.sampled.sampler=popularity",
                              "train.sampled.gather=true", "train.epochs=2", "train.steps_per_epoch=6",
                              "train.log_every_steps=1", "eval.top_k_lists=10"]), "sampled-softmax pretraining")
    m = _metrics(out)
    assert m["world_size"] == 2 and m["epochs_run"] == 2 and m["test"]["count"] > 0
    with open(out / "logs" / "steps.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 12 and all(x == x and x > 0 for x in losses)
    assert losses[-1] < losses[0]                          # it learns
    assert (out / "export" / "model.safetensors").is_file()
    _check_top_k_lists(out, m)


def _check_top_k_lists(out, m) -> None:
    """The lists the 2 ranks wrote (each rank its users, every rank scoring only its own
    items, merged) equal one process's full ranking of the best checkpoint (plain model,
    all item vectors)."""
    import torch

    from data_shards import SequenceLoader
    from dist.config import load_experiment
    from dist.evaluate_cmd import load_plain_model
    from mmm4rec.evaluate import top_k_lists

    got = {}
    for rank in (0, 1):
        for line in (out / "top_k" / f"test.rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert row["user"] not in got
            got[row["user"]] = row
    assert len(got) == m["test"]["count"]
    cfg = load_experiment(out / "config.yaml")
    ckpt = Path(m["best_checkpoint"].removeprefix("file://"))
    model, _ = load_plain_model(ckpt, cfg, cfg.data.url)
    loader = SequenceLoader(cfg.data, "test", rank=0, world_size=1, shuffle=False)
    ref = {r["user"]: r for r in top_k_lists(model, loader, 11)}   # the 11th: a tie at the cut-off
    assert set(ref) == set(got)
    exact = 0
    for user, r in ref.items():
        g = got[user]
        assert len(g["items"]) == 10 and 0 not in g["items"]
        assert torch.allclose(torch.tensor(g["scores"]), torch.tensor(r["scores"][:10]), rtol=1e-5, atol=1e-5), user
        near_tie = any(abs(x - y) < 1e-5 for x, y in zip(r["scores"], r["scores"][1:]))
        if not near_tie:   # (float rounding may only swap items whose scores tie to 1e-5)
            assert g["items"] == r["items"][:10], (user, g, r)
            exact += 1
    assert exact >= 0.9 * len(ref), (exact, len(ref))
