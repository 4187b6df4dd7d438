"""A user's own DeepSpeed JSON: every common key accepted, the overlap rule (the
experiment config wins, each differing key printed before launch), offload passed
through, DeepSpeed's own config check before any process, ``--print-config``.

Fast: no process group; the CLI checks run ``dist/train.py`` / ``mmm4rec train`` in
``--print-config`` mode or stop them at a config error before launch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmm4rec.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY_FT = REPO / "configs" / "tiny_finetune.yaml"
USER_JSON = REPO / "tests" / "fixtures" / "deepspeed_user.json"   # the common keys, as teams write them


def load(*overrides):
    from dist.config import load_experiment

    return load_experiment(TINY_FT, list(overrides))


def _write(tmp_path, ds: dict) -> Path:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    return p


def test_user_json_with_every_common_key_is_accepted_and_the_experiment_config_wins():
    from dist.config import deepspeed_overlap, finalize_deepspeed_config, load_deepspeed_config

    user = json.loads(USER_JSON.read_text())
    common = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "zero_optimization",
              "steps_per_print", "wall_clock_breakdown", "activation_checkpointing", "flops_profiler"}
    assert common <= set(user) and "offload_optimizer" in user["zero_optimization"]
    cfg = load(f"train.deepspeed={USER_JSON}", "train.gradient_accumulation_steps=2", "train.grad_clip=1.0")
    _, ds = load_deepspeed_config(cfg)
    assert ds == user                                     # read as given
    out = finalize_deepspeed_config(ds, cfg, world_size=2)
    # ours, where the two overlap
    assert out["train_micro_batch_size_per_gpu"] == cfg.data.batch_size == 128
    assert out["gradient_accumulation_steps"] == 2 and out["train_batch_size"] == 128 * 2 * 2
    assert out["gradient_clipping"] == 1.0
    for dropped in ("optimizer", "scheduler", "bf16", "fp16"):   # torch optimizer/schedule, autocast
        assert dropped not in out
    # theirs, everywhere else: ZeRO incl. offload, and the other blocks
    assert out["zero_optimization"] == user["zero_optimization"]
    assert out["zero_force_ds_cpu_optimizer"] is False             # offload with the torch optimizer
    for key in ("steps_per_print", "activation_checkpointing", "flops_profiler", "comms_logger",
                "prescale_gradients"):
        assert out[key] == user[key]
    lines = deepspeed_overlap(ds, cfg, world_size=2)
    text = "\n".join(lines)
    for expected in ("train_micro_batch_size_per_gpu: JSON 64 -> data.batch_size=128",
                     "gradient_accumulation_steps: JSON 4 -> train.gradient_accumulation_steps=2",
                     "optimizer.type: JSON 'adamw' -> train.optimizer.name='nadam'",
                     "optimizer.params.lr: JSON 0.0003 -> train.optimizer.lr=0.001",
                     "scheduler.type: JSON 'WarmupCosineLR' -> train.schedule.decay='none'",
                     "scheduler.params.warmup_num_steps: JSON 500 -> train.schedule.warmup_steps=0",
                     "bf16/fp16: JSON bf16 -> train.precision='auto'"):
        assert expected in text, (expected, text)
    # equal values are no overlap: 512 = 128 x 2 x 2 processes, clipping 1.0 = 1.0
    assert not any(x.startswith(("train_batch_size", "gradient_clipping")) for x in lines)
    assert ("train_batch_size: JSON 512 -> 256 (data.batch_size 128 x train.gradient_accumulation_steps 2 x world "
            "size 1)") in deepspeed_overlap(ds, cfg, world_size=1)


def test_overlap_lists_nothing_when_the_json_agrees():
    from dist.config import deepspeed_overlap

    cfg = load("train.optimizer.name=adamw", "train.optimizer.lr=0.0003", "train.optimizer.weight_decay=0.01",
               "train.schedule.warmup_steps=10", "train.schedule.decay=cosine", "train.schedule.min_lr_ratio=0.1",
               "train.precision=bf16", "train.grad_clip=1.0", "train.gradient_accumulation_steps=2")
    ds = {"train_micro_batch_size_per_gpu": 128, "gradient_accumulation_steps": 2, "train_batch_size": 512,
          "gradient_clipping": 1.0, "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.01, "betas": [0.9, 0.999]}},
          "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10, "cos_min_ratio": 0.1}}}
    assert deepspeed_overlap(ds, cfg, world_size=2) == []
    # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false
    ds["optimizer"]["type"] = "Adam"
    assert deepspeed_overlap(ds, cfg, world_size=2) == []
    ds["optimizer"]["params"]["adam_w_mode"] = False
    assert deepspeed_overlap(ds, cfg, world_size=2) == ["optimizer.type: JSON 'adam' -> train.optimizer.name='adamw'"]


@pytest.mark.parametrize("zero,pattern", [
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, r"offload_optimizer needs ZeRO stage 1 or 2 or 3"),
    ({"stage": 2, "offload_param": {"device": "cpu"}}, r"offload_param needs ZeRO stage 3"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, r"offload_param\.nvme_path is required"),
    ({"stage": 2, "offload_optimizer": {"device": "gpu"}}, r"offload_optimizer\.device must be none, cpu or nvme"),
])
def test_offload_that_does_not_fit_the_stage_is_named(tmp_path, zero, pattern):
    from dist.config import load_deepspeed_config

    with pytest.raises(ConfigError, match=pattern):
        load_deepspeed_config(load(f"train.deepspeed={_write(tmp_path, {'zero_optimization': zero})}"))


def test_offload_that_fits_passes_through(tmp_path):
    from dist.config import finalize_deepspeed_config, load_deepspeed_config

    zero = {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
            "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    cfg = load(f"train.deepspeed={_write(tmp_path, {'zero_optimization': zero})}")
    out = finalize_deepspeed_config(load_deepspeed_config(cfg)[1], cfg, 1)
    assert out["zero_optimization"] == zero


def test_deepspeed_itself_checks_the_json_before_any_process(tmp_path):
    from dist.build import preflight
    from dist.config import finalize_deepspeed_config, load_deepspeed_config
    from dist.env import prepare_process_env

    prepare_process_env()
    js = _write(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5}})   # a typo
    cfg = load(f"train.deepspeed={js}")
    with pytest.raises(ConfigError, match=r"ds\.json: DeepSpeed .* rejects it: .*reduce_bucket_sise"):
        preflight(cfg, str(TINY_FT), world_size=2, announce=False)
    cfg = load(f"train.deepspeed={USER_JSON}")
    assert preflight(cfg, str(TINY_FT), world_size=2, announce=False) == json.loads(USER_JSON.read_text())
    assert finalize_deepspeed_config(load_deepspeed_config(cfg)[1], cfg, 2)["train_batch_size"] == 256


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_print_config_resolves_redacts_and_starts_nothing(tmp_path):
    out = tmp_path / "run"
    r = _run(str(REPO / "dist" / "train.py"), "--config", str(TINY_FT), "--output-dir", str(out), "--print-config",
             "--world-size", "4", "--set", f"train.deepspeed={USER_JSON}", "--set", "data.storage.key=AKIAEXAMPLE",
             "--set", "data.storage.secret=s3cr3t-value", "--set", "checkpoint.storage.token=tok-value")
    assert r.returncode == 0, r.stderr
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "tok-value"):
        assert secret not in r.stdout + r.stderr
    doc = yaml.safe_load(r.stdout)
    exp, ds = doc["experiment"], doc["deepspeed"]
    assert exp["data"]["storage"]["key"] == "***" and exp["data"]["storage"]["secret"] == "***"
    assert exp["checkpoint"]["storage"]["token"] == "***"
    assert exp["train"]["epochs"] == 2 and exp["tables"]["sharding"] == "row_wise"    # file + defaults
    assert ds["train_batch_size"] == 128 * 4 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "# overlap (experiment config wins): optimizer.type: JSON 'adamw'" in r.stdout
    assert not out.exists()


def test_credentials_on_the_command_line_are_redacted():
    from mmm4rec.config import redact_argv, redact_secrets

    argv = ["dist/train.py", "--set", "data.storage.secret=S", "--set", "checkpoint.storage.key=K",
            "--set", "train.epochs=3", "--set", "data.storage.endpoint_url=http://127.0.0.1:9000"]
    assert redact_argv(argv) == ["dist/train.py", "--set", "data.storage.secret=***", "--set",
                                 "checkpoint.storage.key=***", "--set", "train.epochs=3", "--set",
                                 "data.storage.endpoint_url=http://127.0.0.1:9000"]
    cfg = {"data": {"storage": {"key": "K", "secret": None, "token": ""}, "key": "not-a-credential"}}
    assert redact_secrets(cfg) == {"data": {"storage": {"key": "***", "secret": None, "token": ""},
                                            "key": "not-a-credential"}}


def test_mmm4rec_train_checks_the_json_before_launching(tmp_path):
    js = _write(tmp_path, {"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}})
    r = _run("-m", "dist", "train", "--config", str(TINY_FT), "--nproc", "2", "--output-dir",
             str(tmp_path / "o"), "--set", f"train.deepspeed={js}")
    assert r.returncode == 2, r.stderr
    assert "offload_param needs ZeRO stage 3" in r.stderr and "deepspeed" not in r.stderr.split("error:")[0]
    assert not (tmp_path / "o").exists()
    r = _run("-m", "dist", "train", "--config", str(TINY_FT), "--nproc", "3", "--print-config",
             "--set", f"train.deepspeed={USER_JSON}")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["deepspeed"]["train_batch_size"] == 128 * 3
