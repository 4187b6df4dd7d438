"""dist/: config validation, the CLI contract, and the pieces that need no processes
(table packing and init, LR schedule, chunked ranking, checkpoint store, safe loading).
Fast: nothing here starts a process group except the two `dist/train.py` CLI checks,
which must fail before one exists."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmm4rec.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY_PT = REPO / "configs" / "tiny_pretrain.yaml"
TINY_FT = REPO / "configs" / "tiny_finetune.yaml"


def load(path=TINY_FT, *overrides):
    from dist.config import load_experiment

    return load_experiment(path, list(overrides))


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_config_loads(path):
    from dist.config import load_deepspeed_config

    cfg = load(path)
    load_deepspeed_config(cfg, path)


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key \(did you mean 'epochs'\?\)"):
        load(TINY_FT, "train.epoch=3")
    with pytest.raises(ConfigError, match=r"model\.hiden_size: unknown key \(did you mean 'hidden_size'\?\)"):
        load(TINY_FT, "model.hiden_size=3")


def test_missing_shard_url_is_named(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("data:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"data\.url: required"):
        load(p)
    with pytest.raises(ConfigError, match=r"data\.sample: must be one of"):
        load(TINY_FT, "data.sample=books")
    with pytest.raises(ConfigError, match=r"data\.sample: give either url"):
        load(TINY_FT, "data.url=/some/shards")


def test_train_targets_and_monitor_users_reach_the_data_section():
    """data.train_targets / data.monitor_users (data_shards.ShardsConfig) through --set."""
    cfg = load(TINY_FT, "data.train_targets=all", "data.monitor_users=0.05")
    assert (cfg.data.train_targets, cfg.data.monitor_users) == ("all", 0.05)
    assert load(TINY_FT).data.train_targets == "loo" and load(TINY_FT).data.monitor_users == 0.0
    with pytest.raises(ConfigError, match=r"data\.train_targets: must be one of"):
        load(TINY_FT, "data.train_targets=every")
    with pytest.raises(ConfigError, match=r"data\.monitor_users: must be in \[0, 1\)"):
        load(TINY_FT, "data.monitor_users=1.5")


@pytest.mark.parametrize("stage", [4, -1, "two", True])
def test_zero_stage_outside_0_to_3_is_rejected(tmp_path, stage):
    from dist.config import load_deepspeed_config

    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    cfg = load(TINY_FT, f"train.deepspeed={js}")
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage must be 0, 1, 2 or 3"):
        load_deepspeed_config(cfg)


def test_missing_deepspeed_json_lists_the_bundled_ones():
    from dist.config import load_deepspeed_config

    with pytest.raises(ConfigError, match=r"train\.deepspeed: .*zero9\.json not found \(bundled: \['zero0', "):
        load_deepspeed_config(load(TINY_FT, "train.deepspeed=zero9"))


@pytest.mark.parametrize("override,pattern", [
    ("eval.metric=ndcg@5", r"eval\.metric: ndcg@5 needs K=5 in ks"),
    ("eval.metric=auc", r"eval\.metric: expected hr@K"),
    ("train.mask_duplicates=true", r"train\.mask_duplicates: only applies to loss: inbatch"),
    ("model.type=gpt", r"model\.type: must be one of"),
    ("model.max_len=30", r"model\.max_len: 30 differs from data\.max_len 20"),
    ("model.head_dim=48", r"model\.head_dim"),
    ("tables.optimizer=lamb", r"tables\.optimizer: must be one of"),
])
def test_bad_values_are_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load(TINY_FT, override)


def test_model_fields_come_from_the_data():
    from dist.config import resolve_model_config

    manifest = {"num_items": 99, "features": {"text": {"dim": 384}, "image": {"dim": 512}}}
    mtype, mc = resolve_model_config(load(TINY_FT), manifest)
    assert (mtype, mc.num_items, mc.text_dim, mc.image_dim, mc.max_len) == ("mmm4rec", 99, 384, 512, 20)
    with pytest.raises(ConfigError, match=r"model\.text_dim: 768 differs from the data"):
        resolve_model_config(load(TINY_FT, "model.text_dim=768"), manifest)


def test_deepspeed_config_is_filled_from_the_experiment():
    from dist.config import finalize_deepspeed_config, load_deepspeed_config

    cfg = load(TINY_FT, "train.gradient_accumulation_steps=4", "train.grad_clip=1.5")
    _, ds = load_deepspeed_config(cfg)
    out = finalize_deepspeed_config(ds, cfg, world_size=2)
    assert out["train_batch_size"] == cfg.data.batch_size * 4 * 2
    assert out["gradient_clipping"] == 1.5 and out["zero_optimization"]["stage"] == 2
    assert "bf16" not in out and "optimizer" not in out


# ---------------------------------------------------------------------- export/model mismatch
def test_export_model_mismatch_lists_every_tensor(tmp_path):
    from dist.build import load_init_from
    from dist.model import build_dense
    from mmm4rec.config import from_dict
    from mmm4rec.models import MMM4Rec

    fields = load(TINY_FT).model_fields()
    small = from_dict(MMM4Rec.config_cls, {**fields, "num_items": 10, "text_dim": 384, "image_dim": 512})
    MMM4Rec(small).save_pretrained(tmp_path / "exp")
    big = from_dict(MMM4Rec.config_cls, {**fields, "hidden_size": 64, "inner_size": 128, "num_items": 10,
                                         "text_dim": 384, "image_dim": 512})
    dense, _ = build_dense("mmm4rec", big)
    with pytest.raises(ConfigError) as e:
        load_init_from(str(tmp_path / "exp"), "mmm4rec", dense)
    msg = str(e.value)
    assert "incompatible with the model config" in msg
    assert "adapter.text.weight: export (32, 384) vs model (64, 384)" in msg
    assert msg.count("\n") > 10    # every mismatch, not just the first
    with pytest.raises(ConfigError, match="holds a mmm4rec model, the config builds sasrec"):
        load_init_from(str(tmp_path / "exp"), "sasrec", dense)
    with pytest.raises(ConfigError, match="is not an export"):
        load_init_from(str(tmp_path), "mmm4rec", dense)


# ---------------------------------------------------------------------- CLI contract
def _train_py(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "dist" / "train.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_train_help_documents_every_flag():
    out = _train_py("--help").stdout
    for flag in ("--config", "--output-dir", "--set", "--resume", "--local_rank"):
        assert flag in out


def test_train_cli_fails_before_any_process_group_with_exit_2(tmp_path):
    r = _train_py("--config", str(TINY_FT), "--output-dir", str(tmp_path / "o"), "--set", "train.epoch=3")
    assert r.returncode == 2 and "train.epoch: unknown key" in r.stderr, r.stderr
    js = tmp_path / "ds.json"
    js.write_text('{"zero_optimization": {"stage": 5}}')
    r = _train_py("--config", str(TINY_FT), "--output-dir", str(tmp_path / "o"), "--set", f"train.deepspeed={js}")
    assert r.returncode == 2 and "stage must be 0, 1, 2 or 3" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_mmm4rec_cli_registers_the_commands():
    from dist.main import build_parser

    parser = build_parser()
    for cmd in (["train", "--config", "x.yaml", "--nproc", "2"], ["export", "ck", "out"],
                ["evaluate", "ck", "--split", "valid"]):
        assert callable(parser.parse_args(cmd).func)


def test_launcher_command_and_env():
    from dist.cli import launcher_command, launcher_env

    cmd = launcher_command(2, ["--config", "c.yaml"], "deepspeed", master_port=12345)
    assert "--num_gpus" in cmd and cmd[cmd.index("--num_gpus") + 1] == "2" and cmd[-2:] == ["--config", "c.yaml"]
    assert cmd[-3].endswith("dist/train.py")
    tr = launcher_command(2, [], "torchrun")
    assert tr[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"]
    env = launcher_env(2, base={})
    assert env["TORCH_EXTENSIONS_DIR"] and str(REPO) in env["PYTHONPATH"]
    if not torch.cuda.is_available():
        assert env["DS_ACCELERATOR"] == "cpu"
        assert "CUDA_VISIBLE_DEVICES" not in launcher_env(2, base={"CUDA_VISIBLE_DEVICES": "0"})
        assert cmd[cmd.index("--log_level") + 1] == "warning"    # no launcher INFO noise on CPU


# ---------------------------------------------------------------------- pieces
def test_pack_specs_and_init_are_sharding_independent():
    from dist.tables import init_rows, pack_specs
    from mmm4rec.models.base import TableSpec

    specs = [TableSpec("text", 100, 384, "feature"), TableSpec("image", 100, 512, "feature"),
             TableSpec("modality_mask", 100, 2, "feature"), TableSpec("id_text", 100, 32, "trainable"),
             TableSpec("fusion", 100, 2, "trainable", init="normal")]
    packed = {p.name: p for p in pack_specs(specs)}
    assert packed["features"].dim == 900 and packed["trainable"].dim == 36   # 898 -> 900, 34 -> 36
    assert [(c.spec.name, c.start) for c in packed["trainable"].columns] == [("id_text", 0), ("fusion", 32)]
    spec = specs[-1]
    whole = init_rows(spec, 0, 100, seed=7)
    assert torch.equal(torch.cat([init_rows(spec, 0, 37, 7), init_rows(spec, 37, 100, 7)]), whole)
    assert 0.01 < whole.std().item() < 0.03 and not torch.equal(whole, init_rows(spec, 0, 100, 8))
    assert torch.equal(init_rows(specs[3], 5, 9, 7), torch.zeros(4, 32))


def test_lr_schedule():
    from dist.config import ScheduleConfig
    from dist.engine import lr_multiplier

    s = ScheduleConfig(warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    vals = [lr_multiplier(i, 20, s) for i in range(20)]
    assert vals[:4] == [0.25, 0.5, 0.75, 1.0] and vals[4] == pytest.approx(1.0)
    assert vals[-1] == pytest.approx(0.1, abs=0.01) and all(a >= b for a, b in zip(vals[4:], vals[5:], strict=False))
    lin = ScheduleConfig(decay="linear")
    assert lr_multiplier(10, 20, lin) == pytest.approx(0.5)
    assert lr_multiplier(5, 20, ScheduleConfig()) == 1.0


@pytest.mark.parametrize("history", [False, True])
def test_chunked_ranks_equal_one_matrix_ranks(history):
    from mmm4rec.metrics import chunked_target_ranks, target_ranks

    g = torch.Generator().manual_seed(0)
    u, V = torch.randn(16, 8, generator=g), torch.randn(101, 8, generator=g)
    V[7] = V[3]                                      # exact ties are decided the same way
    target = torch.randint(1, 101, (16,), generator=g)
    target[0] = 3
    hist = torch.randint(0, 101, (16, 5), generator=g) if history else None
    scores = u @ V.T
    scores[:, 0] = float("-inf")
    ref = target_ranks(scores, target, hist)
    for chunk in (7, 32, 100, 101, 500):
        assert torch.equal(chunked_target_ranks(u, V, target, chunk, history=hist), ref), chunk


class _SoloEnv:
    rank, world_size, is_main = 0, 1, True

    def barrier(self):
        pass


@pytest.mark.parametrize("remote", [False, True])
def test_checkpoint_store_commit_latest_retention(tmp_path, remote):
    from dist.checkpoint import CheckpointStore

    loc = f"file://{tmp_path}/ck" if remote else str(tmp_path / "ck")
    store = CheckpointStore(loc, _SoloEnv(), keep_last=2)
    assert store.latest() is None and not store.has_checkpoints()
    for step in (1, 2, 3, 4):
        staged = store.begin(f"step_{step:08d}")
        (staged / "payload.txt").write_text(str(step))
        store.commit(f"step_{step:08d}", staged, {"step": step}, protect=("step_00000001",))
    assert store.latest() == "step_00000004"
    assert store.tags() == ["step_00000001", "step_00000003", "step_00000004"]   # best + last 2
    with store.open("step_00000003") as ck:
        assert ck.state["step"] == 3 and (ck.path / "payload.txt").read_text() == "3"


def test_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    from dist.checkpoint import CheckpointDir, CheckpointStore

    store = CheckpointStore(str(tmp_path), _SoloEnv(), keep_last=3)
    staged = store.begin("step_00000010")
    (staged / "a").write_text("ok")
    store.commit("step_00000010", staged, {"step": 10})
    staged = store.begin("step_00000020")          # ... and the process dies while writing
    (staged / "a").write_text("partial")
    assert store.latest() == "step_00000010"
    assert CheckpointDir.resolve(tmp_path).state["step"] == 10
    staged = store.begin("step_00000020")          # the resumed run writes it again
    assert not (staged / "a").exists()
    store.commit("step_00000020", staged, {"step": 20})
    assert store.latest() == "step_00000020" and not list(tmp_path.glob(".tmp-*"))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_safe_torch_load_refuses_arbitrary_objects(tmp_path):
    """Every way DeepSpeed's *.pt files are read (our own loads, the engine's checkpoint
    engine, zero_to_fp32) refuses a pickled object, reads tensors, and leaves torch.load
    untouched for everyone else."""
    import types

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from dist.checkpoint import safe_load, safe_zero_to_fp32, use_safe_checkpoint_engine

    original = torch.load
    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    use_safe_checkpoint_engine(engine)
    p = tmp_path / "evil.pt"
    torch.save({"x": torch.ones(2), "obj": _Evil()}, p)
    with safe_zero_to_fp32() as zero_to_fp32:
        loaders = [safe_load, engine.checkpoint_engine.load,
                   lambda f, **kw: zero_to_fp32.torch.load(f, weights_only=False, **kw)]   # DeepSpeed's call
        assert torch.load is original
        for load in loaders:
            with pytest.raises(pickle.UnpicklingError):
                load(p, map_location="cpu")
        torch.save({"x": torch.ones(2)}, p)
        for load in loaders:
            assert torch.equal(load(p, map_location="cpu")["x"], torch.ones(2))
    assert zero_to_fp32.torch is torch and torch.load is original


def test_fsync_tree_tolerates_files_renamed_by_other_ranks(tmp_path, monkeypatch):
    """Ranks share one staging tree: a temp file another rank renames away while this
    rank walks the tree must not fail the commit (a race seen in a 2-process run)."""
    from dist import checkpoint

    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / ".tmp-other-rank").write_bytes(b"x")
    (tmp_path / "ranks" / "rank0.pt").write_bytes(b"y")
    real = checkpoint._fsync_file
    synced = []

    def racing_fsync(path):
        if path.name == ".tmp-other-rank":     # the other rank renames it just now
            path.rename(path.with_name("rank1.pt"))
        real(path)
        synced.append(path.name)

    monkeypatch.setattr(checkpoint, "_fsync_file", racing_fsync)
    checkpoint.fsync_tree(tmp_path)
    assert "rank0.pt" in synced


def test_model_section_is_typed_and_selected_by_its_type():
    import dataclasses

    from dist.config import MODEL_SECTIONS, MMM4RecSection, SASRecSection
    from mmm4rec.models import MODELS

    assert set(MODEL_SECTIONS) == set(MODELS)
    for name, section in MODEL_SECTIONS.items():   # every field of the model's config, plus `type`
        own = {f.name for f in dataclasses.fields(MODELS[name].config_cls)}
        assert {f.name for f in dataclasses.fields(section)} == own | {"type"}
    cfg = load(TINY_FT, "model.hidden_size=32")
    assert isinstance(cfg.model, MMM4RecSection) and cfg.model.hidden_size == 32
    assert cfg.model.max_len is None and "max_len" not in cfg.model_fields()   # data.max_len owns it
    sas = load(REPO / "configs" / "tiny_sasrec.yaml")
    assert isinstance(sas.model, SASRecSection) and sas.model_type == "sasrec"
    with pytest.raises(ConfigError, match=r"model\.hidden_size: expected an integer"):
        load(TINY_FT, "model.hidden_size=wide")
    with pytest.raises(ConfigError, match=r"model\.d_state: unknown key.*SASRecSection"):
        load(REPO / "configs" / "tiny_sasrec.yaml", "model.d_state=8")
