"""The dense side: torch optimizer, LR schedule, ``deepspeed.initialize``, precision.

Only ``model.dense`` (the transferable weights) goes to DeepSpeed; the item tables
are torchrec's (``dist/tables.py``). DeepSpeed gets a *torch* optimizer object
(NAdam with coupled L2 as in the paper, Adam, AdamW or SGD): a DeepSpeed ``"optimizer"``
block would select its fused CPU Adam, which JIT-compiles for minutes on CPU and
cannot do NAdam.

Precision: DeepSpeed keeps fp32 weights, gradients and optimizer state (on every
ZeRO stage); ``bf16`` runs the forward under ``torch.autocast`` (GPU). This keeps
one numerics path for CPU and GPU, keeps the model's float64 time deltas and
LayerNorms in fp32 where autocast says so, and the dense part is small (a few
million weights), so fp32 master state is cheap. DeepSpeed's own ``bf16`` mode
would cast the module to bf16 and require every input to match.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

from .checkpoint import use_safe_checkpoint_engine
from .config import ExperimentConfig, OptimizerConfig, ScheduleConfig
from .param_groups import GroupPlan

__all__ = ["build_optimizer", "lr_multiplier", "build_scheduler", "build_engine", "resolve_precision",
           "autocast"]


def build_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The torch optimizer of ``cfg`` over ``params``: tensors, or param-group dicts (each
    may set its own ``lr`` / ``weight_decay``: dist/param_groups.py)."""
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    params = list(params)
    if not (params and isinstance(params[0], dict)):
        params = [p for p in params if p.requires_grad]
    if cfg.name == "nadam":   # weight_decay is coupled L2 (decoupled_weight_decay=False), as the paper
        return torch.optim.NAdam(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer.name: unknown optimizer {cfg.name!r}")


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The LR factor for optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "none" or total_steps <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    """A ``LambdaLR`` (state saved by DeepSpeed with the engine)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, cfg))


def build_engine(dense: torch.nn.Module, cfg: ExperimentConfig, ds_config: dict, total_steps: int,
                 groups: GroupPlan | None = None):
    """``deepspeed.initialize`` on the dense module with a torch optimizer + LR schedule
    (per param group with ``groups``: ``train.param_groups``)."""
    import deepspeed

    if groups is None:
        optimizer = build_optimizer(dense.parameters(), cfg.train.optimizer)
        scheduler = build_scheduler(optimizer, cfg.train.schedule, total_steps)
    else:
        optimizer = build_optimizer(groups.param_groups, cfg.train.optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, groups.lambdas)
    with _without_untested_optimizer_warning():
        engine, _, _, _ = deepspeed.initialize(model=dense, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
    use_safe_checkpoint_engine(engine)   # checkpoint files read with weights_only=True
    return engine


class _DropUntestedOptimizer(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


@contextlib.contextmanager
def _without_untested_optimizer_warning():
    """ZeRO warns "untested optimizer" for any torch optimizer; handing it one (NAdam,
    ``zero_allow_untested_optimizer``) is this project's design, so the line is noise."""
    from deepspeed.utils import logger

    f = _DropUntestedOptimizer()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA, fp32 on CPU. An explicit ``bf16`` also runs on CPU (torch's
    CPU autocast: fast on CPUs with AVX512-BF16 / AMX, slower than fp32 elsewhere; the
    tests use it to run the same mixed-precision path as a GPU)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
