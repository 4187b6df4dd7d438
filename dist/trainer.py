"""The training run: setup, the loop, evaluation, early stopping, checkpoints, export.

``run(cfg, ...)`` is everything ``dist/train.py`` does after parsing arguments:

1. checks that need no processes (config, DeepSpeed JSON, ``init_from`` present),
2. process group, data (bundled sample shards built once by rank 0), model config
   from the manifest, ``init_from`` shapes checked -- all before any training,
3. torchrec item tables + DeepSpeed dense engine (``dist/model.py``),
4. the loop: epochs of optimizer steps (``gradient_accumulation_steps`` micro-batches
   each), validation every ``eval.every_epochs``, early stopping on ``eval.metric``,
   a checkpoint at every epoch end and every ``checkpoint.every_steps`` steps,
5. at the end: ``OUTPUT_DIR/export`` from the best checkpoint, ``metrics.json``.

The test split is evaluated whenever validation improves (same weights as the best
checkpoint, so no reload of ZeRO-3 partitions is needed); ``metrics.json`` reports the
test metrics of the best checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from mmm4rec.config import ConfigError, redact_secrets, save_yaml
from mmm4rec.evaluate import evaluate

from .checkpoint import ENGINE_TAG, CheckpointStore, tag_for_step
from .config import ExperimentConfig, zero_stage
from .env import init_distributed, rng_isolated, rng_isolated_batches, rng_state, set_rng_state
from .errors import NonFiniteGuard, mark_training_loop
from .monitor import Monitor
from .reshard import check_same_model, check_world_size_change, load_dense_resharded, resharded_rank_state

__all__ = ["run", "Trainer", "TrainerState", "steps_in_epoch", "micro_batches_in_step", "is_improvement"]


@dataclasses.dataclass
class TrainerState:
    """Saved in every checkpoint (``checkpoint.json``); epochs are 0-based here."""

    epoch: int = 0               # the epoch in progress (== epochs completed at an epoch-end checkpoint)
    epoch_step: int = 0          # optimizer steps done in that epoch
    step: int = 0                # optimizer steps done in the run
    best_metric: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    best_tag: str | None = None
    best_valid: dict | None = None
    best_test: dict | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    history: list = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    samples: float = 0.0         # real (weight 1) training samples seen, all ranks
    epoch_loss: list = dataclasses.field(default_factory=lambda: [0.0, 0.0])   # this rank's sum loss*w, sum w
                                 # (per rank: restored from ranks/rank_N.json)


# ---------------------------------------------------------------------- the recipe
def steps_in_epoch(micro_batches: int, gas: int) -> int:
    """Optimizer steps of an epoch of ``micro_batches`` per rank: every micro-batch is
    used, the last step takes the remainder (the release's recipe: 34 micro-batches of
    1,024 with 8 accumulated are 5 steps, the last of 2 micro-batches)."""
    return -(-micro_batches // gas)


def micro_batches_in_step(micro_batches: int, gas: int, epoch_step: int) -> int:
    """Micro-batches of optimizer step ``epoch_step`` (0-based): ``gas``, fewer at the end."""
    return max(0, min(gas, micro_batches - epoch_step * gas))


def is_improvement(value: float, best: float | None, tie_improves: bool = False) -> bool:
    """Whether a validation value improves on the best so far; with ``tie_improves`` an
    equal value counts (the release's early stopping: ``>=``)."""
    if best is None:
        return True
    return value >= best if tie_improves else value > best


# ---------------------------------------------------------------------- the run
class Trainer:
    def __init__(self, cfg: ExperimentConfig, model, loaders: dict, store: CheckpointStore, monitor: Monitor,
                 output_dir: Path, env, steps_per_epoch: int, meta: dict):
        self.cfg = cfg
        self.model = model
        self.loaders = loaders
        self.store = store
        self.monitor = monitor
        self.output_dir = output_dir
        self.env = env
        self.steps_per_epoch = steps_per_epoch
        self.meta = meta    # written into every checkpoint: config, model config, stage, world size
        self.state = TrainerState()
        self.micro_batches_per_epoch = len(loaders["train"])
        self.t_start = time.time()
        self.wall_time_hit = False
        self._log_loss = torch.zeros(2, dtype=torch.float64)   # (sum loss*w, sum w) since last log
        self._log_t = time.time()

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> str:
        st, env, tables = self.state, self.env, self.model.tables
        tag = tag_for_step(st.step)
        staged = self.store.begin(tag)
        self.model.engine.save_checkpoint(str(staged), tag=ENGINE_TAG, save_latest=False)
        (staged / "ranks").mkdir(exist_ok=True)
        tensors, table_meta = tables.state_tensors()
        rng_meta, rng_tensors = rng_state()
        from safetensors.torch import save_file

        base = staged / "ranks" / f"rank_{env.rank:05d}"
        save_file({**tensors, **rng_tensors}, str(base.with_suffix(".safetensors")))
        rank_meta = {**table_meta, "rank": env.rank, "loader": self.loaders["train"].state_dict(), "rng": rng_meta,
                     "epoch_loss": st.epoch_loss, "log_loss": self._log_loss.tolist()}
        base.with_suffix(".json").write_text(json.dumps(rank_meta))
        if env.is_main:
            save_yaml(self.cfg, staged / "config.yaml")
            (staged / "model_config.json").write_text(json.dumps(self.meta["model_config"], indent=2))
        state = {**dataclasses.asdict(st), "tag": tag, "world_size": env.world_size,
                 "zero_stage": self.meta["zero_stage"], "time": time.time()}
        self.store.commit(tag, staged, state, protect=(st.best_tag,))
        return tag

    def restore(self, tag: str) -> None:
        """Everything of checkpoint ``tag``: engine, tables + optimizer, loader, RNG, state."""
        from .tables import ShardReader

        env = self.env
        with self.store.open(tag) as ck:
            saved = ck.state
            if saved["zero_stage"] != self.meta["zero_stage"]:
                raise ConfigError(f"--resume: {self.store.describe(tag)} used ZeRO stage {saved['zero_stage']}, "
                                  f"the config says {self.meta['zero_stage']}")
            check_same_model(ck, self.store.describe(tag), self.meta)
            resharding = saved["world_size"] != env.world_size     # dist/reshard.py
            if resharding:
                check_world_size_change(ck, self.store.describe(tag), self.cfg, self.meta, env.world_size)
                load_dense_resharded(self.model.engine, ck)
                rank_meta, rank_tensors = resharded_rank_state(ck, env.rank)
            else:
                path, _ = self.model.engine.load_checkpoint(str(ck.path), tag=ENGINE_TAG)
                if path is None:
                    raise RuntimeError(f"DeepSpeed could not load {ck.engine_dir}")
                rank_meta, rank_tensors = ck.rank_state(env.rank)
            files, metas = ck.rank_files()
            self.model.tables.load_state(ShardReader(files, metas), load_optimizer=True)
        fields = {f.name for f in dataclasses.fields(TrainerState)}
        self.state = TrainerState(**{k: v for k, v in saved.items() if k in fields})
        loader = self.loaders["train"]
        loader.set_epoch(self.state.epoch)
        if self.state.epoch_step:
            loader.load_state_dict(rank_meta["loader"])   # another world size: the epoch keeps its old layout
            steps = steps_in_epoch(len(loader), self.cfg.train.gradient_accumulation_steps)
            steps = min(steps, self.cfg.train.steps_per_epoch or steps)
            if steps != self.steps_per_epoch:
                raise ConfigError(f"--resume: {self.store.describe(tag)}: the epoch in progress has {steps} steps "
                                  f"as {saved['world_size']} processes cut it, {self.steps_per_epoch} as "
                                  f"{env.world_size} do; set train.steps_per_epoch to at most "
                                  f"{min(steps, self.steps_per_epoch)} to change the number of processes mid-epoch")
        if rank_tensors is not None:
            set_rng_state(rank_meta["rng"], rank_tensors)
        self.state.epoch_loss = list(rank_meta["epoch_loss"])        # per rank, not rank 0's
        self._log_loss = torch.tensor(rank_meta["log_loss"], dtype=torch.float64)
        self.sync_table_lr()

    # ------------------------------------------------------------------ pieces
    def _lr_mult(self) -> float:
        """The item table's LR factor now: the schedule at this step x its param group's."""
        factor = getattr(self.model, "rows_lr_factor", None)
        if factor is not None:
            return float(factor(self.state.step))
        base = self.cfg.train.optimizer.lr
        return float(self.model.engine.get_lr()[0]) / base if base else 1.0

    def sync_table_lr(self) -> None:
        tables = self.model.tables
        if tables.has_trainable and self.cfg.tables.follow_schedule:
            tables.set_lr(tables.base_lr * self._lr_mult())

    def _evaluate(self, split: str) -> dict:
        e = self.cfg.eval
        t0 = time.time()
        metrics = evaluate(self.model, rng_isolated_batches(self.loaders[split]), ks=e.ks,
                           mask_history=e.mask_history, item_chunk_size=e.item_chunk_size,
                           all_reduce=self.env.all_reduce_sum)
        if split == "test" and e.top_k_lists:
            self._write_top_k(split, e.top_k_lists)
        self.state.eval_seconds += time.time() - t0
        return metrics

    def _write_top_k(self, split: str, k: int) -> None:
        """Each user's top-K of ``split`` (``eval.top_k_lists``): ``top_k/<split>.rank<r>.jsonl``,
        one JSON line ``{"user", "items", "scores"}`` per user of this rank (item ids are the
        shard set's 1..|I|); collective (the sharded ranking merges the ranks' lists)."""
        from mmm4rec.evaluate import top_k_lists

        folder = self.output_dir / "top_k"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{split}.rank{self.env.rank}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for row in top_k_lists(self.model, rng_isolated_batches(self.loaders[split]), k,
                                   self.cfg.eval.item_chunk_size):
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)

    def _log_step(self, epoch: int) -> None:
        st = self.state
        sums = self.env.all_reduce_sum(self._log_loss.clone())
        dt = max(time.time() - self._log_t, 1e-9)
        loss = float(sums[0] / max(float(sums[1]), 1.0))
        scalars = {"loss": loss, "lr": float(self.model.engine.get_lr()[0]), "samples_per_s": float(sums[1]) / dt}
        self.monitor.step_scalars(st.step, epoch + 1, scalars)
        self.monitor.advance(0, loss=loss, lr=scalars["lr"])
        self._log_loss.zero_()
        self._log_t = time.time()

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        cfg, st = self.cfg, self.state
        gas = cfg.train.gradient_accumulation_steps
        model, loader = self.model, self.loaders["train"]
        guard = NonFiniteGuard(self.env, cfg.train.max_nonfinite_steps)
        mark_training_loop()
        if cfg.eval.at_start and st.step == 0 and not st.history:
            self._evaluate_start()
        model.train()
        while st.epoch < cfg.train.epochs and not st.stopped_early and not self.wall_time_hit:
            if cfg.train.max_steps and st.step >= cfg.train.max_steps:
                break
            epoch = st.epoch
            loader.set_epoch(epoch)   # keeps a resumed position of the same epoch
            self.monitor.start_epoch(epoch + 1, self.steps_per_epoch, initial=st.epoch_step)
            t0 = time.time()
            epoch_loss = torch.tensor(st.epoch_loss, dtype=torch.float64)   # carried over a mid-epoch resume
            it = iter(loader)
            while st.epoch_step < self.steps_per_epoch:
                if cfg.train.max_steps and st.step >= cfg.train.max_steps:
                    break
                bad = 0
                n_micro = micro_batches_in_step(self.micro_batches_per_epoch, gas, st.epoch_step)
                for j in range(n_micro):
                    with rng_isolated():
                        batch = next(it)
                    model.set_accumulation_boundary(j == n_micro - 1)
                    loss = model.loss(batch, cfg.train.loss, mask_duplicates=cfg.train.mask_duplicates,
                                      chunk_size=cfg.train.loss_chunk_size)
                    model.backward(loss.value)
                    model.step()
                    part = torch.stack([loss.total.double().cpu(), loss.weight.double().cpu()])
                    if not torch.isfinite(part[0]):
                        bad += 1      # not summed: one NaN would hide every later loss
                        continue
                    self._log_loss += part
                    epoch_loss += part
                guard.after_step(bad, st.step + 1, epoch + 1)   # stops the run before any save/eval/export
                st.epoch_loss = epoch_loss.tolist()
                st.step += 1
                st.epoch_step += 1
                self.sync_table_lr()
                self.monitor.advance(1)
                if st.step % cfg.train.log_every_steps == 0 or st.epoch_step == self.steps_per_epoch:
                    self._log_step(epoch)   # (also at every epoch end: few steps per epoch still log)
                if self.out_of_wall_time():
                    break
                every = cfg.checkpoint.every_steps
                if every and st.step % every == 0 and st.epoch_step < self.steps_per_epoch:
                    st.train_seconds += time.time() - t0
                    t0 = time.time()
                    self.save()
            del it
            if self.wall_time_hit:
                self.monitor.log(f"train.max_wall_time ({cfg.train.max_wall_time:g} s) reached at step {st.step} "
                                 f"(epoch {epoch + 1}, step {st.epoch_step}/{self.steps_per_epoch}): stopping")
            self.monitor.end_epoch()
            st.train_seconds += time.time() - t0
            if self.wall_time_hit and st.epoch_step < self.steps_per_epoch:
                self._stop_mid_epoch(epoch)
                break
            totals = self.env.all_reduce_sum(epoch_loss)
            st.samples += float(totals[1])
            st.epoch_loss = [0.0, 0.0]
            self._end_epoch(epoch, float(totals[0] / max(float(totals[1]), 1.0)))
        self.monitor.log(f"training done: {st.step} steps, {st.epoch} epochs"
                         + (" (early stop)" if st.stopped_early else ""))

    def _evaluate_start(self) -> None:
        """``eval.at_start``: the initial weights on valid, as epoch 0 of the history (no
        train loss; not a candidate for the best checkpoint, which is always trained)."""
        valid = self._evaluate("valid")
        row = {f"valid/{k}": v for k, v in valid.items() if k != "count"}
        self.state.history.append({"epoch": 0, "step": 0, **row})
        self.monitor.log(f"epoch 0 (initial weights): valid {self.cfg.eval.metric} {valid[self.cfg.eval.metric]:.4f}")

    def out_of_wall_time(self) -> bool:
        """``train.max_wall_time`` (seconds since this process started the run) used up:
        all ranks agree (rank 0's clock decides), the loop stops after the current step,
        evaluates, and the run ends normally (best checkpoint exported, metrics.json).
        A ``--resume`` of such a run continues it (the limit is per process)."""
        limit = self.cfg.train.max_wall_time
        if not limit or self.wall_time_hit:
            return self.wall_time_hit
        flag = torch.tensor([1.0 if (self.env.is_main and time.time() - self.t_start >= limit) else 0.0],
                            dtype=torch.float64)
        self.wall_time_hit = bool(self.env.all_reduce_sum(flag)[0] > 0)
        return self.wall_time_hit

    def _stop_mid_epoch(self, epoch: int) -> None:
        """The wall-clock limit struck inside an epoch: checkpoint here (a ``--resume``
        continues this epoch at the next step); the run's best stays the best evaluated
        checkpoint, or, when nothing was evaluated yet, these weights are evaluated and
        become it (so there is always something to export and test)."""
        cfg, st = self.cfg, self.state
        if st.best_tag is None:
            valid = self._evaluate("valid")
            st.best_metric, st.best_valid = valid[cfg.eval.metric], valid
            st.best_epoch, st.best_step = epoch + 1, st.step
            if cfg.eval.test:
                st.best_test = self._evaluate("test")
            st.best_tag = tag_for_step(st.step)     # the checkpoint saved right below
            self.monitor.log(f"epoch {epoch + 1} (partial, {st.epoch_step}/{self.steps_per_epoch} steps): valid "
                             f"{cfg.eval.metric} {st.best_metric:.4f}")
        self.save()

    def _end_epoch(self, epoch: int, train_loss: float) -> None:
        cfg, st = self.cfg, self.state
        last = ((epoch + 1 == cfg.train.epochs) or bool(cfg.train.max_steps and st.step >= cfg.train.max_steps)
                or self.wall_time_hit)
        row = {"train_loss": train_loss}
        improved = False
        if (epoch + 1) % cfg.eval.every_epochs == 0 or last:
            valid = self._evaluate("valid")
            row.update({f"valid/{k}": v for k, v in valid.items() if k != "count"})
            value = valid[cfg.eval.metric]
            improved = is_improvement(value, st.best_metric, cfg.eval.tie_improves)
            if improved:
                st.best_metric, st.best_epoch, st.best_step, st.best_valid = value, epoch + 1, st.step, valid
                st.bad_evals = 0
                if cfg.eval.test:
                    st.best_test = self._evaluate("test")
            else:
                st.bad_evals += 1
                if cfg.eval.patience and st.bad_evals >= cfg.eval.patience:
                    st.stopped_early = True
            self.monitor.log(f"epoch {epoch + 1}: train loss {train_loss:.4f}, valid {cfg.eval.metric} "
                             f"{value:.4f}" + (" (best)" if improved else f" (best {st.best_metric:.4f} at epoch "
                                                                        f"{st.best_epoch})"))
        st.history.append({"epoch": epoch + 1, "step": st.step, **row})
        st.epoch, st.epoch_step = epoch + 1, 0
        if improved:   # (the last epoch is always evaluated, so a run always has a best)
            st.best_tag = tag_for_step(st.step)   # the checkpoint saved right below
        row.update({"train_seconds": round(st.train_seconds, 3), "eval_seconds": round(st.eval_seconds, 3)})
        self.monitor.epoch_scalars(st.step, epoch + 1, row)
        self.save()


