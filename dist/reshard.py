"""Resume a checkpoint on another number of processes (world size).

A checkpoint written by ``W0`` processes continues on ``W1`` with the same global batch
(``data.batch_size x gradient_accumulation_steps x world size``):

* dense weights and optimizer state: ZeRO stage 0 keeps the whole optimizer in the
  module file (DeepSpeed loads it on any world size). ZeRO 1/2 partitions are
  consolidated: every rank reads all ``W0`` partition files, reassembles each
  parameter's fp32 master weights and optimizer state tensors (``exp_avg``, momentum,
  ...) from the fragments DeepSpeed records per partition (``param_slice_mappings``),
  sets the weights with DeepSpeed's ``safe_set_full_fp32_param`` and writes the state
  into this rank's partition where DeepSpeed maps each parameter's fragment
  (``param._hp_mapping``; the optimizer state is created lazily, so DeepSpeed's
  ``safe_set_full_optimizer_state`` has nothing to write into yet); per-group scalars
  (``step``, NAdam's ``mu_product``) are copied. ZeRO 3 is refused (its partition files have another
  layout; convert with DeepSpeed's ``ds_to_universal`` outside this trainer).
* item tables and their fused optimizer state: already stored by global row offsets,
  read into any sharding (``dist.tables.ShardReader``).
* loader: the epoch in progress finishes in the layout it began with
  (``data_shards.loader``: ``SequenceLoader._load_resharded``), so no sample of the
  epoch is lost or repeated.
* per-rank state: the epoch's loss sums of all old ranks go to new rank 0; RNG states
  of old ranks ``< W1`` go to the same ranks, other new ranks keep their fresh seeds
  (dropout masks after the change differ from an unchanged run's in any case).

What cannot change is refused with a message: the model (its config), the ZeRO stage
(checked by the trainer), the global batch, and an epoch length that would differ.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmm4rec.config import ConfigError

from .checkpoint import CheckpointDir, safe_load

__all__ = ["check_same_model", "check_world_size_change", "consolidate_zero_partitions", "load_dense_resharded",
           "resharded_rank_state"]

_ZERO_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


def _saved_config(ck: CheckpointDir) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ck.path / "config.yaml").read_text()) or {}


def check_same_model(ck: CheckpointDir, where: str, meta: dict) -> None:
    """Refuse a resume whose model (type or any config field) differs from the checkpoint's."""
    old, new = ck.model_config, json.loads(json.dumps(meta["model_config"]))
    if old == new:
        return
    diffs = [f"{k}: {old['config'].get(k)!r} -> {new['config'].get(k)!r}"
             for k in sorted(set(old["config"]) | set(new["config"])) if old["config"].get(k) != new["config"].get(k)]
    if old.get("model_type") != new.get("model_type"):
        diffs.insert(0, f"model type: {old.get('model_type')} -> {new.get('model_type')}")
    raise ConfigError(f"--resume: {where}: the model cannot change on resume ({'; '.join(diffs)})")


def check_world_size_change(ck: CheckpointDir, where: str, cfg, meta: dict, world_size: int) -> None:
    """Refuse, naming the setting, what a world-size change cannot carry over (the model
    is checked for every resume: :func:`check_same_model`)."""
    old_ws = int(ck.state["world_size"])
    if int(meta["zero_stage"]) == 3:
        raise ConfigError(f"--resume: {where} was written by {old_ws} processes with ZeRO stage 3, whose partitions "
                          f"cannot be re-split here; resume it with {old_ws} processes, or use ZeRO stage 0-2 to "
                          f"change the number of processes")
    old_cfg = _saved_config(ck)
    old_bs = int(old_cfg["data"]["batch_size"])
    old_gas = int(old_cfg["train"].get("gradient_accumulation_steps", 1))
    new_bs, new_gas = int(cfg.data.batch_size), int(cfg.train.gradient_accumulation_steps)
    old_global, new_global = old_bs * old_gas * old_ws, new_bs * new_gas * world_size
    if old_global != new_global or old_gas != new_gas:
        per_rank = old_bs * old_ws / world_size
        hint = (f"set data.batch_size={int(per_rank)}" if per_rank == int(per_rank)
                else f"{old_bs * old_ws} rows do not split over {world_size} processes")
        raise ConfigError(f"--resume: {where} was written by {old_ws} processes x data.batch_size {old_bs} x "
                          f"{old_gas} accumulation steps (global batch {old_global}); this run has {world_size} x "
                          f"{new_bs} x {new_gas} = {new_global}. The global batch (and accumulation) must stay the "
                          f"same to change the number of processes: {hint}")


