"""train.param_groups (dist/param_groups.py): per-group LR scale, weight decay and freezing,
the fine-tuning recipe of a pretrained start (issue 28)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist.config import ExperimentConfig, ParamGroupConfig, TrainConfig, load_experiment
from dist.engine import build_optimizer, lr_multiplier
from dist.param_groups import DENSE_GROUPS, group_of, plan_groups
from mmm4rec import MMM4Rec, MMM4RecConfig
from mmm4rec.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[1]


def _dense(**kw):
    cfg = MMM4RecConfig(num_items=50, text_dim=24, image_dim=16, hidden_size=32, inner_size=32, d_state=16,
                        n_groups=1, head_dim=16, chunk_size=8, max_len=10, **kw)
    return MMM4Rec(cfg).dense


def _train(groups: dict, **kw) -> TrainConfig:
    return from_dict(TrainConfig, {"param_groups": groups, "optimizer": {"name": "nadam", "lr": 1e-3,
                                                                          "weight_decay": 5e-3}, **kw})


def test_every_dense_weight_of_mmm4rec_is_in_one_named_group():
    dense = _dense(num_layers=2, item_mm_fusion="dynamic_shared")
    groups = {n: group_of(n) for n, _ in dense.named_parameters()}
    assert set(groups.values()) == set(DENSE_GROUPS), groups        # nothing left in "rest"
    assert groups["adapter.text.weight"] == "adapters" and groups["input_norm.image.bias"] == "adapters"
    assert groups["layers.1.tissd.core.A_log"] == "ssd" and groups["layers.0.ticossd.time.lin1.weight"] == "ssd"
    assert groups["layers.0.cl_b.imag.weight"] == "fourier" and groups["layers.1.ffn_c.w2.bias"] == "ffn"
    assert groups["layers.0.norm_v.weight"] == "ffn" and groups["time_norm.weight"] == "time"
    assert groups["fusion"] == "fusion"


def test_unnamed_groups_keep_the_optimizer_settings_in_one_group():
    dense = _dense()
    plan = plan_groups(dense.named_parameters(), _train({}), lambda s: 1.0, steps_per_epoch=5)
    assert plan.names == ["rest"] and len(plan.param_groups[0]["params"]) == len(list(dense.parameters()))
    assert plan.param_groups[0]["lr"] == 1e-3 and plan.param_groups[0]["weight_decay"] == 5e-3


def test_each_group_lr_and_weight_decay_reach_the_optimizer_and_freezing_ends_on_time():
    dense = _dense()
    cfg = _train({"ssd": {"freeze_epochs": 2}, "adapters": {"lr_scale": 10.0, "weight_decay": 0.0},
                  "rows": {"lr_scale": 0.5, "freeze_epochs": 1}, "fourier": {"freeze_epochs": -1}})
    warm = 3
    plan = plan_groups(dense.named_parameters(), cfg, lambda s: min(1.0, (s + 1) / warm), steps_per_epoch=4)
    assert plan.names == ["adapters", "ssd", "fourier", "rest"]
    opt = build_optimizer(plan.param_groups, cfg.optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lambdas)
    assert isinstance(opt, torch.optim.NAdam)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-3, 5e-3, 5e-3]
    seen = []
    for _ in range(12):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    w = [min(1.0, (s + 1) / warm) for s in range(12)]
    assert [s["adapters"] for s in seen] == pytest.approx([1e-2 * x for x in w])
    assert [s["ssd"] for s in seen] == pytest.approx([0.0] * 8 + [1e-3 * x for x in w[8:]])   # 2 epochs of 4
    assert [s["fourier"] for s in seen] == [0.0] * 12
    assert [s["rest"] for s in seen] == pytest.approx([1e-3 * x for x in w])
    assert [plan.rows_factor(s) for s in range(6)] == pytest.approx([0.0] * 4 + [0.5, 0.5])


def test_a_frozen_group_is_unchanged_after_steps_while_the_others_move():
    torch.manual_seed(0)
    dense = _dense()
    cfg = _train({"ssd": {"freeze_epochs": 1}})
    plan = plan_groups(dense.named_parameters(), cfg, lambda s: 1.0, steps_per_epoch=2)
    opt = build_optimizer(plan.param_groups, cfg.optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lambdas)
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    for _ in range(2):                       # epoch 1: ssd frozen (coupled L2 included)
        for p in dense.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    moved = {n: not torch.equal(before[n], p) for n, p in dense.named_parameters()}
    assert not any(v for n, v in moved.items() if group_of(n) == "ssd")
    assert all(v for n, v in moved.items() if group_of(n) != "ssd")
    for p in dense.parameters():             # epoch 2: it learns
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in dense.named_parameters())


def test_config_errors_name_the_group():
    with pytest.raises(ConfigError, match=r"param_groups: unknown group\(s\) \['ssm'\]; choose from adapters"):
        _train({"ssm": {"lr_scale": 0.1}})
    with pytest.raises(ConfigError, match=r"freeze_epochs: must be >= 0, or -1"):
        _train({"ssd": {"freeze_epochs": -2}})
    with pytest.raises(ConfigError, match=r"lr_scale: must be >= 0"):
        _train({"ssd": {"lr_scale": -1}})
    with pytest.raises(ConfigError, match=r"fusion match\(es\) no trainable weight"):
        plan_groups(_dense().named_parameters(), _train({"fusion": {}}), lambda s: 1.0, 1)   # static fusion


def test_param_groups_from_the_command_line():
    cfg = load_experiment(REPO / "configs" / "tiny_finetune.yaml",
                          ["train.param_groups.ssd.freeze_epochs=2", "train.param_groups.rows.lr_scale=0.1"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.train.param_groups == {"ssd": ParamGroupConfig(freeze_epochs=2), "rows": ParamGroupConfig(lr_scale=0.1)}


def test_the_schedule_multiplier_is_the_trainer_one():
    """The groups' lambdas wrap the same schedule the single-group path uses."""
    sched = _train({}).schedule
    assert [lr_multiplier(s, 10, sched) for s in range(3)] == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_a_run_with_a_frozen_group_exports_it_unchanged(tmp_path):
    """Through DeepSpeed ZeRO-2 (the trainer's real path): fine-tune a tiny export for one
    epoch with the SSD blocks and the adapters frozen; the export's SSD and adapter weights
    equal the start's bit for bit, the feed-forward blocks' (trained at twice the LR) differ."""
    from safetensors.torch import load_file

    from dist.cli import launcher_env

    env = launcher_env(1)
    env["OMP_NUM_THREADS"] = "1"

    def train(out: Path, *sets: str) -> None:
        args = [a for kv in sets for a in ("--set", kv)]
        proc = subprocess.run([sys.executable, str(REPO / "dist" / "train.py"), "--config",
                               str(REPO / "configs" / "tiny_finetune.yaml"), "--output-dir", str(out),
                               "--set", "train.epochs=1", "--set", "eval.test=false", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    train(tmp_path / "start", "train.steps_per_epoch=1")
    start = load_file(str(tmp_path / "start" / "export" / "model.safetensors"))
    train(tmp_path / "ft", "train.steps_per_epoch=3", f"train.init_from={tmp_path / 'start' / 'export'}",
          "train.param_groups.ssd.freeze_epochs=-1", "train.param_groups.adapters.freeze_epochs=1",
          "train.param_groups.ffn.lr_scale=2.0")
    end = load_file(str(tmp_path / "ft" / "export" / "model.safetensors"))
    assert start.keys() == end.keys()
    same = {k: torch.equal(start[k], end[k]) for k in start}
    frozen = {k for k in start if group_of(k) in ("ssd", "adapters")}
    assert frozen and all(same[k] for k in frozen), [k for k in frozen if not same[k]]
    ffn = [k for k in start if group_of(k) == "ffn"]
    assert ffn and not any(same[k] for k in ffn), [k for k in ffn if same[k]]
