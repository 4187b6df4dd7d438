"""Real multi-process runs of dist/train.py on CPU (gloo), through the launchers.

One shared set of launches (module-scoped fixtures), several checks per launch:

    pretrain     2 procs, deepspeed launcher, ZeRO 2, office, in-batch CE
    scratch      2 procs, deepspeed launcher, ZeRO 3, scientific_mm, full CE, ID term,
                 a checkpoint every 3 steps (the reference of the kill/resume test)
    transfer     2 procs, deepspeed launcher, ZeRO 1, the same as scratch but from the
                 pretrain export, checkpoints through fsspec (a file:// URL: staged, uploaded,
                 committed by the `latest` pointer)
    killed       scratch's config, SIGKILLed (whole process group) after step 6 ...
    resumed      ... then resumed with --resume under torchrun
    equivalence  this file as a worker: 1 process and 2 processes over the same global
                 batches (dropout 0), losses / weights / distributed evaluation compared

Run with ``pytest -m slow tests/test_dist_runs.py`` (about 4-5 minutes on 2 cores, plus
the one-time sample-shard and DeepSpeed shm builds).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import finish, start_training
from s3_server import s3_server  # noqa: F401  (fixture)

from dist.cli import free_port

REPO = Path(__file__).resolve().parents[1]
TINY_PT = str(REPO / "configs" / "tiny_pretrain.yaml")
TINY_FT = str(REPO / "configs" / "tiny_finetune.yaml")
FT_SETTINGS = ["model.use_id=true", "checkpoint.every_steps=3", "train.epochs=2", "train.steps_per_epoch=8",
               "eval.patience=0"]
LAUNCH_TIMEOUT = 300

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------- helpers
def _env() -> dict:
    from dist.cli import launcher_env

    env = launcher_env(2)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _sets(overrides) -> list[str]:
    return [a for ov in overrides for a in ("--set", ov)]


def launch(out: Path, config: str, overrides=(), nproc: int = 2, launcher: str = "deepspeed",
           resume: bool = False, log_name: str = "launch.log", wait: bool = True):
    """Run dist/train.py; returns (returncode, log text) or the Popen when not waiting."""
    args = ["--config", config, "--output-dir", str(out), *_sets(overrides)] + (["--resume"] if resume else [])
    out.mkdir(parents=True, exist_ok=True)
    proc = start_training(args, out / log_name, _env(), nproc, launcher, master_port=free_port())
    if not wait:
        return proc
    return finish(proc, out / log_name, LAUNCH_TIMEOUT)


def _ok(result, what: str) -> None:
    rc, text = result
    assert rc == 0, f"{what} failed (rc {rc}):\n{text[-6000:]}"


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def sample_shards():
    """The bundled samples' shards, built once (shared with the quickstart's cache)."""
    from data_shards import ensure_sample_shards
    from dist.config import default_cache_dir

    out = default_cache_dir() / "samples"
    return {n: ensure_sample_shards(n, out, progress=False) for n in ("office", "scientific_mm")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_shards):
    root = tmp_path_factory.mktemp("dist_runs")
    r = {k: root / k for k in ("pretrain", "scratch", "transfer", "killed")}
    _ok(launch(r["pretrain"], TINY_PT, ["train.steps_per_epoch=15"]), "pretrain (ZeRO 2)")
    _ok(launch(r["scratch"], TINY_FT, [*FT_SETTINGS, "train.deepspeed=zero3"]), "scratch fine-tune (ZeRO 3)")
    _ok(launch(r["transfer"], TINY_FT, [*FT_SETTINGS, "train.deepspeed=zero1",
                                        f"checkpoint.dir=file://{root / 'transfer-checkpoints'}",
                                        f"train.init_from={r['pretrain'] / 'export'}"]), "transfer (ZeRO 1)")
    return r


# ---------------------------------------------------------------------- checks
@pytest.mark.parametrize("name,stage", [("pretrain", 2), ("scratch", 3), ("transfer", 1)])
def test_run_outputs_and_distributed_eval_equals_single_process(runs, name, stage):
    """Each ZeRO stage trains, evaluates, checkpoints and exports; the test metrics the
    2-process run computed equal a one-process evaluation of its best checkpoint."""
    from dist.config import load_experiment
    from dist.evaluate_cmd import evaluate_path
    from mmm4rec.models import MMM4Rec

    run = runs[name]
    m = _metrics(run)
    assert m["zero_stage"] == stage and m["world_size"] == 2 and m["device"] == "cpu"
    assert m["best_epoch"] >= 1 and m["test"]["count"] > 0
    assert set(m["timings"]) >= {"total_seconds", "train_seconds", "eval_seconds", "samples_per_second"}
    for f in ("config.yaml", "deepspeed.json", "logs/steps.csv", "logs/epochs.csv", "export/model.safetensors",
              "export/config.json"):
        assert (run / f).is_file(), f
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    load_experiment(run / "config.yaml")            # the resolved config is a valid experiment
    MMM4Rec.from_pretrained(run / "export")
    ckpts = Path(m["best_checkpoint"].removeprefix("file://")).parent
    best = ckpts / m["best_checkpoint"].rsplit("/", 1)[1]
    assert (ckpts / "latest").is_file() and (best / "checkpoint.json").is_file()
    single = evaluate_path(str(ckpts), None, "test")   # best checkpoint, plain model, one process
    for k, v in m["test"].items():
        assert single[k] == pytest.approx(v, abs=1e-9), k


def test_export_then_from_pretrained_gives_identical_scores(runs, tmp_path):
    """`mmm4rec export` (any stage) == the run's export, and from_pretrained scores like
    the trained model (no ID term in the pretrain model, so the export is all of it)."""
    import torch
    from safetensors.torch import load_file

    from data_shards import SequenceLoader, load_item_table
    from dist.checkpoint import CheckpointDir
    from dist.export import model_from_checkpoint
    from dist.main import main as mmm4rec_main
    from mmm4rec.models import MMM4Rec

    for name in ("pretrain", "scratch"):        # ZeRO 2 and ZeRO 3 checkpoints (ZeRO 1: the transfer run's export)
        out = tmp_path / f"export-{name}"
        assert mmm4rec_main(["export", str(runs[name]), str(out)]) == 0
        a, b = load_file(out / "model.safetensors"), load_file(runs[name] / "export" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ours = json.loads((runs[name] / "export/config.json").read_text())
        assert json.loads((out / "config.json").read_text()) == ours

    run = runs["pretrain"]
    table = load_item_table(table_url(run))
    trained = model_from_checkpoint(CheckpointDir.resolve(run), table).eval()
    exported = MMM4Rec.from_pretrained(run / "export").eval()
    exported.set_item_table(table)
    batch = next(iter(SequenceLoader(table_url(run), "test", batch_size=64, shuffle=False, num_workers=0)))
    with torch.no_grad():
        assert torch.equal(trained.full_sort_predict(batch), exported.full_sort_predict(batch))


def table_url(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["url"]


def test_eval_at_start_is_the_zero_shot_of_the_export(runs, tmp_path):
    """``eval.at_start``: epoch 0 of the history is the valid evaluation of the initial
    weights, here the pretrain export's (no ID term, so the export is the whole model):
    equal to a one-process evaluation of that export; it never becomes the best epoch."""
    from dist.evaluate_cmd import evaluate_path

    out = tmp_path / "at_start"
    export = runs["pretrain"] / "export"
    _ok(launch(out, TINY_FT, ["model.use_id=false", "train.epochs=1", "train.steps_per_epoch=2", "eval.test=false",
                              "eval.at_start=true", f"train.init_from={export}"], nproc=1, launcher="none"),
        "fine-tune with eval.at_start")
    m = _metrics(out)
    zero, first = m["history"][0], m["history"][1]
    assert zero["epoch"] == 0 and zero["step"] == 0 and "train_loss" not in zero
    assert first["epoch"] == 1 and "train_loss" in first and m["best_epoch"] == 1
    single = evaluate_path(str(export), str(out / "config.yaml"), "valid")
    shown = {k.removeprefix("valid/"): v for k, v in zero.items() if k.startswith("valid/")}
    assert {"hr@10", "ndcg@10", "mrr@10"} <= shown.keys()
    for k, v in shown.items():
        assert v == pytest.approx(single[k], abs=1e-9), k


def test_finetune_from_export_starts_from_its_weights(runs):
    """The transfer run (ZeRO 1, from the pretrain export) and the scratch run (ZeRO 3,
    random dense init) are the same experiment otherwise: the transfer run's first
    evaluation is better."""
    first = {k: _metrics(runs[k])["history"][0] for k in ("scratch", "transfer")}
    assert first["transfer"]["valid/ndcg@10"] > first["scratch"]["valid/ndcg@10"], first
    assert first["transfer"]["valid/hr@10"] > first["scratch"]["valid/hr@10"], first
    assert "initialised the dense weights from" in (runs["transfer"] / "launch.log").read_text()


def test_kill_and_resume_is_exact(runs):
    """SIGKILL a real 2-process run after step 6, resume it (under torchrun): the final
    weights (dense + ID tables + their optimizer state) and the metrics equal the
    uninterrupted run's."""
    import torch
    from safetensors.torch import load_file

    out = runs["killed"]
    proc = launch(out, TINY_FT, [*FT_SETTINGS, "train.deepspeed=zero3"], wait=False)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + LAUNCH_TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step_00000006":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + (out / "launch.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text().strip()
    assert killed_at < "step_00000016"
    _ok(launch(out, TINY_FT, [*FT_SETTINGS, "train.deepspeed=zero3"], launcher="torchrun", resume=True,
               log_name="resume.log"), "resume")
    assert f"resumed from {out / 'checkpoints' / killed_at}" in (out / "resume.log").read_text()

    ref, got = runs["scratch"], out
    a, b = load_file(ref / "export/model.safetensors"), load_file(got / "export/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    last = "checkpoints/step_00000016/ranks"
    for r in (0, 1):
        x = load_file(ref / last / f"rank_0000{r}.safetensors")
        y = load_file(got / last / f"rank_0000{r}.safetensors")
        for k in x:
            if not k.startswith("rng"):
                assert torch.allclose(x[k], y[k], atol=1e-6, rtol=0), k
    ma, mb = _metrics(ref), _metrics(got)
    assert ma["history"] == mb["history"]
    assert ma["test"] == mb["test"] and ma["best_epoch"] == mb["best_epoch"]


@pytest.mark.s3
def test_checkpoints_on_s3_commit_resume_and_export(s3_server, sample_shards, tmp_path):  # noqa: F811
    """Checkpoints on a real S3 endpoint (moto): written through fsspec, committed by the
    `latest` object, read back by --resume and by the export (one process)."""
    import s3fs

    bucket = s3_server.make_bucket("mmm4rec-ckpt")
    os.environ.update(s3_server.env())           # the launched run inherits the endpoint and credentials
    try:
        out = tmp_path / "s3run"
        sets = ["train.epochs=2", "train.steps_per_epoch=3", "checkpoint.every_steps=2", "model.use_id=true",
                f"checkpoint.dir={bucket}/run"]
        _ok(launch(out, TINY_FT, sets, nproc=1), "run with S3 checkpoints")
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
        assert fs.cat_file("mmm4rec-ckpt/run/latest").decode() == "step_00000006"
        assert fs.exists("mmm4rec-ckpt/run/step_00000006/checkpoint.json")
        assert not (out / "checkpoints").exists()
        _ok(launch(out, TINY_FT, sets, nproc=1, resume=True, log_name="resume.log"), "resume from S3")
        assert f"resumed from {bucket}/run/step_00000006" in (out / "resume.log").read_text()
        assert (out / "export" / "model.safetensors").is_file()
    finally:
        for k in s3_server.env():
            os.environ.pop(k, None)


def test_bad_init_from_fails_before_training(runs, tmp_path):
    """An export whose shapes do not fit the model config: exit 2, every mismatch listed,
    nothing trained (one process)."""
    out = tmp_path / "mismatch"
    rc, text = launch(out, TINY_FT, ["model.hidden_size=64", "model.inner_size=128",
                                     f"train.init_from={runs['pretrain'] / 'export'}"], nproc=1)
    assert rc == 2, text[-3000:]
    assert "is incompatible with the model config" in text
    assert "adapter.text.weight: export (32, 384) vs model (64, 384)" in text
    assert not (out / "checkpoints").exists()


# ---------------------------------------------------------------------- bf16 autocast
def test_run_with_eval_ks_10_only_finishes_and_reports_its_ks(sample_shards, tmp_path):
    """``eval.ks: [10]``: the run exits 0 after metrics.json (whose metrics are @10 only)
    and logs the configured cut-offs (it read hr@50 unconditionally and failed rank 0)."""
    rc, log = launch(tmp_path / "run", TINY_FT, ["eval.ks=[10]", "train.epochs=1", "train.steps_per_epoch=2"],
                     nproc=1)
    _ok((rc, log), "eval.ks=[10] run")
    m = _metrics(tmp_path / "run")
    assert {k for k in m["test"] if "@" in k} == {"hr@10", "ndcg@10", "mrr@10"}, m["test"]
    assert f"best epoch 1: test hr@10 {m['test']['hr@10']:.4f}, ndcg@10 {m['test']['ndcg@10']:.4f}" in log, log[-3000:]


def _step_losses(run: Path) -> list[float]:
    lines = (run / "logs" / "steps.csv").read_text().splitlines()
    head = lines[0].split(",")
    return [float(row.split(",")[head.index("loss")]) for row in lines[1:]]


def test_bf16_autocast_run_tracks_fp32(sample_shards, tmp_path):
    """train.precision=bf16 is torch autocast around the dense forward (DeepSpeed stays
    fp32): the path a GPU run takes by default, run here on CPU with 2 processes. On the
    same batches (dropout off) its per-step losses track an fp32 run's."""
    same = ["model.dropout_prob=0.0", "model.embedding_drop_prob=0.0", "model.time_dropout_prob=0.0",
            "train.epochs=1", "train.max_steps=3", "train.log_every_steps=1"]
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    losses = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        _ok(launch(run, TINY_PT, [*same, f"train.precision={precision}"]), f"{precision} run")
        assert _metrics(run)["precision"] == precision
        losses[precision] = _step_losses(run)
    assert len(losses["fp32"]) == len(losses["bf16"]) == 3
    for step, (a, b) in enumerate(zip(losses["fp32"], losses["bf16"], strict=True), 1):
        assert abs(b - a) <= 1e-2 * abs(a), f"step {step}: bf16 loss {b} vs fp32 {a}"
    assert losses["bf16"] != losses["fp32"]        # autocast did run: bf16 rounds differently
    # DeepSpeed's CPU shm all-reduce op is skipped (dist.env._skip_deepspeed_shm_op): it left
    # a 66 MB RAM-backed segment per rank and launch in /dev/shm
    leaked = (set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()) - before
    assert not leaked, f"DeepSpeed shm segments left behind: {sorted(map(str, leaked))}"


# ---------------------------------------------------------------------- 1 vs 2 processes
GLOBAL_BATCH, EQ_STEPS = 64, 4
EQ_OVERRIDES = ["model.dropout_prob=0.0", "model.embedding_drop_prob=0.0", "model.time_dropout_prob=0.0",
                "model.use_id=true", "train.deepspeed=zero2", f"data.batch_size={GLOBAL_BATCH}",
                # SGD everywhere: any error in how gradients are scaled or reduced shows in the weights
                # (Adam-type updates hide scale errors and amplify summation-order noise of ~0 gradients)
                "train.optimizer.name=sgd", "train.optimizer.lr=0.5", "train.optimizer.momentum=0.9",
                "train.optimizer.weight_decay=0.001", "tables.optimizer=sgd", "tables.lr=2.0"]


def _equivalence_worker(out: str) -> None:
    """Train EQ_STEPS steps on the same global batches (each rank takes its slice of
    rows), then evaluate on valid; rank 0 writes losses, metrics and the weights."""
    sys.path.insert(0, str(REPO))
    from dist.env import prepare_process_env

    prepare_process_env()
    import torch
    import torch.distributed as tdist
    from safetensors.torch import save_file

    from data_shards import SequenceLoader
    from dist.build import build, preflight
    from dist.config import load_experiment
    from dist.env import init_distributed
    from mmm4rec.contract import RecModel
    from mmm4rec.evaluate import evaluate

    cfg = load_experiment(TINY_FT, EQ_OVERRIDES)
    ds = preflight(cfg, TINY_FT)
    env = init_distributed()
    parts = build(cfg, env, ds)
    model = parts.model
    assert isinstance(model, RecModel)   # the distributed wrapper answers the one model contract
    per_rank = GLOBAL_BATCH // env.world_size
    loader = SequenceLoader(parts.cfg.data, "train", batch_size=GLOBAL_BATCH, rank=0, world_size=1,
                            shuffle=False, num_workers=0)
    losses = []
    for _, batch in zip(range(EQ_STEPS), loader, strict=False):
        rows = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
        loss = model.loss(batch.rows(rows), "full")
        model.backward(loss.value)
        model.step()
        tot = env.all_reduce_sum(torch.stack([loss.total.double(), loss.weight.double()]))
        losses.append(float(tot[0] / tot[1]))
    metrics = evaluate(model, parts.loaders["valid"], ks=(10, 20, 50), all_reduce=env.all_reduce_sum)
    dense = {k: v.detach().clone() for k, v in model.engine.module.state_dict().items()}
    table = {}
    if model.tables.has_trainable:
        table = {lo: w.detach().clone() for lo, w in model.tables.local_shards("trainable")}
    tables = env.all_gather_object(table)
    if env.rank == 0:
        rows = [t for part in tables for _, t in sorted(part.items())]
        full = {"table": torch.cat(rows)} if rows else {}
        save_file({**{f"dense.{k}": v for k, v in dense.items()}, **full}, f"{out}.safetensors")
        Path(f"{out}.json").write_text(json.dumps({"losses": losses, "valid": metrics}))
    tdist.barrier()


def test_same_global_batch_on_one_and_two_processes(sample_shards, tmp_path):
    import torch
    from safetensors.torch import load_file

    from dist.cli import launcher_command

    env = _env()
    results = {}
    for n in (1, 2):
        out = tmp_path / f"eq{n}"
        cmd = [sys.executable, __file__] if n == 1 else launcher_command(2, [], "deepspeed", free_port())[:-1] + [
            __file__]
        proc = subprocess.run(cmd + ["--equivalence-worker", str(out)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=LAUNCH_TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        results[n] = (json.loads(Path(f"{out}.json").read_text()), load_file(f"{out}.safetensors"))
    (one, w1), (two, w2) = results[1], results[2]
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5, abs=1e-6)
    assert not torch.equal(w1["table"], torch.zeros_like(w1["table"]))     # the ID rows did train
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6), (k, (w1[k] - w2[k]).abs().max())
    for k, v in one["valid"].items():                     # distributed evaluation == one process
        assert two["valid"][k] == pytest.approx(v, abs=1e-6), k


# ---------------------------------------------------------------------- another world size
WS_OVERRIDES = ["model.dropout_prob=0.0", "model.embedding_drop_prob=0.0", "model.time_dropout_prob=0.0",
                "model.use_id=true", "train.deepspeed=zero2", "train.epochs=1", "train.steps_per_epoch=0",
                "train.log_every_steps=1", "checkpoint.every_steps=5", "checkpoint.keep_last=10", "eval.test=false"]
WS_GLOBAL_BATCH, WS_SWITCH = 512, "step_00000005"


def _continue_from(src: Path, tag: str, out: Path) -> None:
    """A fresh run directory whose only checkpoint is ``src``'s ``tag`` (as if it had stopped there)."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag)


def _final_state(run: Path) -> dict:
    return json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "checkpoint.json")
                      .read_text())


def test_resume_on_another_world_size_continues_the_same_run(sample_shards, tmp_path):
    """N steps (a whole epoch, 22 steps of 512 rows) on 2 processes, against 2 processes
    for 5 steps then 1 process to the end (and 1 -> 2), same global batch: per-step losses
    equal within float tolerance, the epoch's samples all seen once, the same weights.
    Dense NAdam state (ZeRO 2 partitions), the ID table + its Adagrad state (row-wise
    sharded) and the loader position are all carried over."""
    import torch
    from safetensors.torch import load_file

    runs = {}
    for n in (2, 1):
        run = tmp_path / f"ref{n}"
        _ok(launch(run, TINY_FT, [*WS_OVERRIDES, f"data.batch_size={WS_GLOBAL_BATCH // n}"], nproc=n), f"{n} procs")
        runs[n] = run
    for old, new in ((2, 1), (1, 2)):
        out = tmp_path / f"switch{old}to{new}"
        _continue_from(runs[old], WS_SWITCH, out)
        _ok(launch(out, TINY_FT, [*WS_OVERRIDES, f"data.batch_size={WS_GLOBAL_BATCH // new}"], nproc=new,
                   resume=True), f"{old} -> {new} procs")
        log = (out / "launch.log").read_text()
        assert f"resumed from {out / 'checkpoints' / WS_SWITCH}: epoch 1, step 5" in log, log[-3000:]
        assert f"world {new} (gloo, cpu)" in log
        ref, got = _step_losses(runs[old]), _step_losses(out)
        assert len(ref) == 22 and len(got) == 22 - 5, (len(ref), len(got))
        worst = max(abs(a - b) for a, b in zip(ref[5:], got, strict=True))
        print(f"{old} -> {new} processes: largest per-step loss difference {worst:.2e} over {len(got)} steps")
        assert got == pytest.approx(ref[5:], rel=1e-5, abs=1e-6)
        # the epoch's loss (over every sample of the epoch, summed across ranks) and its count
        st_ref, st_got = _final_state(runs[old]), _final_state(out)
        assert st_got["samples"] == st_ref["samples"] == num_samples_of_epoch(sample_shards)
        assert st_got["history"][0]["train_loss"] == pytest.approx(st_ref["history"][0]["train_loss"], rel=1e-6)
        assert st_got["history"][0]["valid/ndcg@10"] == pytest.approx(st_ref["history"][0]["valid/ndcg@10"],
                                                                        abs=1e-4)
        a, b = load_file(runs[old] / "export/model.safetensors"), load_file(out / "export/model.safetensors")
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())


def num_samples_of_epoch(sample_shards) -> int:
    from data_shards import SequenceLoader

    return SequenceLoader(sample_shards["scientific_mm"], "train", batch_size=1, num_workers=0).num_samples


def test_mid_epoch_resume_with_accumulation_and_a_short_last_step(sample_shards, tmp_path):
    """The release's recipe accumulates micro-batches and gives the last optimizer step of
    an epoch the remainder (22 micro-batches of 512 with 4 accumulated: 6 steps, the last of
    2). A run stopped mid-epoch resumes (it was refused before: the check counted 22 // 4 = 5
    steps against the trainer's 6) and continues the same run: the per-step losses of the
    uninterrupted run, every sample of the epoch once."""
    sets = [*WS_OVERRIDES, "data.batch_size=512", "train.gradient_accumulation_steps=4",
            "checkpoint.every_steps=2"]
    ref = tmp_path / "ref"
    _ok(launch(ref, TINY_FT, sets, nproc=1), "uninterrupted")
    want = _step_losses(ref)
    assert len(want) == 6, want
    out = tmp_path / "resumed"
    _continue_from(ref, "step_00000002", out)
    rc, text = launch(out, TINY_FT, sets, nproc=1, resume=True)
    assert rc == 0, text[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'}: epoch 1, step 2" in text, text[-3000:]
    assert _step_losses(out) == pytest.approx(want[2:], rel=1e-5, abs=1e-6)
    assert _final_state(out)["samples"] == _final_state(ref)["samples"] == num_samples_of_epoch(sample_shards)


def test_resume_on_another_world_size_refuses_what_cannot_change(sample_shards, tmp_path):
    src = tmp_path / "src"
    _ok(launch(src, TINY_FT, [*WS_OVERRIDES, "data.batch_size=64", "train.steps_per_epoch=5",
                              "checkpoint.every_steps=2"], nproc=2), "2 procs")
    cases = [
        (["data.batch_size=64"], "global batch 128); this run has 1 x 64 x 1 = 64",
         "set data.batch_size=128"),
        (["data.batch_size=128", "model.hidden_size=64"], "the model cannot change on resume",
         "hidden_size: 32 -> 64"),
        (["data.batch_size=128", "train.deepspeed=zero3"], "used ZeRO stage 2, the config says 3", None),
    ]
    for i, (overrides, *needles) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        _continue_from(src, "step_00000002", out)
        sets = [*WS_OVERRIDES, "train.steps_per_epoch=5", *overrides]
        rc, text = launch(out, TINY_FT, sets, nproc=1, resume=True)
        assert rc == 2, (overrides, text[-3000:])
        for needle in filter(None, needles):
            assert needle in text, (needle, text[-3000:])


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--equivalence-worker", required=True)
    ap.add_argument("--local_rank", type=int, default=None)
    a = ap.parse_args()
    _equivalence_worker(a.equivalence_worker)
