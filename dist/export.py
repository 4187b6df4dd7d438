"""Export: a checkpoint's transferable weights -> ``model.safetensors`` + ``config.json``.

The format (``mmm4rec.export_format``) is what ``SeqRecModel.save_pretrained`` writes, so
``MMM4Rec.from_pretrained(OUT)`` loads it: only ``model.dense`` (adapters, blocks,
norms, shared fusion weight), never the per-domain item tables or the ID term.

The dense weights are read from DeepSpeed's checkpoint at any ZeRO stage: stage 0
from the module state, stages 1-3 consolidated from the fp32 optimizer partitions
with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` -- inside
:func:`~dist.checkpoint.safe_zero_to_fp32`, so nothing is unpickled beyond tensors and
DeepSpeed's three plain data types.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mmm4rec.errors import UserError
from mmm4rec.export_format import EXPORT_DTYPES, EXPORT_FILES, is_header, write_files

from .checkpoint import ENGINE_TAG, CheckpointDir, safe_load, safe_zero_to_fp32

__all__ = ["dense_state_dict", "export_checkpoint", "write_export", "model_from_checkpoint", "check_export_target",
           "ExportError", "EXPORT_FILES", "EXPORT_DTYPES"]


def dense_state_dict(ck: CheckpointDir) -> dict[str, torch.Tensor]:
    """The dense module's fp32 state dict from a checkpoint (any ZeRO stage)."""
    stage = int(ck.state.get("zero_stage", 0))
    if stage == 0:
        files = sorted(ck.engine_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{ck.engine_dir}: no DeepSpeed model states")
        state = safe_load(files[0], map_location="cpu")["module"]
    else:
        with safe_zero_to_fp32() as zero_to_fp32:
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ck.path), tag=ENGINE_TAG)
    return {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
            for k, v in state.items()}


class ExportError(UserError, ValueError):
    """The export's output folder cannot be used (``mmm4rec export``: one line, exit 2)."""


def _foreign_entries(out: Path, own: set[str]) -> list[str]:
    """Entries of ``out`` that an export does not write (empty: ``out`` is new, empty or an
    earlier export that may be replaced; ``own``: ``EXPORT_FILES`` and what the new one writes)."""
    if not out.exists() and not out.is_symlink():
        return []
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"{out}: exists and is not a directory; give a new or empty folder, or an earlier export")
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if n not in own or not (out / n).is_file()]
    if not foreign and names and not is_header(out / "config.json"):
        foreign = names   # files with an export's names, but no export: not ours to replace
    return foreign


def check_export_target(out: str | os.PathLike, own: tuple[str, ...] = EXPORT_FILES) -> Path:
    """Refuse an output folder that holds anything an export does not write: an export
    never deletes a user's files (``mmm4rec export CKPT .`` must not empty the folder)."""
    out = Path(out)
    foreign = _foreign_entries(out, set(own))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"{out}: not empty and not an earlier export (it holds {shown}); nothing was written "
                          f"or deleted: give a new or empty folder, or an earlier export to replace")
    return out


def _swap_into_place(tmp: Path, out: Path, own: set[str]) -> None:
    check_export_target(out, tuple(own))   # again: the folder may have changed while we wrote
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out, old)          # the earlier export (checked: export files only)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        if out.is_dir():
            out.rmdir()               # empty: nothing to lose
        os.replace(tmp, out)


def write_export(model_type: str, config, state: dict[str, torch.Tensor], out: str | os.PathLike,
                 dtype: str = "fp32", card: str | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``README.md``, the model card,
    when given) into a temporary sibling of ``out``, then move it into place: a new folder
    is renamed in; an earlier export (nothing but export files) is swapped out by two
    renames and then removed; a folder with anything else is refused (:class:`ExportError`)
    before and after writing. ``dtype``: fp32 or bf16 for the floating-point tensors
    (``config.json`` records it; loading casts back to the model's)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype: must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    out = check_export_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        write_files(tmp, model_type, config, state, dtype, card)
        _swap_into_place(tmp, out, own={*EXPORT_FILES, *(p.name for p in tmp.iterdir())})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)   # only our own temporary folder
    return out


def export_checkpoint(checkpoint: str | os.PathLike | CheckpointDir, out: str | os.PathLike,
                      dtype: str = "fp32") -> Path:
    """``mmm4rec export CHECKPOINT OUT``: the transferable weights of a checkpoint, with a
    model card (``README.md``: config, data manifest digest, feature encoders, metrics)."""
    check_export_target(out)   # before the (slow) consolidation
    ck = checkpoint if isinstance(checkpoint, CheckpointDir) else CheckpointDir.resolve(checkpoint)
    mc = ck.model_config
    state = dense_state_dict(ck)
    # check against the model class: a clear error instead of an unloadable export
    from mmm4rec.config import from_dict
    from mmm4rec.models import MODELS

    from .model import build_dense

    config = from_dict(MODELS[mc["model_type"]].config_cls, mc["config"])
    with torch.device("meta"):
        dense, _ = build_dense(mc["model_type"], config)
    expected = set(dense.state_dict())
    if set(state) != expected:
        raise ValueError(f"{ck.path}: DeepSpeed state has keys {sorted(set(state) ^ expected)} that do not match "
                         f"the {mc['model_type']} dense module")
    return write_export(mc["model_type"], config, state, out, dtype=dtype,
                        card=_card(ck, mc["model_type"], config, state, dtype))


def _card(ck: CheckpointDir, model_type: str, config, state: dict, dtype: str) -> str:
    import yaml

    from .model_card import model_card

    exp_file = ck.path / "config.yaml"
    experiment = yaml.safe_load(exp_file.read_text()) if exp_file.is_file() else None
    n_params = sum(v.numel() for v in state.values())
    stored = str(EXPORT_DTYPES[dtype]).removeprefix("torch.")
    return model_card(model_type, dataclasses.asdict(config), n_params, stored, ck.state, experiment, str(ck.path))


def model_from_checkpoint(checkpoint: str | os.PathLike | CheckpointDir, item_table=None):
    """A plain single-process model (``mmm4rec.models``) with a checkpoint's weights:
    dense from DeepSpeed, trainable tables reassembled from every rank's rows, frozen
    features from ``item_table`` (a ``data_shards.ItemTable``) when given."""
    from mmm4rec.config import from_dict
    from mmm4rec.models import MODELS

    from .tables import ShardReader, pack_specs

    ck = checkpoint if isinstance(checkpoint, CheckpointDir) else CheckpointDir.resolve(checkpoint)
    mc = ck.model_config
    cls = MODELS[mc["model_type"]]
    model = cls(from_dict(cls.config_cls, mc["config"]))
    model.dense.load_state_dict(dense_state_dict(ck))
    files, metas = ck.rank_files()
    packed = [p for p in pack_specs(model.table_specs()) if p.kind == "trainable"]
    if packed:
        reader = ShardReader(files, metas)
        with torch.no_grad():
            for p in packed:
                full = reader.full(p.name)
                for c in p.columns:
                    model.tables.tables[c.spec.name].weight.copy_(full[:, c.start:c.stop])
    if item_table is not None:
        model.set_item_table(item_table)
    return model
