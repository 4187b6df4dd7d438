"""Building a run: preflight checks, data, model config, item tables, dense engine.

``preflight`` needs no processes (it runs before the process group exists, so a bad
config fails in seconds); ``build`` is collective (every rank calls it) and returns
the parts the loop needs. Tests and tools build the same stack through it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from mmm4rec import export_format
from mmm4rec.config import ConfigError

from .config import (
    MODEL_SECTIONS,
    ExperimentConfig,
    check_deepspeed_schema,
    deepspeed_overlap,
    finalize_deepspeed_config,
    load_deepspeed_config,
    report_overlap,
    resolve_model_config,
)

__all__ = ["preflight", "check_output_dir", "check_data_against_config", "prelaunch_check", "build", "plan_steps",
           "Parts", "load_init_from", "resolve_data_url"]


# ---------------------------------------------------------------------- init_from
def load_init_from(path: str, model_type: str, dense: torch.nn.Module) -> tuple[dict, list[str]]:
    """Load an export's weights for ``dense``: ``(state, notes)``; raises ConfigError
    listing every missing, unexpected or differently shaped tensor
    (``mmm4rec.export_format.load_compatible``). ``notes``: config fields that differ."""
    head, state = export_format.load_compatible(path, model_type, dense.state_dict(), "train.init_from")
    notes = []
    mine = dataclasses.asdict(dense.cfg) if hasattr(dense, "cfg") and dataclasses.is_dataclass(dense.cfg) else {}
    for k, v in head["config"].items():
        if k in mine and mine[k] != v and k not in ("num_items",):
            notes.append(f"{k}: export {v!r}, this run {mine[k]!r}")
    return state, notes


# ---------------------------------------------------------------------- data
def resolve_data_url(cfg: ExperimentConfig, env) -> str:
    """``data.url``, or the bundled sample's shards (built once, by rank 0)."""
    if cfg.data.url:
        return cfg.data.url
    from data_shards import ensure_sample_shards

    out = cfg.data.resolved_sample_dir()
    url = None
    if env.is_main:
        url = ensure_sample_shards(cfg.data.sample, out, progress=False)
    env.barrier()
    return url if env.is_main else ensure_sample_shards(cfg.data.sample, out, progress=False)


# ---------------------------------------------------------------------- building
def check_output_dir(output_dir: Path) -> None:
    """``--output-dir`` must be a directory (or not exist yet), and its ``export/`` new, empty
    or an earlier export: checked before any training, not after it."""
    from .export import check_export_target

    for p in (output_dir, *output_dir.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--output-dir {output_dir}: {p} is a file, not a directory; choose another "
                              f"output directory")
        if p.exists():
            break
    check_export_target(output_dir / "export")


def check_data_against_config(cfg: ExperimentConfig, manifest: dict, url: str):
    """The model config this data gives (``resolve_model_config``), and what the data must
    have for it: text features for a model with a text tower. (A shard set without images
    trains a model with ``image_dim``: zero rows, image mask False, see docs/training.md.)"""
    model_type, model_cfg = resolve_model_config(cfg, manifest)
    text = manifest.get("features", {}).get("text", {})
    if hasattr(model_cfg, "text_dim") and not text.get("dim"):
        raise ConfigError(f"data.url: the shard set {url} has no text features ({model_type} needs them); "
                          f"rebuild it with a text encoder (mmm4rec data build ... without --text-encoder none)")
    return model_type, model_cfg


def prelaunch_check(cfg: ExperimentConfig, config_file: str | None, output_dir: str | Path) -> None:
    """What ``mmm4rec train`` checks before it starts any process: the config, the output
    folder, and (for a ``data.url``) the shard set's manifest against the model config --
    also reaching the storage, so a bad endpoint/credentials/bucket fails here."""
    from data_shards import read_manifest

    preflight(cfg, config_file, announce=False)   # rank 0 reports the DeepSpeed overlap
    check_output_dir(Path(output_dir).resolve())
    if cfg.data.url:
        manifest = read_manifest(cfg.data.url, cfg.data.storage.to_options())
        check_data_against_config(cfg, manifest, cfg.data.url)


