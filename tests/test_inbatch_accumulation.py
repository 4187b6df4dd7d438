"""The release's pretraining recipe accumulates micro-batches with in-batch negatives per
micro-batch (configs/transfer_pretrain_release.yaml: 1024 x 8; issue 28).

One optimizer step of the trainer's path (``set_accumulation_boundary`` / ``backward`` /
``step`` over 8 micro-batches, DeepSpeed dividing by the accumulation) must equal SGD on
the mean of the 8 micro-batches' own in-batch losses -- each softmax over its micro-batch's
targets only -- and differ from one in-batch softmax over all 8 x B rows (negatives that
cross micro-batches). Runs as a one-process worker (DeepSpeed needs its own process).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_finetune.yaml")
GAS, B, LR = 8, 8, 0.5
SETS = ["model.dropout_prob=0.0", "model.embedding_drop_prob=0.0", "model.time_dropout_prob=0.0",
        "model.use_id=false", "train.deepspeed=zero2", "train.steps_per_epoch=0", "train.loss=inbatch",
        "train.optimizer.name=sgd", f"train.optimizer.lr={LR}", "train.optimizer.momentum=0.0",
        "train.optimizer.weight_decay=0.0", f"train.gradient_accumulation_steps={GAS}", f"data.batch_size={B}"]


def _one_step(gas: int, feed: str) -> dict:
    """One optimizer step from the same initial weights over the first GAS x B train rows;
    the dense weights after it. ``feed``: ``micro`` = the trainer's path over GAS
    micro-batches (boundary at the last), ``mean`` = one backward of the mean of the GAS
    micro-batches' own losses, ``whole`` = one in-batch softmax over all GAS x B rows."""
    from data_shards import SequenceLoader
    from dist.build import build, preflight
    from dist.config import load_experiment
    from dist.env import init_distributed

    sets = [s for s in SETS if not s.startswith("train.gradient_accumulation_steps")]
    cfg = load_experiment(CONFIG, [*sets, f"train.gradient_accumulation_steps={gas}"])
    parts = build(cfg, init_distributed(), preflight(cfg, CONFIG))
    model = parts.model
    batch = next(iter(SequenceLoader(parts.cfg.data, "train", batch_size=GAS * B, rank=0, world_size=1,
                                     shuffle=False, num_workers=0)))
    micro = [batch.rows(slice(j * B, (j + 1) * B)) for j in range(GAS)]
    before = {k: v.detach().clone() for k, v in model.engine.module.state_dict().items()}
    if feed == "micro":
        for j, mb in enumerate(micro):
            model.set_accumulation_boundary(j == GAS - 1)
            model.backward(model.loss(mb, "inbatch").value)
            model.step()
    else:
        model.set_accumulation_boundary(True)
        loss = (sum(model.loss(mb, "inbatch").value for mb in micro) / GAS if feed == "mean"
                else model.loss(batch, "inbatch").value)
        model.backward(loss)
        model.step()
    after = {k: v.detach().clone() for k, v in model.engine.module.state_dict().items()}
    return {"before": before, "after": after, "steps": int(model.engine.global_steps)}


def _worker(out: str) -> None:
    from dist.env import prepare_process_env

    prepare_process_env()
    runs = {"micro": _one_step(GAS, "micro"), "mean": _one_step(1, "mean"), "whole": _one_step(1, "whole")}
    a, m, w = runs["micro"], runs["mean"], runs["whole"]

    def diff(x, y):
        return max(float((x[k] - y[k]).abs().max()) for k in x)

    res = {"steps": a["steps"], "same_start": diff(a["before"], m["before"]) + diff(a["before"], w["before"]),
           "micro_vs_mean": diff(a["after"], m["after"]), "micro_vs_whole": diff(a["after"], w["after"]),
           "step_size": diff(a["after"], a["before"])}
    Path(out).write_text(json.dumps(res))


@pytest.mark.slow
def test_accumulated_step_uses_in_batch_negatives_of_each_micro_batch(tmp_path):
    from dist.cli import launcher_env

    out = tmp_path / "res.json"
    env = launcher_env(1)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, __file__, "--worker", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["steps"] == 1 and r["same_start"] == 0.0, r            # 8 micro-batches, one optimizer step
    assert r["step_size"] > 1e-4, r
    assert r["micro_vs_mean"] < 1e-6 * r["step_size"], r            # = the mean of per-micro-batch losses (fp32)
    assert r["micro_vs_whole"] > 1e-2 * r["step_size"], r           # not one softmax over 8 x B rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--local_rank", type=int, default=None)
    _worker(ap.parse_args().worker)
