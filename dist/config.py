"""The experiment config of ``dist/train.py``: one YAML file, typed and validated.

Sections (each a dataclass, loaded through :mod:`mmm4rec.config`, so unknown keys,
types and invariants fail with the dotted field name)::

    name:        run name (free text, shown in logs)
    model:       type (mmm4rec | sasrec) + that model's config fields, flat
    data:        data_shards.ShardsConfig (url, batch_size per rank, max_len, ...)
                 + sample (bundled sample instead of a url) + sample_dir
    tables:      the torchrec item tables: sharding and the fused optimizer
    train:       loss, optimizer, schedule, epochs, accumulation, clipping, precision,
                 DeepSpeed JSON, init_from (an export to fine-tune from)
    eval:        ks, the early-stopping metric and patience, history masking
    checkpoint:  where (path or fsspec URL), how often, how many to keep
    trackers:    optional Weights & Biases / MLflow logging (rank 0), beside TensorBoard + CSV

Fields that the data decides (``num_items``, ``max_len``, ``text_dim``, ``image_dim``)
are filled from the shard manifest by :func:`resolve_model_config`; giving a value
that disagrees with the data is an error, not a silent override.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_shards import SAMPLE_DATASETS, ShardsConfig, StorageConfig
from mmm4rec.config import ConfigError, from_dict, load_yaml, to_dict
from mmm4rec.contract import DEFAULT_KS
from mmm4rec.models import MODELS
from mmm4rec.models.configs import MMM4RecConfig, SASRecConfig
from mmm4rec.paths import REPO_ROOT, cache_dir

_log = logging.getLogger(__name__)
__all__ = ["ExperimentConfig", "DataSection", "TablesConfig", "OptimizerConfig", "ScheduleConfig", "TrainConfig",
           "EvalConfig", "SampledConfig", "CheckpointConfig", "TrackersConfig", "WandbConfig", "MlflowConfig",
           "load_experiment",
           "resolve_model_config", "load_deepspeed_config", "deepspeed_overlap", "finalize_deepspeed_config",
           "REPO_ROOT", "SAMPLE_NAMES"]

#: the bundled DeepSpeed JSONs (package data, so a wheel install has them too; in a checkout
#: ``configs/deepspeed`` links here)
DEEPSPEED_DIR = Path(__file__).resolve().parent / "ds_configs"
SAMPLE_NAMES = tuple(SAMPLE_DATASETS)
#: model fields the data decides (filled from the manifest, checked when given)
DATA_FIELDS = ("num_items", "max_len", "text_dim", "image_dim")
METRIC_RE = re.compile(r"^(hr|ndcg|mrr)@(\d+)$")


def default_cache_dir() -> Path:
    """DeepSpeed's JIT ops and the bundled samples' shards live here: the project's one
    cache rule, ``mmm4rec.paths.cache_dir()`` (``$MMM4REC_CACHE`` or ``<repo>/.cache``)."""
    return cache_dir()


@dataclass
class DataSection(ShardsConfig):
    """``data_shards.ShardsConfig`` plus the bundled samples.

    ``sample: office | scientific_mm`` (with no ``url``) builds that bundled sample's
    shards once into ``sample_dir`` (default ``$MMM4REC_CACHE/samples`` or
    ``<repo>/.cache/samples``) and uses them; a given ``url`` always wins.
    """

    sample: str | None = None
    sample_dir: str = ""

    def validate(self) -> None:
        if self.sample is not None and self.sample not in SAMPLE_NAMES:
            raise ConfigError(f"sample: must be one of {list(SAMPLE_NAMES)} (the bundled samples), got {self.sample!r}")
        if self.url and self.sample:
            raise ConfigError(f"sample: give either url ({self.url}) or sample ({self.sample}), not both")
        if not self.url and not self.sample:
            raise ConfigError("url: required: the shard set's URL (a local path or s3://bucket/prefix), "
                              "or sample: office|scientific_mm for a bundled sample")
        ShardsConfig.validate(dataclasses.replace(self, url=self.url or f"sample:{self.sample}"))

    def resolved_sample_dir(self) -> Path:
        return Path(self.sample_dir) if self.sample_dir else default_cache_dir() / "samples"


@dataclass
class TablesConfig:
    """The torchrec item tables (frozen features + trainable ID/fusion rows).

    ``optimizer`` of the trainable rows, applied once per optimizer step to the gradient
    accumulated over that step's micro-batches (like every dense weight):

    * ``dense``: the model's optimizer with its settings (``train.optimizer``: name, lr,
      weight decay, betas, eps; this section's ``lr``/``weight_decay``/``eps`` are not
      used), over the whole table as torch's optimizer over an ``nn.Embedding`` (every
      row decays and keeps its moments): the release's treatment of the ID term. The
      gradient is all-reduced as a full [rows, dim] matrix, so this is for tables small
      enough to replicate.
    * ``adagrad`` / ``rowwise_adagrad`` / ``sgd`` (everywhere), ``adam`` (GPU only:
      fbgemm's CPU kernels do not implement it): fbgemm's row-wise sparse optimizers,
      fed the accumulated gradient of the rows the step touched: for huge catalogs.
      ``rowwise_adagrad`` (the default) keeps one accumulator per row; ``adagrad`` one per
      element, doubling the table's memory.

    ``feature_dtype: fp16`` stores the frozen feature table in 16 bit (looked-up rows are
    computed in fp32); ``memory_per_rank_gb`` tells torchrec's planner the memory each
    rank may give the tables (it refuses a plan that does not fit, before training).

    ``lr`` follows the dense LR schedule (warm-up/decay multiplier) when ``follow_schedule``.
    """

    sharding: Literal["row_wise", "table_wise"] = "row_wise"
    optimizer: Literal["dense", "adagrad", "rowwise_adagrad", "sgd", "adam"] = "rowwise_adagrad"
    lr: float = 0.01
    weight_decay: float = 0.0
    eps: float = 1e-8
    follow_schedule: bool = True
    feature_dtype: Literal["fp32", "fp16"] = "fp32"   # storage of the frozen feature table (fp16: half)
    memory_per_rank_gb: float = 0.0                   # memory the tables may use per rank (torchrec planner; 0 default)

    def validate(self) -> None:
        if self.memory_per_rank_gb < 0:
            raise ConfigError(f"memory_per_rank_gb: must be >= 0 (0 = the planner's default), got "
                              f"{self.memory_per_rank_gb}")
        if self.lr < 0:
            raise ConfigError(f"lr: must be >= 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass
class OptimizerConfig:
    """The dense optimizer (a torch optimizer handed to ``deepspeed.initialize``).

    ``nadam``, ``adam`` and ``sgd`` apply ``weight_decay`` as coupled L2 (added to the
    gradient, as the paper's NAdam); ``adamw`` decays decoupled. ``momentum`` is SGD's.
    """

    name: Literal["nadam", "adamw", "adam", "sgd"] = "nadam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: expected two numbers in [0, 1), got {self.betas}")


@dataclass
class ScheduleConfig:
    """LR multiplier per optimizer step: linear warm-up over ``warmup_steps``, then
    ``decay`` (none | linear | cosine) down to ``min_lr_ratio`` at the last step."""

    warmup_steps: int = 0
    decay: Literal["none", "linear", "cosine"] = "none"
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class SampledConfig:
    """``train.loss: sampled``: a softmax over each row's positive and sampled negatives,
    with the log-Q correction (``mmm4rec.catalog.sampled_softmax_ce``; docs/training.md).

    ``negatives`` ids per micro-batch and rank (shared by its rows) drawn by ``sampler``
    (``uniform`` over 1..|I|, or ``popularity``: by training-target count ** ``alpha``);
    ``inbatch``: the batch's other targets are negatives too (``gather``: every rank's);
    ``log_q``: subtract each negative's log expected count (needs the item counts for
    in-batch and popularity negatives: one pass over the train sequences at start-up);
    ``mask_hits``: a negative that is the row's own target is removed (any source)."""

    negatives: int = 1024
    sampler: Literal["uniform", "popularity"] = "uniform"
    alpha: float = 1.0
    inbatch: bool = True
    gather: bool = False
    log_q: bool = True
    mask_hits: bool = True

    def validate(self) -> None:
        if self.negatives < 0:
            raise ConfigError(f"negatives: must be >= 0, got {self.negatives}")
        if self.negatives == 0 and not self.inbatch:
            raise ConfigError("negatives: 0 with inbatch: false leaves no negatives")
        if self.alpha < 0:
            raise ConfigError(f"alpha: must be >= 0, got {self.alpha}")

    @property
    def needs_counts(self) -> bool:
        return (self.negatives > 0 and self.sampler == "popularity") or (self.inbatch and self.log_q)


