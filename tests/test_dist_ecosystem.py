"""What a team's tooling sees of a run, on real data (the bundled Amazon Scientific
sample's shards):

    dry run      `dist/train.py --dry-run` / `mmm4rec train --dry-run` print the plan
                 (parameters, table rows per rank, steps) and start no process group
    run          one process, a user's full DeepSpeed JSON (ZeRO 2 + CPU optimizer
                 offload), W&B offline + MLflow file store: the trackers receive the
                 run's scalars (= logs/steps.csv), the export carries a model card that
                 names the data and the encoders, `mmm4rec export --dtype bf16` works
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist.cli import free_port

pytestmark = pytest.mark.slow   # subprocesses importing the stack, and one training run (~2 min on 2 busy cores)

REPO = Path(__file__).resolve().parents[1]
TINY_FT = REPO / "configs" / "tiny_finetune.yaml"
USER_JSON = REPO / "tests" / "fixtures" / "deepspeed_user.json"


@pytest.fixture(scope="module")
def shards() -> str:
    """The bundled scientific_mm sample as a shard set (real Amazon data; built once)."""
    from data_shards import ensure_sample_shards
    from dist.config import default_cache_dir

    return ensure_sample_shards("scientific_mm", default_cache_dir() / "samples", progress=False)


def _env(**extra) -> dict:
    from dist.cli import launcher_env

    env = launcher_env(1)
    env["OMP_NUM_THREADS"] = "1"
    for k in ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI"):   # the config decides, not the caller's shell
        env.pop(k, None)
    env.update(extra)
    return env


# ---------------------------------------------------------------------- dry run
def _expected_plan(shards: str, world: int, overrides: list[str]) -> dict:
    """The numbers a real build uses, computed here without the dry-run code."""
    from data_shards import SequenceLoader, read_manifest
    from dist.config import load_experiment, resolve_model_config
    from mmm4rec.models import MODELS

    cfg = load_experiment(TINY_FT, overrides)
    manifest = read_manifest(shards)
    mtype, mcfg = resolve_model_config(cfg, manifest)
    model = MODELS[mtype](mcfg)                                 # a real (CPU) model
    micro = len(SequenceLoader(cfg.data, "train", rank=0, world_size=world))
    steps = min(micro // cfg.train.gradient_accumulation_steps, cfg.train.steps_per_epoch or 10 ** 9)
    rows = manifest["num_items"] + 1
    per_rank = [-(-rows // world)] * (world - 1) + [rows - -(-rows // world) * (world - 1)]
    return {"dense": sum(p.numel() for p in model.dense.parameters()), "steps": steps, "micro": micro,
            "rows": per_rank, "num_items": manifest["num_items"],
            "digest": hashlib.sha256((Path(shards) / "manifest.json").read_bytes()).hexdigest()}


def test_dry_run_prints_the_plan_and_starts_nothing(shards, tmp_path):
    overrides = [f"data.url={shards}", "data.sample=null", "model.use_id=true", "train.gradient_accumulation_steps=2"]
    exp = _expected_plan(shards, 2, overrides)
    out = tmp_path / "run"
    sets = [a for ov in overrides for a in ("--set", ov)]
    # RANK 0 of a world of 2 whose rank 1 never comes: a process group would block here until the timeout
    env = _env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    r = subprocess.run([sys.executable, str(REPO / "dist" / "train.py"), "--config", str(TINY_FT), "--output-dir",
                        str(out), "--dry-run", *sets], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    assert "on 2 process(es): nothing started" in text
    assert f"manifest sha256 {exp['digest']}" in text
    assert f"mmm4rec: {exp['dense']:,} dense parameters" in text
    assert (f"table     trainable (trainable, {exp['num_items'] + 1:,} x 64, row_wise): r0: {exp['rows'][0]:,} rows"
            f" / ") in text and f"r1: {exp['rows'][1]:,} rows" in text
    assert f"{exp['micro']:,} micro-batches per epoch per rank -> {exp['steps']:,} steps per epoch x 2 epochs" in text
    assert "128 per rank x 2 accumulation x 2 = 512 per optimizer step" in text
    assert not out.exists()

    # the same through the CLI, planned for 2 processes, no launcher started
    r2 = subprocess.run([sys.executable, "-m", "dist", "train", "--config", str(TINY_FT), "--nproc", "2",
                         "--dry-run", *sets], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.splitlines()[1:] == text.splitlines()[1:]

    # a config the data contradicts fails like a run would: exit 2, one line naming the field
    r3 = subprocess.run([sys.executable, str(REPO / "dist" / "train.py"), "--config", str(TINY_FT), "--dry-run",
                         *sets, "--set", "model.text_dim=768"], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=300)
    assert r3.returncode == 2 and "model.text_dim: 768 differs from the data" in r3.stderr, r3.stderr[-2000:]


def test_dry_run_in_process_leaves_no_process_group(shards):
    import io

    import torch.distributed as tdist

    from dist.config import load_experiment
    from dist.env import prepare_process_env
    from dist.plan import dry_run

    prepare_process_env()
    cfg = load_experiment(TINY_FT, [f"data.url={shards}", "data.sample=null", "tables.sharding=table_wise"])
    plan = dry_run(cfg, str(TINY_FT), world_size=4, out=io.StringIO())
    assert not tdist.is_initialized()
    rows = plan["tables"][0]["rows_per_rank"]
    assert len(rows) == 4 and sum(rows) == plan["num_items"] + 1 and sorted(rows)[:3] == [0, 0, 0]   # one rank


# ---------------------------------------------------------------------- a run
def read_wandb_history(run_dir: Path) -> list[dict]:
    """History rows of a W&B offline run file (``run-<id>.wandb``: W&B's LevelDB-style
    record log of protobuf ``Record``s, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = next(run_dir.glob("run-*.wandb")).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", raw[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:                                   # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = data if kind in (1, 2) else buf + data   # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.fixture(scope="module")
def tracked_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eco") / "run"
    sets = [f"data.url={shards}", "data.sample=null", f"train.deepspeed={USER_JSON}", "train.epochs=2",
            "train.steps_per_epoch=4", "train.log_every_steps=2", "trackers.wandb.enabled=true",
            "trackers.wandb.mode=offline", "trackers.mlflow.enabled=true", "data.storage.secret=do-not-log-me"]
    r = subprocess.run([sys.executable, str(REPO / "dist" / "train.py"), "--config", str(TINY_FT), "--output-dir",
                        str(out), *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
    (out.parent / "log.txt").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return out


def _steps_csv(run: Path) -> list[dict]:
    with open(run / "logs" / "steps.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_user_deepspeed_json_with_offload_runs(tracked_run):
    log = (tracked_run.parent / "log.txt").read_text()
    assert "DeepSpeed key(s) differ from the experiment config; the experiment config wins" in log
    assert "train_micro_batch_size_per_gpu: JSON 64 -> data.batch_size=128" in log
    ds = json.loads((tracked_run / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert ds["train_batch_size"] == 128 and "optimizer" not in ds and "bf16" not in ds
    assert json.loads((tracked_run / "metrics.json").read_text())["steps"] == 8


def test_offline_trackers_receive_the_runs_scalars(tracked_run):
    steps = _steps_csv(tracked_run)
    assert [int(r["step"]) for r in steps] == [2, 4, 6, 8]
    for key in ("loss", "lr", "samples_per_s", "steps_per_s", "mem_rss_gib", "mem_peak_rss_gib"):
        assert all(float(r[key]) > 0 for r in steps), key
    epochs = json.loads((tracked_run / "metrics.json").read_text())["history"]

    # W&B offline run in OUTPUT_DIR/wandb
    run_dirs = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    hist = read_wandb_history(run_dirs[0])
    by_step = {}
    for row in hist:
        by_step.setdefault(row["_step"], {}).update(row)
    for r in steps:
        got = by_step[int(r["step"])]
        for key in ("loss", "lr", "samples_per_s", "steps_per_s", "mem_rss_gib"):
            assert got[f"train/{key}"] == pytest.approx(float(r[key]), rel=1e-9), key
    for e in epochs:
        assert by_step[e["step"]]["valid/ndcg@10"] == pytest.approx(e["valid/ndcg@10"], rel=1e-12)

    # MLflow file store in OUTPUT_DIR/mlruns
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").as_uri())
    run_id = (tracked_run / "logs" / "mlflow_run_id").read_text().strip()
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert loss == pytest.approx({int(r["step"]): float(r["loss"]) for r in steps}, rel=1e-9)
    mem = client.get_metric_history(run_id, "train/mem_peak_rss_gib")
    assert len(mem) == 4 and all(m.value > 0.1 for m in mem)
    ndcg = {m.step: m.value for m in client.get_metric_history(run_id, "valid/ndcg_at_10")}
    assert ndcg == pytest.approx({e["step"]: e["valid/ndcg@10"] for e in epochs}, rel=1e-9)
    params = client.get_run(run_id).data.params
    assert params["train.deepspeed"] == str(USER_JSON) and params["data.storage.secret"] == "***"
    # no credential reached the trackers (config.yaml of the run dir: issue 13's redaction)
    for f in [*(tracked_run / "wandb").rglob("*"), *(tracked_run / "mlruns").rglob("*")]:
        if f.is_file():
            assert b"do-not-log-me" not in f.read_bytes(), f


def test_model_card_names_data_encoders_and_metrics(tracked_run, shards):
    card = (tracked_run / "export" / "README.md").read_text()
    manifest_bytes = (Path(shards) / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert f"- shard set: `{shards}`" in card
    assert f"- manifest sha256: `{hashlib.sha256(manifest_bytes).hexdigest()}`" in card
    for modality in ("text", "image"):
        f = manifest["features"][modality]
        assert f"- {modality}: `{f['encoder']}`, {f['dim']}-d" in card
    assert "sentence-transformers/all-MiniLM-L6-v2" in card and "CLIP" in card
    assert f"| test | {metrics['test']['hr@10']:.4f} | {metrics['test']['ndcg@10']:.4f} |" in card
    assert f"Best validation at epoch {metrics['best_epoch']}" in card
    assert "type: `mmm4rec`" in card and "stored as `float32`" in card
    assert "do-not-log-me" not in card and "secret: '***'" in card


def test_export_bf16_halves_the_weights_and_loads(tracked_run, tmp_path):
    from safetensors import safe_open

    from mmm4rec import MMM4Rec

    out = tmp_path / "bf16"
    r = subprocess.run([sys.executable, "-m", "dist", "export", str(tracked_run), str(out), "--dtype", "bf16"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fp32 = tracked_run / "export"
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(fp32 / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == torch.bfloat16 and y.dtype == torch.float32, k
            assert torch.equal(x, y.to(torch.bfloat16)), k
    size = (out / "model.safetensors").stat().st_size / (fp32 / "model.safetensors").stat().st_size
    assert 0.45 < size < 0.6, size
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "stored as `bfloat16`" in (out / "README.md").read_text()
    model = MMM4Rec.from_pretrained(out)
    w = dict(model.dense.named_parameters())
    with safe_open(str(fp32 / "model.safetensors"), "pt") as b:
        k = next(iter(b.keys()))
        assert w[k].dtype == torch.float32
        assert torch.allclose(w[k], b.get_tensor(k), rtol=1e-2, atol=1e-3)


def test_model_card_says_when_the_manifest_cannot_be_read(tmp_path):
    from dist.model_card import model_card

    exp = {"name": "x", "data": {"url": str(tmp_path / "gone"), "storage": {"secret": "S3CRET"}}}
    card = model_card("mmm4rec", {"hidden_size": 8}, 123, "float32", {"step": 3, "epoch": 1}, exp, "ck")
    assert f"- shard set: `{tmp_path / 'gone'}`" in card
    assert "- manifest: not readable at export time (ManifestError" in card
    assert "- unknown (manifest not readable at export time)" in card
    assert "No evaluation was recorded" in card and "S3CRET" not in card and "123 parameters" in card
