"""Per-group learning rate, weight decay and freezing (``train.param_groups``): the
fine-tuning recipe of a pretrained start, as configuration, not code.

The groups are named by what they are in MMM4Rec (parameter-name patterns of the dense
module, ``fnmatch`` style):

==========  ============================================================================
group       weights
==========  ============================================================================
adapters    the text and image adapters and their input LayerNorms
time        the shared time-interval LayerNorm (the time path's input)
ssd         every layer's TiSSD and Cross-SSD block (projections, convs, SSD cores, time paths)
fourier     every layer's dual-channel Fourier filter
ffn         every layer's feed-forward blocks and the LayerNorms around them
fusion      the shared modality-fusion logits (``item_mm_fusion: dynamic_shared``)
rows        the trainable item table: per-item ID rows (``use_id``) and per-item fusion
            logits; the item-table optimizer's LR (``tables.lr``, or the model's with
            ``tables.optimizer: dense``) is scaled and frozen the same way
rest        every dense weight not in a group above (SASRec's, say)
==========  ============================================================================

A group's learning rate is ``train.optimizer.lr x lr_scale x`` the schedule's multiplier
(warm-up, decay), and 0 while it is frozen: during its first ``freeze_epochs`` epochs, or
throughout with ``-1``. A learning rate of 0 leaves the weights exactly as they are with
every optimizer here (NAdam's coupled L2 enters through the gradient, AdamW's decoupled
decay is ``1 - lr * wd``), so freezing keeps one optimizer and one checkpoint layout for
the whole run; the group's moment estimates keep following its gradient meanwhile.
``weight_decay`` replaces ``train.optimizer.weight_decay`` for the group.

The schedule lives in the LR scheduler's per-group lambdas, so a resumed run (any epoch,
mid-epoch too) continues the same per-group rates without any state of its own.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from mmm4rec.config import ConfigError

from .config import PARAM_GROUPS

__all__ = ["DENSE_GROUPS", "GROUPS", "GroupPlan", "plan_groups"]

#: dense groups: name -> parameter-name patterns of the dense module
DENSE_GROUPS: dict[str, tuple[str, ...]] = {
    "adapters": ("adapter.*", "input_norm.*"),
    "time": ("time_norm.*",),
    "ssd": ("layers.*.tissd.*", "layers.*.ticossd.*"),
    "fourier": ("layers.*.cl_*",),
    "ffn": ("layers.*.ffn_*", "layers.*.norm_*"),
    "fusion": ("fusion",),
}
#: every group a config may name (``rows``: the trainable item table; ``rest``: the others)
GROUPS = PARAM_GROUPS
assert set(GROUPS) == {*DENSE_GROUPS, "rows", "rest"}


def group_of(name: str) -> str:
    """The group of dense parameter ``name`` (``rest`` when no pattern matches)."""
    for group, patterns in DENSE_GROUPS.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return group
    return "rest"


@dataclass
class GroupPlan:
    """The optimizer's param groups and each one's LR factor per optimizer step."""

    param_groups: list[dict]                    # for torch.optim: params, lr, weight_decay, name
    lambdas: list[Callable[[int], float]]       # LambdaLR: one per param group, in that order
    rows_factor: Callable[[int], float]         # the item table's LR factor at a step

    @property
    def names(self) -> list[str]:
        return [g["name"] for g in self.param_groups]


def _factor(settings, schedule: Callable[[int], float], steps_per_epoch: int) -> Callable[[int], float]:
    scale = 1.0 if settings is None else float(settings.lr_scale)
    freeze = 0 if settings is None else int(settings.freeze_epochs)

    def factor(step: int) -> float:
        if freeze == -1 or step < freeze * steps_per_epoch:
            return 0.0
        return scale * schedule(step)
    return factor


def plan_groups(named: Iterable[tuple[str, torch.nn.Parameter]], train_cfg, schedule: Callable[[int], float],
                steps_per_epoch: int) -> GroupPlan:
    """Split the dense module's trainable ``named`` parameters into the configured groups.

    Groups that ``train_cfg.param_groups`` does not name stay together with the optimizer's
    own settings (one param group, ``rest``, as without this option); a named group that
    matches no parameter of this model is a ConfigError (a typo, or a group of another model).
    """
    settings = dict(train_cfg.param_groups)
    opt = train_cfg.optimizer
    buckets: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        group = group_of(name)
        buckets.setdefault(group if group in settings else "rest", []).append(p)
    missing = sorted(g for g in settings if g != "rows" and g not in buckets)
    if missing:
        raise ConfigError(f"train.param_groups: {', '.join(missing)} match(es) no trainable weight of this model "
                          f"(groups: {', '.join(GROUPS)})")
    param_groups, lambdas = [], []
    for group in [g for g in GROUPS if g in buckets]:      # a fixed order: checkpoints stay comparable
        s = settings.get(group)
        wd = opt.weight_decay if s is None or s.weight_decay is None else s.weight_decay
        param_groups.append({"params": buckets[group], "lr": opt.lr, "weight_decay": wd, "name": group})
        lambdas.append(_factor(s, schedule, steps_per_epoch))
    return GroupPlan(param_groups, lambdas, _factor(settings.get("rows"), schedule, steps_per_epoch))