def _open_store(cfg: ExperimentConfig, output_dir: Path, env, resume: bool) -> CheckpointStore:
    location = cfg.checkpoint.dir or str(output_dir / "checkpoints")
    store = CheckpointStore(location, env, keep_last=cfg.checkpoint.keep_last,
                            storage_options=cfg.checkpoint.storage.to_options(),
                            retry_seconds=cfg.checkpoint.storage.retry_seconds)
    if not resume and store.has_checkpoints():
        raise ConfigError(f"--output-dir {output_dir}: {location} already holds checkpoints; pass --resume to "
                          f"continue that run, or choose another output directory")
    return store


def _announce(monitor: Monitor, parts, meta: dict, store: CheckpointStore, resume: bool, resumed_from,
              state: TrainerState) -> None:
    cfg, env, model = parts.cfg, parts.env, parts.model
    n_dense = sum(getattr(p, "ds_numel", p.numel()) for p in model.engine.module.parameters())
    monitor.log(f"{cfg.name}: {parts.model_type} ({n_dense:,} dense weights), {parts.manifest['num_items']:,} items, "
                f"world {env.world_size} ({env.backend}, {env.device.type}), ZeRO {meta['zero_stage']}, "
                f"{parts.precision}; {parts.steps_per_epoch} steps/epoch x {cfg.data.batch_size} x "
                f"{cfg.train.gradient_accumulation_steps} x {env.world_size}; tables "
                f"{[(t.name, t.num_rows, t.dim) for t in model.tables.packed]} {cfg.tables.sharding}")
    for n in parts.notes:
        monitor.log(f"init_from {cfg.train.init_from}: config differs: {n}")
    if resumed_from is not None:
        monitor.log(f"resumed from {store.describe(resumed_from)}: epoch {state.epoch + 1}, step {state.step}")
        return
    if resume:
        monitor.log(f"--resume: no checkpoint in {store.location}; starting from scratch")
    if cfg.train.init_from:
        monitor.log(f"initialised the dense weights from {cfg.train.init_from}")


