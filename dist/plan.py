"""``--print-config`` and ``--dry-run`` of ``dist/train.py`` and ``mmm4rec train``.

Both run in the launching process and start nothing: no process group, no engine, no
output directory.

* :func:`print_config`: the resolved experiment config (defaults and ``--set`` applied,
  credentials redacted) and the DeepSpeed config as ``deepspeed.initialize`` would get it
  for the given world size, as one YAML document; the keys where the user's DeepSpeed
  JSON differs from the experiment config (the experiment config wins) as comments.
* :func:`dry_run`: the config checked against the shard set's manifest (model fields from
  the data, splits, feature dims, ``init_from`` shapes, DeepSpeed's own config check), the
  model built on the meta device, and the plan printed: parameter counts, item-table
  rows and bytes per rank as torchrec's planner places them, steps per epoch and in all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
import warnings
from types import SimpleNamespace
from typing import TextIO

import yaml

from mmm4rec.config import ConfigError, redact_secrets

from .config import (
    ExperimentConfig,
    deepspeed_overlap,
    finalize_deepspeed_config,
    load_deepspeed_config,
    resolve_model_config,
)

__all__ = ["print_config", "dry_run", "manifest_digest"]


def print_config(cfg: ExperimentConfig, config_file: str | None, world_size: int, out: TextIO = sys.stdout) -> dict:
    """Write the resolved experiment + DeepSpeed config (YAML) to ``out``; returns it."""
    path, ds_json = load_deepspeed_config(cfg, config_file)
    doc = {"experiment": redact_secrets(cfg.to_dict()),
           "deepspeed": finalize_deepspeed_config(ds_json, cfg, world_size)}
    out.write(f"# resolved config of {config_file} for {world_size} process(es); secrets redacted\n")
    out.write(f"# DeepSpeed JSON: {path}\n")
    for line in deepspeed_overlap(ds_json, cfg, world_size):
        out.write(f"# overlap (experiment config wins): {line}\n")
    out.write(yaml.safe_dump(doc, sort_keys=False))
    out.flush()
    return doc


def manifest_digest(url: str, storage_options: dict | None = None) -> str:
    """sha256 of a shard set's ``manifest.json`` as stored (it lists every shard's sha256)."""
    from data_shards.shards import MANIFEST
    from data_shards.storage import Store

    return hashlib.sha256(Store(url, storage_options).read(MANIFEST)).hexdigest()


def _data_url(cfg: ExperimentConfig) -> str:
    if cfg.data.url:
        return cfg.data.url
    from data_shards import ensure_sample_shards

    assert cfg.data.sample is not None   # DataSection.validate: a url or a sample
    return ensure_sample_shards(cfg.data.sample, cfg.data.resolved_sample_dir(), progress=False)


def _check_manifest(cfg: ExperimentConfig, manifest: dict, url: str) -> None:
    splits = manifest.get("splits", {})
    for split in ("train", "valid", "test"):
        n = int(splits.get(split, {}).get("samples", 0))
        if n < 1 and (split == "train" or split == "valid" or cfg.eval.test):
            raise ConfigError(f"data.url: {url}/manifest.json has no {split} samples")
    if max(cfg.eval.ks) > int(manifest["num_items"]):
        raise ConfigError(f"eval.ks: {max(cfg.eval.ks)} exceeds the {manifest['num_items']} items of {url}")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _table_plan(packed, cfg: ExperimentConfig, world_size: int, device) -> list[dict]:
    """Rows and bytes of every packed table on every rank, from torchrec's planner."""
    from .tables import FEATURE, run_planner, table_planner

    env = SimpleNamespace(world_size=world_size, device=device)
    planner_log = logging.getLogger("torchrec.distributed.planner")
    level = planner_log.level
    planner_log.setLevel(logging.ERROR)   # its dry-run caveat is about dense tensors, which it does not plan here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            root, sharders, planner = table_planner(packed, cfg.tables, env)
            plan = run_planner(lambda: planner.plan(root, sharders), cfg.tables)
    finally:
        planner_log.setLevel(level)
    out = []
    for t in packed:
        mod_plan = next(p for name, p in plan.plan.items() if name.endswith(t.name))
        ps = mod_plan[t.name]
        rows = [0] * world_size
        for shard in ps.sharding_spec.shards:
            rank = shard.placement.rank()
            rows[rank] += int(shard.shard_sizes[0])
        out.append({"name": t.name, "kind": t.kind, "rows": t.num_rows, "dim": t.dim,
                    "sharding": ps.sharding_type, "rows_per_rank": rows,
                    "bytes_per_rank": [r * t.dim * (2 if t.kind == FEATURE and cfg.tables.feature_dtype == "fp16"
                                                    else 4) for r in rows]})
    return out