#: the groups of ``train.param_groups`` (what each holds: dist/param_groups.py)
PARAM_GROUPS = ("adapters", "time", "ssd", "fourier", "ffn", "fusion", "rows", "rest")


@dataclass
class ParamGroupConfig:
    """One group of weights (``train.param_groups.<group>``; the groups: dist/param_groups.py):
    the fine-tuning recipe of a pretrained start."""

    lr_scale: float = 1.0               # this group's LR = train.optimizer.lr x lr_scale (x the schedule)
    weight_decay: float | None = None   # None: train.optimizer.weight_decay
    freeze_epochs: int = 0              # LR 0 (weights unchanged) for the first k epochs; -1: throughout

    def validate(self) -> None:
        if self.lr_scale < 0:
            raise ConfigError(f"lr_scale: must be >= 0, got {self.lr_scale}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.freeze_epochs < -1:
            raise ConfigError(f"freeze_epochs: must be >= 0, or -1 (throughout), got {self.freeze_epochs}")


@dataclass
class TrainConfig:
    """How to train. ``data.batch_size`` is the micro-batch per rank; the global batch
    is ``batch_size * gradient_accumulation_steps * world_size``."""

    loss: Literal["full", "inbatch", "sampled"] = "full"   # full softmax (vocab-parallel) / in-batch / sampled
    sampled: SampledConfig = field(default_factory=SampledConfig)   # loss: sampled
    mask_duplicates: bool = False                      # in-batch: mask repeats of the positive
    loss_chunk_size: int | None = None              # full softmax over item chunks (huge catalogs)
    epochs: int = 100
    max_steps: int = 0                                 # stop after this many optimizer steps (0: no limit)
    steps_per_epoch: int = 0                           # cap an epoch at this many steps (0: whole epoch)
    gradient_accumulation_steps: int = 1
    grad_clip: float = 0.0                             # max global L2 norm of the dense grads (0: off)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU (bf16: autocast, CPU too)
    deepspeed: str = "zero2"                           # configs/deepspeed/<name>.json or a JSON path
    seed: int = 2020
    init_from: str | None = None                    # an export directory (fine-tuning)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # per-group LR scale, weight decay and freezing: adapters, time, ssd, fourier, ffn, fusion,
    # rows (the item table's ID rows), rest (dist/param_groups.py; docs/training.md)
    param_groups: dict[str, ParamGroupConfig] = field(default_factory=dict)
    log_every_steps: int = 10                          # (and at every epoch end)
    max_nonfinite_steps: int = 0                       # NaN/inf-loss steps tolerated in a row (bf16 overflow)
    max_wall_time: float = 0.0                         # seconds: stop after the step that passes it, then
                                                       # evaluate, export the best, metrics.json (0: no limit)

    def validate(self) -> None:
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"max_nonfinite_steps: must be >= 0, got {self.max_nonfinite_steps}")
        if self.max_wall_time < 0:
            raise ConfigError(f"max_wall_time: must be >= 0 seconds (0 = no limit), got {self.max_wall_time}")
        for name in ("epochs", "gradient_accumulation_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0 (0 = no limit), got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ConfigError(f"loss_chunk_size: must be >= 1, got {self.loss_chunk_size}")
        if self.mask_duplicates and self.loss != "inbatch":
            raise ConfigError("mask_duplicates: only applies to loss: inbatch")
        unknown = sorted(set(self.param_groups) - set(PARAM_GROUPS))
        if unknown:
            raise ConfigError(f"param_groups: unknown group(s) {unknown}; choose from {', '.join(PARAM_GROUPS)}")


@dataclass
class EvalConfig:
    """Full-ranking evaluation: HR/NDCG/MRR@ks over all items, every ``every_epochs``
    on valid (early stopping on ``metric`` with ``patience`` evaluations, 0 = never
    stop early), and on test with the best checkpoint at the end. ``top_k_lists: K``
    also writes each test user's top-K items (by the same weights as the test metrics)
    to ``OUTPUT_DIR/top_k/test.rank<r>.jsonl`` (the users of rank r), sharded like the
    evaluation: each rank scores its own items, the lists are merged across ranks."""

    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    metric: str = "ndcg@10"
    patience: int = 10
    every_epochs: int = 1
    mask_history: bool = False
    item_chunk_size: int = 65536   # items looked up / scored per chunk
    tie_improves: bool = False     # an equal metric counts as an improvement (the release's early stopping)
    test: bool = True
    top_k_lists: int = 0           # K > 0: write each test user's top-K list (top_k/test.rank<r>.jsonl)
    at_start: bool = False         # also evaluate the initial weights on valid: epoch 0 of the history
                                   # (the zero-shot quality of a pretrained start; never a "best")

    def validate(self) -> None:
        if self.top_k_lists < 0:
            raise ConfigError(f"top_k_lists: must be >= 0 (0 = none), got {self.top_k_lists}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ks: expected positive cut-offs, got {self.ks}")
        m = METRIC_RE.match(self.metric)
        if not m:
            raise ConfigError(f"metric: expected hr@K, ndcg@K or mrr@K, got {self.metric!r}")
        if int(m.group(2)) not in self.ks:
            raise ConfigError(f"metric: {self.metric} needs K={m.group(2)} in ks {self.ks}")
        for name in ("every_epochs", "item_chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ConfigError(f"patience: must be >= 0 (0 = no early stopping), got {self.patience}")


@dataclass
class CheckpointConfig:
    """Checkpoints go to ``dir`` (default ``OUTPUT_DIR/checkpoints``; a local path or an
    fsspec URL such as ``s3://bucket/run/checkpoints``) at every epoch end and every
    ``every_steps`` optimizer steps (0: epoch ends only). The ``keep_last`` newest and
    the best one are kept."""

    dir: str = ""
    every_steps: int = 0
    keep_last: int = 2
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"every_steps: must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"keep_last: must be >= 1, got {self.keep_last}")


@dataclass
class WandbConfig:
    """Weights & Biases (``pip install "mmm4rec[trackers]"``). ``mode: offline`` writes the
    run under ``dir`` (default OUTPUT_DIR, so ``OUTPUT_DIR/wandb/``) for a later ``wandb sync``."""

    enabled: bool = False
    project: str = "mmm4rec"
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"
    dir: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class MlflowConfig:
    """MLflow (``pip install "mmm4rec[trackers]"``). ``tracking_uri`` empty: a file store
    under ``OUTPUT_DIR/mlruns`` (view with ``mlflow ui --backend-store-uri ...``)."""

    enabled: bool = False
    tracking_uri: str = ""
    experiment: str = "mmm4rec"
    run_name: str = ""


@dataclass
class TrackersConfig:
    """Experiment trackers fed by rank 0 with the same scalars as TensorBoard/CSV (losses,
    LR, throughput, memory, evaluation metrics) plus the resolved config (secrets redacted)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


# ------------------------------------------------------------------------- model
class _ModelSection:
    """The ``model:`` section: ``type`` + that model's config fields, flat. The fields the data
    decides (``DATA_FIELDS``) are None unless given; a given one must agree with the data
    (``data.max_len`` owns the history length)."""

    type: str
    config_cls: Any   # the model's own config dataclass

    def fields(self) -> dict[str, Any]:
        """The given model fields (``type`` and unset data fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items()   # type: ignore[call-overload]
                if k != "type" and not (k in DATA_FIELDS and v is None)}

    def validate(self) -> None:
        # the model's own rules, with placeholders for what the data decides
        from_dict(self.config_cls, {"num_items": 1, **self.fields()})


@dataclass
class MMM4RecSection(_ModelSection, MMM4RecConfig):
    type: Literal["mmm4rec"] = "mmm4rec"
    num_items: int | None = None      # type: ignore[assignment]  # None: from the data
    max_len: int | None = None        # type: ignore[assignment]
    text_dim: int | None = None       # type: ignore[assignment]
    image_dim: int | None = None      # type: ignore[assignment]
    config_cls = MMM4RecConfig


@dataclass
class SASRecSection(_ModelSection, SASRecConfig):
    type: Literal["sasrec"] = "sasrec"
    num_items: int | None = None      # type: ignore[assignment]  # None: from the data
    max_len: int | None = None        # type: ignore[assignment]
    config_cls = SASRecConfig


#: ``model.type`` -> its section (one per model of ``mmm4rec.models.MODELS``)
MODEL_SECTIONS: dict[str, type[MMM4RecSection] | type[SASRecSection]] = {"mmm4rec": MMM4RecSection,
                                                                        "sasrec": SASRecSection}


@dataclass
class ExperimentConfig:
    data: DataSection
    name: str = "mmm4rec"
    model: MMM4RecSection | SASRecSection = field(default_factory=MMM4RecSection)
    tables: TablesConfig = field(default_factory=TablesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    trackers: TrackersConfig = field(default_factory=TrackersConfig)

    @property
    def model_type(self) -> str:
        return self.model.type

    def model_fields(self) -> dict[str, Any]:
        """The model section without ``type``: the given fields of the model's config class."""
        return self.model.fields()

    def validate(self) -> None:
        if self.model.max_len is not None and self.model.max_len != self.data.max_len:
            raise ConfigError(f"model.max_len: {self.model.max_len} differs from data.max_len "
                              f"{self.data.max_len} (set one of them)")
        if self.train.loss == "inbatch" and self.data.batch_size < 2:
            raise ConfigError("data.batch_size: the in-batch loss needs at least 2 rows per batch")
        if (self.train.loss == "sampled" and self.train.sampled.negatives == 0 and not self.train.sampled.gather
                and self.data.batch_size < 2):
            raise ConfigError("data.batch_size: in-batch negatives alone need at least 2 rows per batch")

    def to_dict(self) -> dict:
        return to_dict(self)


def load_experiment(path: str | os.PathLike, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load and validate an experiment YAML with ``--set key=value`` overrides."""
    return load_yaml(ExperimentConfig, path, overrides)


# ------------------------------------------------------------------------- model
def resolve_model_config(cfg: ExperimentConfig, manifest: dict):
    """The typed model config for this data: ``num_items``, ``max_len`` and the feature
    dims come from the shard manifest; a conflicting explicit value is an error."""
    mtype = cfg.model_type
    config_cls = MODELS[mtype].config_cls
    known = {f.name for f in dataclasses.fields(config_cls)}
    feats = manifest.get("features", {})
    from_data = {"num_items": int(manifest["num_items"])}
    if "text_dim" in known and feats.get("text", {}).get("dim"):
        from_data["text_dim"] = int(feats["text"]["dim"])
    if "image_dim" in known and feats.get("image", {}).get("dim"):
        from_data["image_dim"] = int(feats["image"]["dim"])
    fields = cfg.model_fields()
    for k, v in from_data.items():
        if k in fields and fields[k] != v:
            raise ConfigError(f"model.{k}: {fields[k]} differs from the data ({cfg.data.url}): {v} (leave it "
                              f"unset: it is taken from the data)")
    # max_len: data.max_len owns it (a given model.max_len equal to it: ExperimentConfig.validate)
    return mtype, from_dict(config_cls, {**fields, **from_data, "max_len": cfg.data.max_len}, _path="model")


# ---------------------------------------------------------------------- deepspeed
#: The DeepSpeed keys that overlap the experiment YAML. The rule (docs/training.md):
#: **the experiment YAML wins**. A user's JSON may hold them; where a value differs from
#: the YAML, :func:`deepspeed_overlap` names it (printed before launch) and
#: :func:`finalize_deepspeed_config` writes the YAML's value (or drops the block: the
#: trainer hands DeepSpeed a torch optimizer + LR schedule and runs bf16 as autocast).
#: Every other key (ZeRO incl. offload, communication, checkpoint, monitors...) passes through.
DS_OVERLAP = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "data.batch_size x train.gradient_accumulation_steps x world size",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision", "fp16": "train.precision", "amp": "train.precision",
    "optimizer": "train.optimizer", "scheduler": "train.schedule",
}
#: DeepSpeed scheduler type -> our train.schedule.decay
_DS_SCHEDULERS = {"WarmupLR": "none", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


def deepspeed_json_path(spec: str, config_file: str | os.PathLike | None = None) -> Path:
    """``zero2`` -> the bundled ``zero2.json`` (``configs/deepspeed/``); a path is taken as is
    (relative to the working directory, else to the experiment file's directory)."""
    if not spec.endswith(".json") and "/" not in spec:
        return DEEPSPEED_DIR / f"{spec}.json"
    p = Path(spec)
    if not p.is_absolute() and not p.exists() and config_file is not None:
        alt = Path(config_file).parent / p
        if alt.exists():
            return alt
    return p


def load_deepspeed_config(cfg: ExperimentConfig, config_file: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """Read and check the experiment's DeepSpeed JSON: any DeepSpeed config (a user's own
    included); ZeRO stage 0-3; offload settings that fit the stage. Keys that overlap the
    YAML are accepted (see ``DS_OVERLAP``); :func:`finalize_deepspeed_config` resolves them
    once the world size is known."""
    path = deepspeed_json_path(cfg.train.deepspeed, config_file)
    if not path.is_file():
        names = sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))
        raise ConfigError(f"train.deepspeed: {path} not found (bundled: {names}, or give a JSON path)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: top level must be an object")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for key, stages in (("offload_optimizer", (1, 2, 3)), ("offload_param", (3,))):
        block = zero.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: zero_optimization.{key} must be an object")
        dev = block.get("device", "none")
        if dev not in ("none", "cpu", "nvme"):
            raise ConfigError(f"{path}: zero_optimization.{key}.device must be none, cpu or nvme, got {dev!r}")
        if dev != "none" and stage not in stages:
            raise ConfigError(f"{path}: zero_optimization.{key} needs ZeRO stage {' or '.join(map(str, stages))}, "
                              f"the JSON has stage {stage}")
        if dev == "nvme" and not block.get("nvme_path"):
            raise ConfigError(f"{path}: zero_optimization.{key}.nvme_path is required for device nvme")
    for key, want in (("optimizer", "type"), ("scheduler", "type")):
        if key in ds and not (isinstance(ds[key], dict) and isinstance(ds[key].get(want), str)):
            raise ConfigError(f"{path}: {key} must be an object with a '{want}' string")
    for key in ("bf16", "fp16", "amp"):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{path}: {key} must be an object (e.g. {{\"enabled\": true}})")
    return path, ds


def _json_precision(ds: dict) -> str | None:
    if any(k in ds for k in ("bf16", "fp16", "amp")):
        if ds.get("fp16", {}).get("enabled", False) is True or ds.get("amp", {}).get("enabled", False) is True:
            return "fp16"
        return "bf16" if ds.get("bf16", {}).get("enabled", False) is True else "fp32"
    return None


def _json_optimizer(opt: dict) -> dict:
    """A DeepSpeed optimizer block in our terms (DeepSpeed's "Adam" is AdamW unless
    ``adam_w_mode`` is false)."""
    params = opt.get("params", {}) or {}
    name = opt["type"].lower()
    if name in ("adam", "fusedadam", "cpuadam"):
        name = "adamw" if params.get("adam_w_mode", True) else "adam"
    out = {"name": name}
    for k in ("lr", "weight_decay", "eps", "momentum"):
        if k in params:
            out[k] = params[k]
    if "betas" in params:
        out["betas"] = list(params["betas"])
    return out


def deepspeed_overlap(ds: dict, cfg: ExperimentConfig, world_size: int | None = None) -> list[str]:
    """Where the DeepSpeed JSON sets a value the experiment YAML owns and differs from it:
    one line per key (``key: JSON x -> ours y (field)``). The YAML's value is the one used."""
    t = cfg.train
    lines = []

    def differ(key: str, theirs, ours, field_name: str) -> None:
        if theirs != ours:
            lines.append(f"{key}: JSON {theirs!r} -> {field_name}={ours!r}")

    if "train_micro_batch_size_per_gpu" in ds:
        differ("train_micro_batch_size_per_gpu", ds["train_micro_batch_size_per_gpu"], cfg.data.batch_size,
               "data.batch_size")
    if "gradient_accumulation_steps" in ds:
        differ("gradient_accumulation_steps", ds["gradient_accumulation_steps"], t.gradient_accumulation_steps,
               "train.gradient_accumulation_steps")
    if "train_batch_size" in ds:
        if world_size is None:
            lines.append(f"train_batch_size: JSON {ds['train_batch_size']!r} -> data.batch_size x "
                         f"train.gradient_accumulation_steps x world size")
        else:
            ours = cfg.data.batch_size * t.gradient_accumulation_steps * world_size
            if ds["train_batch_size"] != ours:
                lines.append(f"train_batch_size: JSON {ds['train_batch_size']!r} -> {ours} (data.batch_size "
                             f"{cfg.data.batch_size} x train.gradient_accumulation_steps "
                             f"{t.gradient_accumulation_steps} x world size {world_size})")
    if "gradient_clipping" in ds:
        differ("gradient_clipping", float(ds["gradient_clipping"]), t.grad_clip, "train.grad_clip")
    prec = _json_precision(ds)
    if prec is not None and prec != t.precision:
        note = " (bf16 on CUDA, fp32 on CPU)" if t.precision == "auto" else ""
        lines.append(f"bf16/fp16: JSON {prec} -> train.precision={t.precision!r}{note}; bf16 runs as torch autocast "
                     f"over fp32 DeepSpeed state, fp16 is not offered")
    if "optimizer" in ds:
        theirs = _json_optimizer(ds["optimizer"])
        ours_opt = dataclasses.asdict(t.optimizer)
        for k, v in theirs.items():
            if k == "momentum" and ours_opt["name"] != "sgd":
                continue
            differ(f"optimizer.{'type' if k == 'name' else 'params.' + k}", v, ours_opt[k], f"train.optimizer.{k}")
    if "scheduler" in ds:
        sch, params = ds["scheduler"], ds["scheduler"].get("params", {}) or {}
        differ("scheduler.type", sch["type"], t.schedule.decay, "train.schedule.decay")
        if sch["type"] not in _DS_SCHEDULERS:
            lines[-1] += f" (DeepSpeed {sch['type']} has no equivalent here; the LR follows train.schedule)"
        elif _DS_SCHEDULERS[sch["type"]] == t.schedule.decay:
            lines.pop()
        if "warmup_num_steps" in params:
            differ("scheduler.params.warmup_num_steps", params["warmup_num_steps"], t.schedule.warmup_steps,
                   "train.schedule.warmup_steps")
        if "warmup_max_lr" in params:
            differ("scheduler.params.warmup_max_lr", params["warmup_max_lr"], t.optimizer.lr, "train.optimizer.lr")
        if "cos_min_ratio" in params:
            differ("scheduler.params.cos_min_ratio", params["cos_min_ratio"], t.schedule.min_lr_ratio,
                   "train.schedule.min_lr_ratio")
    return lines


def report_overlap(path, lines: list[str]) -> None:
    """Log :func:`deepspeed_overlap`'s lines (a warning), if any."""
    if lines:
        _log.warning(f"{path}: {len(lines)} DeepSpeed key(s) differ from the experiment config; the experiment "
                     f"config wins (docs/training.md#deepspeed-json):\n" + "\n".join(f"  {x}" for x in lines))


def finalize_deepspeed_config(ds: dict, cfg: ExperimentConfig, world_size: int) -> dict:
    """The DeepSpeed config handed to ``deepspeed.initialize``: the user's JSON with the
    overlapping keys taken from the experiment YAML (the rule of ``DS_OVERLAP``). Mixed
    precision is torch autocast around the forward (``dist/engine.py``), so DeepSpeed
    itself stays fp32; optimizer and LR schedule are torch objects (``build_engine``)."""
    out = json.loads(json.dumps(ds))
    for key in ("optimizer", "scheduler", "bf16", "fp16", "amp"):
        out.pop(key, None)
    out["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    out["gradient_accumulation_steps"] = cfg.train.gradient_accumulation_steps
    out["train_batch_size"] = cfg.data.batch_size * cfg.train.gradient_accumulation_steps * world_size
    out["gradient_clipping"] = cfg.train.grad_clip
    out.setdefault("zero_allow_untested_optimizer", True)
    out.setdefault("steps_per_print", 10 ** 9)
    out.setdefault("wall_clock_breakdown", False)
    if out.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none":
        # ZeRO-Offload with the trainer's torch optimizer (stepped on the offloaded fp32
        # state); DeepSpeed otherwise insists on its own CPU Adam, which cannot do NAdam
        out.setdefault("zero_force_ds_cpu_optimizer", False)
    return out


def check_deepspeed_schema(ds_config: dict, path: str | os.PathLike = "DeepSpeed config") -> None:
    """Let DeepSpeed's own config classes check a finalized config (misspelled ZeRO keys,
    wrong types) without a process group; one ConfigError naming the JSON."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = dict(ds_config)
    probe["train_batch_size"] = probe["train_micro_batch_size_per_gpu"] * probe["gradient_accumulation_steps"]
    try:
        DeepSpeedConfig(probe)
    except Exception as e:  # noqa: BLE001 -- pydantic / assertion errors: one line naming the file
        msg = " ".join(str(e).split())
        raise ConfigError(f"{path}: DeepSpeed {deepspeed.__version__} rejects it: {msg[:600]}") from None


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