def _summary(parts, meta: dict, st: TrainerState, store: CheckpointStore, export_dir: Path, seconds: float,
             fit_seconds: float) -> dict:
    """``metrics.json``: the test metrics of the best checkpoint, where it is, timings."""
    cfg, env = parts.cfg, parts.env
    return {
        "name": cfg.name,
        "metric": cfg.eval.metric,
        "best_epoch": st.best_epoch,
        "best_step": st.best_step,
        "best_valid": st.best_valid,
        "test": st.best_test,
        "epochs_run": st.epoch,
        "steps": st.step,
        "stopped_early": st.stopped_early,
        "best_checkpoint": store.describe(st.best_tag),
        "export": str(export_dir),
        "world_size": env.world_size,
        "zero_stage": meta["zero_stage"],
        "precision": parts.precision,
        "device": env.device.type,
        "timings": {
            "total_seconds": round(seconds, 3),                 # this process, start to end
            "fit_seconds_this_process": round(fit_seconds, 3),  # the loop of this process (resumes: the rest)
            "train_seconds": round(st.train_seconds, 3),        # whole run, over resumes
            "eval_seconds": round(st.eval_seconds, 3),
            "samples_per_second": round(st.samples / st.train_seconds, 2) if st.train_seconds else None,
            "steps_per_second": round(st.step / st.train_seconds, 3) if st.train_seconds else None,
        },
        "history": st.history,
    }