def dry_run(cfg: ExperimentConfig, config_file: str | None, world_size: int, out: TextIO = sys.stdout) -> dict:
    """Validate ``cfg`` against its data and print what a run on ``world_size`` processes
    would do. Returns the plan (a dict). Raises ConfigError / DataError like a run would."""
    import torch

    from data_shards import SequenceLoader, read_manifest

    from .build import load_init_from, plan_steps, preflight
    from .model import build_dense
    from .tables import pack_specs

    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    ds_json = preflight(cfg, config_file, world_size)            # JSON, overlap, DeepSpeed's own check
    url = _data_url(cfg)
    storage = cfg.data.storage.to_options()
    manifest = read_manifest(url, storage)
    _check_manifest(cfg, manifest, url)
    model_type, model_cfg = resolve_model_config(cfg, manifest)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, url=url, sample=None))
    with torch.device("meta"):
        dense, specs = build_dense(model_type, model_cfg)
    if cfg.train.init_from:
        load_init_from(cfg.train.init_from, model_type, dense)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_dense_train = sum(p.numel() for p in dense.parameters() if p.requires_grad)
    packed = pack_specs(specs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tables = _table_plan(packed, cfg, world_size, device)
    n_table_train = sum(t["rows"] * sum(c.spec.dim for c in p.columns) for t, p in zip(tables, packed)
                        if t["kind"] == "trainable")
    n_table_frozen = sum(t["rows"] * sum(c.spec.dim for c in p.columns) for t, p in zip(tables, packed)
                         if t["kind"] == "feature")

    gas = cfg.train.gradient_accumulation_steps
    micro = len(SequenceLoader(cfg.data, "train", rank=0, world_size=world_size))   # the same on every rank
    steps, total = plan_steps(cfg, micro)
    ds_config = finalize_deepspeed_config(ds_json, cfg, world_size)
    plan = {
        "name": cfg.name, "world_size": world_size, "data": url, "manifest_sha256": manifest_digest(url, storage),
        "num_items": int(manifest["num_items"]), "num_users": int(manifest.get("num_users", 0)),
        "samples": {s: int(manifest["splits"][s]["samples"]) for s in ("train", "valid", "test")},
        "model": model_type, "model_config": dataclasses.asdict(model_cfg),
        "parameters": {"dense": n_dense, "dense_trainable": n_dense_train, "tables_trainable": n_table_train,
                       "tables_frozen": n_table_frozen},
        "tables": tables,
        "zero_stage": int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        "batch": {"micro_per_rank": cfg.data.batch_size, "accumulation": gas,
                  "global": ds_config["train_batch_size"]},
        "micro_batches_per_epoch_per_rank": micro, "steps_per_epoch": steps, "epochs": cfg.train.epochs,
        "total_steps": total,
    }
    w = out.write
    w(f"dry run of {cfg.name} ({config_file}) on {world_size} process(es): nothing started\n")
    w(f"  data      {url}\n            manifest sha256 {plan['manifest_sha256']}\n")
    w(f"            {plan['num_items']:,} items, {plan['num_users']:,} users, samples train "
      f"{plan['samples']['train']:,} / valid {plan['samples']['valid']:,} / test {plan['samples']['test']:,}\n")
    w(f"  model     {model_type}: {n_dense:,} dense parameters ({n_dense_train:,} trainable, DeepSpeed ZeRO "
      f"{plan['zero_stage']}); item tables {n_table_train:,} trainable + {n_table_frozen:,} frozen values\n")
    for t in tables:
        per = ", ".join(f"r{r}: {n:,} rows / {_fmt_bytes(b)}" for r, (n, b) in
                        enumerate(zip(t["rows_per_rank"], t["bytes_per_rank"])))
        w(f"  table     {t['name']} ({t['kind']}, {t['rows']:,} x {t['dim']}, {t['sharding']}): {per}\n")
    w(f"  batches   {cfg.data.batch_size} per rank x {gas} accumulation x {world_size} = {plan['batch']['global']} "
      f"per optimizer step\n")
    w(f"  steps     {micro:,} micro-batches per epoch per rank -> {steps:,} steps per epoch x {cfg.train.epochs} "
      f"epochs = {total:,} optimizer steps" + (f" (train.max_steps {cfg.train.max_steps})" if cfg.train.max_steps
                                               else "") + "\n")
    out.flush()
    return plan