def preflight(cfg: ExperimentConfig, config_file: str | None, world_size: int | None = None,
              announce: bool = True) -> dict:
    """Checks that need no processes; returns the experiment's DeepSpeed JSON. Where the
    JSON overlaps the experiment YAML, the YAML wins and rank 0 prints each differing key
    (``announce``); the finalized config is checked by DeepSpeed's own config classes."""
    import os

    path, ds_json = load_deepspeed_config(cfg, config_file)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    check_deepspeed_schema(finalize_deepspeed_config(ds_json, cfg, world), path)
    if announce and os.environ.get("RANK", "0") == "0" and not os.environ.get("MMM4REC_DS_OVERLAP_SHOWN"):
        report_overlap(path, deepspeed_overlap(ds_json, cfg, world))
    if cfg.train.init_from:
        export_format.read_header(cfg.train.init_from, "train.init_from")
    from .trackers import check_trackers

    check_trackers(cfg.trackers)
    if cfg.tables.optimizer == "adam" and not torch.cuda.is_available():
        raise ConfigError("tables.optimizer: adam runs only on GPU (fbgemm's CPU kernels implement adagrad, "
                          "rowwise_adagrad and sgd); choose one of those on CPU")
    return ds_json


def plan_steps(cfg: ExperimentConfig, micro_batches: int) -> tuple[int, int]:
    """``(optimizer steps per epoch, steps in all)`` from the train loader's micro-batches
    per epoch and rank (``train.gradient_accumulation_steps``, ``steps_per_epoch``,
    ``epochs``, ``max_steps``)."""
    from .trainer import steps_in_epoch

    gas = cfg.train.gradient_accumulation_steps
    steps_per_epoch = steps_in_epoch(micro_batches, gas)   # every micro-batch, the last step on the remainder
    if cfg.train.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(f"data: the train split gives no micro-batches per epoch and rank ({micro_batches})")
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    return steps_per_epoch, total_steps


@dataclasses.dataclass
class Parts:
    cfg: ExperimentConfig        # resolved: data.url set, model fields from the data
    env: object
    url: str
    manifest: dict
    model_type: str
    model_cfg: object
    model: object                # DistRecModel
    loaders: dict
    steps_per_epoch: int
    total_steps: int
    ds_config: dict
    precision: str
    notes: list


#: feature rows read and copied into the table at a time at start-up (start-up memory:
#: the rank's table shard + one block + one item shard)
_FEATURE_BLOCK = 1 << 20


def train_item_counts(url: str, storage, env, num_items: int):
    """How often each item is a training target ([num_items + 1] float64; the log-Q of
    ``train.loss: sampled``): each rank counts the sequence shards ``rank, rank + W, ...``
    (one pass), then one all-reduce."""
    import torch

    from data_shards import read_manifest
    from data_shards.samples import target_positions
    from data_shards.shards import decode_sequence, read_shard_records
    from data_shards.storage import Store

    store = Store(url, storage)
    counts = np.zeros(num_items + 1, np.float64)
    for entry in read_manifest(url, store=store)["sequences"]["shards"][env.rank::env.world_size]:
        where = store.display(entry["path"])
        for rec in read_shard_records(store, entry):
            items = decode_sequence(rec, where)["items"]
            np.add.at(counts, items[list(target_positions(len(items), "train"))], 1.0)
    return env.all_reduce_sum(torch.from_numpy(counts))


