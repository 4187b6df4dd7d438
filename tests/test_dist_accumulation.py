"""Gradient accumulation through the real stack (torchrec tables + DeepSpeed engine):
``k`` accumulated micro-batches of ``B`` rows must give the same update as one batch of
``k * B`` rows, for the dense weights *and* the trainable item-table rows, whatever the
tables' optimizer (fbgemm's fused row-wise ones, or the model's optimizer: ``dense``).

Each case runs this file as a one-process worker (``--accumulation-worker``) that builds
the run twice (``gradient_accumulation_steps`` k and 1) on the same rows.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_FT = str(REPO / "configs" / "tiny_finetune.yaml")
K, B, STEPS = 4, 16, 3
BASE = ["model.dropout_prob=0.0", "model.embedding_drop_prob=0.0", "model.time_dropout_prob=0.0",
        "model.use_id=true", "train.deepspeed=zero2", "train.steps_per_epoch=0",
        "train.optimizer.name=sgd", "train.optimizer.lr=0.5", "train.optimizer.momentum=0.9",
        "train.optimizer.weight_decay=0.001", "tables.lr=0.5"]

pytestmark = pytest.mark.slow


def _run_once(mode: str, gas: int):
    """STEPS optimizer steps over the first STEPS * K * B training rows; returns the
    dense state, the trainable table and the per-step mean losses."""
    import torch

    from data_shards import SequenceLoader
    from dist.config import load_experiment
    from dist.env import init_distributed
    from dist.setup import build, preflight

    cfg = load_experiment(TINY_FT, BASE + [f"tables.optimizer={mode}", f"train.gradient_accumulation_steps={gas}",
                                           f"data.batch_size={K * B // gas}"])
    ds = preflight(cfg, TINY_FT)
    env = init_distributed()
    parts = build(cfg, env, ds)
    model = parts.model
    loader = SequenceLoader(parts.cfg.data, "train", batch_size=K * B, rank=0, world_size=1, shuffle=False,
                            num_workers=0)
    losses = []
    for _, batch in zip(range(STEPS), loader, strict=False):
        assert float(batch["weight"].sum()) == K * B          # full batches only (equal micro-batch means)
        per = K * B // gas
        tot = torch.zeros(2, dtype=torch.float64)
        for j in range(gas):
            mb = model.to_device({k: v[j * per:(j + 1) * per] for k, v in batch.items()})
            model.set_accumulation_boundary(j == gas - 1)
            loss, loss_sum, w = model.train_loss(mb, "full")
            model.backward(loss)
            model.step()
            tot += torch.stack([loss_sum.double(), w.double()])
        losses.append(float(tot[0] / tot[1]))
    dense = {k: v.detach().clone() for k, v in model.engine.module.state_dict().items()}
    table = torch.cat([w.detach().clone() for _, w in model.tables.local_shards("trainable")])
    return dense, table, losses


def _worker(out: str, mode: str) -> None:
    sys.path.insert(0, str(REPO))
    from dist.env import prepare_process_env

    prepare_process_env()
    import torch
    from safetensors.torch import save_file

    res = {}
    for gas in (K, 1):
        dense, table, losses = _run_once(mode, gas)
        res[gas] = losses
        save_file({"table": table, **{f"dense.{k}": v for k, v in dense.items()}}, f"{out}.gas{gas}.safetensors")
        torch.distributed.barrier()
    Path(f"{out}.json").write_text(json.dumps({str(k): v for k, v in res.items()}))


@pytest.mark.parametrize("mode", ["dense", "sgd", "adagrad"])
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, mode):
    import torch
    from safetensors.torch import load_file

    from dist.cli import launcher_env

    env = launcher_env(1)
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / mode
    proc = subprocess.run([sys.executable, __file__, "--accumulation-worker", str(out), "--mode", mode], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    losses = json.loads(Path(f"{out}.json").read_text())
    acc, big = load_file(f"{out}.gas{K}.safetensors"), load_file(f"{out}.gas1.safetensors")
    assert losses[str(K)] == pytest.approx(losses["1"], rel=1e-5)
    assert losses["1"][0] != pytest.approx(losses["1"][-1], rel=1e-4)     # it did train
    assert acc["table"].abs().max() > 1e-4                                  # the ID rows did move
    for k in big:
        assert torch.allclose(acc[k], big[k], rtol=1e-4, atol=1e-6), (k, (acc[k] - big[k]).abs().max())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--accumulation-worker", required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--local_rank", type=int, default=None)
    a = ap.parse_args()
    _worker(a.accumulation_worker, a.mode)