# ---------------------------------------------------------------------------- dense
def consolidate_zero_partitions(engine_dir: Path, world_size: int
                                ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[dict]]:
    """Whole parameters from the ZeRO 1/2 partition files of ``world_size`` ranks.

    Returns (fp32 master weights by name, optimizer state tensors by name and key,
    per-group scalar optimizer state such as ``step``). Each partition file records
    where every parameter's fragment lies in it (``param_slice_mappings``); fragments
    are concatenated in rank order.
    """
    parts = [safe_load(engine_dir / _ZERO_FILE.format(r), map_location="cpu")["optimizer_state_dict"]
             for r in range(world_size)]
    if any(not isinstance(p["base_optimizer_state"], dict) for p in parts):
        raise ValueError(f"{engine_dir}: elastic ZeRO checkpoints are not supported here")
    groups = len(parts[0]["single_partition_of_fp32_groups"])
    pieces: dict[str, list] = {}          # name -> [(rank, group, start, numel)]
    for r, p in enumerate(parts):
        for g in range(groups):
            for name, frag in p["param_slice_mappings"][g].items():
                pieces.setdefault(name, []).append((r, g, int(frag.start), int(frag.numel)))
    fp32: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    scalars: list[dict] = []
    for g in range(groups):
        st0 = parts[0]["base_optimizer_state"]["state"][g]
        part_numel = parts[0]["single_partition_of_fp32_groups"][g].numel()
        scalars.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in st0.items()
                        if not (torch.is_tensor(v) and v.dim() == 1 and v.numel() >= part_numel)})
    for name, frags in pieces.items():
        frags.sort()
        fp32[name] = torch.cat([parts[r]["single_partition_of_fp32_groups"][g][s:s + n] for r, g, s, n in frags])
        keys = [k for k, v in parts[frags[0][0]]["base_optimizer_state"]["state"][frags[0][1]].items()
                if torch.is_tensor(v) and v.dim() == 1 and k not in scalars[frags[0][1]]]
        states[name] = {k: torch.cat([parts[r]["base_optimizer_state"]["state"][g][k][s:s + n]
                                      for r, g, s, n in frags]) for k in keys}
    return fp32, states, scalars


def load_dense_resharded(engine, ck: CheckpointDir) -> None:
    """Load the DeepSpeed engine of ``ck`` (written by another world size) into ``engine``."""
    from deepspeed.utils import safe_set_full_fp32_param

    old_ws = int(ck.state["world_size"])
    stage = int(engine.zero_optimization_stage())
    # module weights, LR schedule and DeepSpeed's counters; stage 0 also its whole optimizer
    path, _ = engine.load_checkpoint(str(ck.path), tag=ck.engine_dir.name, load_optimizer_states=stage == 0)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ck.engine_dir}")
    if stage == 0:
        return
    fp32, states, scalars = consolidate_zero_partitions(ck.engine_dir, old_ws)
    named = dict(engine.module.named_parameters())
    if set(named) != set(fp32):
        raise ValueError(f"{ck.engine_dir}: parameters {sorted(set(named) ^ set(fp32))[:5]} differ from the model's")
    base = engine.optimizer.optimizer
    flats = [group["params"][0] for group in base.param_groups]   # this rank's fp32 partition per group
    if len(flats) != len(scalars):
        raise ValueError(f"{ck.engine_dir}: {len(scalars)} optimizer groups saved, the engine has {len(flats)}")
    # The base optimizer's state is created lazily (at its first step): build it here,
    # each parameter's fragment at the place DeepSpeed maps it to in this partition.
    keys = sorted({k for st in states.values() for k in st})
    buffers = [{k: torch.zeros_like(flat) for k in keys} for flat in flats]
    for name, param in named.items():
        safe_set_full_fp32_param(param, fp32[name].view(param.shape))
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:        # no fragment of this parameter in this rank's partition
            continue
        lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
        for key, value in states[name].items():
            buffers[mapping.param_group_index][key][hp.start:hp.start + hp.numel] = \
                value[lp.start:lp.start + lp.numel]
    for flat, bufs, saved in zip(flats, buffers, scalars, strict=True):
        base.state[flat] = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in saved.items()}, **bufs}
    engine.optimizer.update_lp_params()     # module weights = the fp32 masters just set


# ---------------------------------------------------------------------------- per rank
def resharded_rank_state(ck: CheckpointDir, rank: int) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """This new rank's share of the old ranks' own state: (meta as in ``ranks/rank_N.json``,
    RNG tensors or None when this rank has no old counterpart)."""
    old_ws = int(ck.state["world_size"])
    metas = [json.loads((ck.path / "ranks" / f"rank_{r:05d}.json").read_text()) for r in range(old_ws)]
    meta = dict(metas[min(rank, old_ws - 1)])
    if rank == 0:     # the epoch's (and the log window's) loss sums: all old ranks' on rank 0
        meta["epoch_loss"] = [sum(m["epoch_loss"][i] for m in metas) for i in range(2)]
        meta["log_loss"] = [sum(m["log_loss"][i] for m in metas) for i in range(2)]
    else:
        meta["epoch_loss"], meta["log_loss"] = [0.0, 0.0], [0.0, 0.0]
    tensors = None
    if rank < old_ws:
        _, tensors = ck.rank_state(rank)
    return meta, tensors