def _rows_optimizer(cfg: ExperimentConfig):
    """The model optimizer's settings for the item table's rows (``tables.optimizer: dense``),
    with ``train.param_groups.rows.weight_decay`` when set."""
    rows = cfg.train.param_groups.get("rows")
    if rows is None or rows.weight_decay is None:
        return cfg.train.optimizer
    if cfg.tables.optimizer != "dense":
        raise ConfigError(f"train.param_groups.rows.weight_decay: applies with tables.optimizer: dense; the "
                          f"{cfg.tables.optimizer} table optimizer takes tables.weight_decay")
    return dataclasses.replace(cfg.train.optimizer, weight_decay=rows.weight_decay)


def build(cfg: ExperimentConfig, env, ds_json: dict, load_init: bool = True) -> Parts:
    """Data, model config, ``init_from`` weights, torchrec tables, DeepSpeed engine."""
    from data_shards import SequenceLoader, load_item_rows, read_manifest

    from .engine import build_engine, lr_multiplier, resolve_precision
    from .env import seed_everything
    from .model import DistRecModel, build_dense
    from .param_groups import plan_groups
    from .tables import ShardedItemTables

    precision = resolve_precision(cfg.train.precision, env.device)
    url = resolve_data_url(cfg, env)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, url=url, sample=None))
    storage = cfg.data.storage.to_options()
    manifest = read_manifest(url, storage)
    model_type, model_cfg = check_data_against_config(cfg, manifest, url)
    cfg = dataclasses.replace(cfg, model=MODEL_SECTIONS[model_type](**dataclasses.asdict(model_cfg)))

    seed_everything(cfg.train.seed, rank=0)          # identical dense init on every rank
    dense, specs = build_dense(model_type, model_cfg)
    notes: list[str] = []
    if cfg.train.init_from and load_init:
        state, notes = load_init_from(cfg.train.init_from, model_type, dense)
        dense.load_state_dict(state)

    loaders = {
        "train": SequenceLoader(cfg.data, "train", rank=env.rank, world_size=env.world_size),
        "valid": SequenceLoader(cfg.data, "valid", rank=env.rank, world_size=env.world_size, shuffle=False),
        "test": SequenceLoader(cfg.data, "test", rank=env.rank, world_size=env.world_size, shuffle=False),
    }
    steps_per_epoch, total_steps = plan_steps(cfg, len(loaders["train"]))

    groups = plan_groups(dense.named_parameters(), cfg.train,
                         lambda step: lr_multiplier(step, total_steps, cfg.train.schedule), steps_per_epoch)
    tables = ShardedItemTables(specs, cfg.tables, env, seed=cfg.train.seed,
                               dense_optimizer=_rows_optimizer(cfg))
    feature_names = [s.name for s in specs if s.kind == "feature"]
    if feature_names:   # this rank's rows only, from the item shards that hold them, a block at a time
        from mmm4rec.models.base import item_table_features

        lo, hi = tables.feature_rows()
        block = _FEATURE_BLOCK
        for a in range(lo, hi, block):
            rows = load_item_rows(url, a, min(hi, a + block), storage, manifest=manifest,
                                  dtype=np.float16 if cfg.tables.feature_dtype == "fp16" else np.float32)
            tables.load_features(item_table_features(rows, feature_names,
                                                     image_dim=getattr(model_cfg, "image_dim", None)), row_offset=a)
            del rows
    counts = None
    if cfg.train.loss == "sampled" and cfg.train.sampled.needs_counts:
        counts = train_item_counts(url, storage, env, int(manifest["num_items"]))
    ds_config = finalize_deepspeed_config(ds_json, cfg, env.world_size)
    engine = build_engine(dense, cfg, ds_config, total_steps, groups)
    seed_everything(cfg.train.seed, rank=env.rank)   # per-rank dropout streams
    model = DistRecModel(model_type, model_cfg, tables, engine, env, precision, sampled=cfg.train.sampled,
                         item_counts=counts, rows_lr_factor=groups.rows_factor)
    return Parts(cfg, env, url, manifest, model_type, model_cfg, model, loaders, steps_per_epoch, total_steps,
                 ds_config, precision, notes)