def run(cfg: ExperimentConfig, config_file: str | None, output_dir: str | os.PathLike, resume: bool) -> dict:
    """The whole run on this process (all ranks call it). Returns ``metrics.json``'s dict."""
    from .build import build, check_output_dir, preflight
    from .export import export_checkpoint

    t_start = time.time()
    output_dir = Path(output_dir).resolve()
    ds_json = preflight(cfg, config_file)                       # 1. checks that need no processes
    check_output_dir(output_dir)
    env = init_distributed()                                    # 2. processes, data, tables, engine
    store = _open_store(cfg, output_dir, env, resume)
    resume_tag = store.latest() if resume else None
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    parts = build(cfg, env, ds_json, load_init=resume_tag is None)
    meta = {"model_config": {"model_type": parts.model_type, "config": dataclasses.asdict(parts.model_cfg)},
            "zero_stage": zero_stage(parts.ds_config)}
    trainer = Trainer(parts.cfg, parts.model, parts.loaders, store, None, output_dir, env, parts.steps_per_epoch,
                      meta)
    if resume_tag is not None:
        trainer.restore(resume_tag)
    monitor = trainer.monitor = Monitor(output_dir, enabled=env.is_main,
                                        resume_step=trainer.state.step if resume_tag is not None else None,
                                        trackers=cfg.trackers, run_config=redact_secrets(parts.cfg.to_dict()),
                                        run_name=cfg.name)
    if env.is_main:
        save_yaml(parts.cfg, output_dir / "config.yaml")
        (output_dir / "deepspeed.json").write_text(json.dumps(parts.ds_config, indent=1))
    _announce(monitor, parts, meta, store, resume, resume_tag, trainer.state)
    trainer.sync_table_lr()

    t_fit = time.time()                                         # 3. the loop
    trainer.fit()
    fit_seconds = time.time() - t_fit

    st, export_dir = trainer.state, output_dir / "export"       # 4. export + metrics
    if env.is_main:
        with store.open(st.best_tag) as ck:
            export_checkpoint(ck, export_dir)
    env.barrier()
    metrics = _summary(parts, meta, st, store, export_dir, time.time() - t_start, fit_seconds)
    metrics["stopped_by_wall_time"] = trainer.wall_time_hit
    if env.is_main:
        tmp = output_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, output_dir / "metrics.json")
        ks = sorted({min(cfg.eval.ks), max(cfg.eval.ks)})      # the smallest and largest cut-off configured
        shown = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]
        if st.best_test:
            monitor.log(f"best epoch {st.best_epoch}: test " + ", ".join(f"{k} {st.best_test[k]:.4f}" for k in shown))
        elif st.best_valid:
            monitor.log(f"best epoch {st.best_epoch}: valid " + ", ".join(f"{k} {st.best_valid[k]:.4f}" for k in shown))
        monitor.log(f"wrote {export_dir} and {output_dir / 'metrics.json'}")
    monitor.close()
    return metrics
