"""The export format, in one place: writing, reading, detecting, compatibility checks.

An export is a folder with ``config.json`` (``{"model_type", "config", "dtype"}``) and
``model.safetensors`` (the dense weights: adapters, blocks, norms, shared fusion weight;
never the per-domain item tables), plus ``README.md`` (a model card) when written by
``mmm4rec export``. No pickle anywhere.

Writers: ``SeqRecModel.save_pretrained`` and ``dist.export.write_export`` (which adds
the atomic swap into place) both call :func:`write_files`. Readers: ``from_pretrained``,
``train.init_from``, ``mmm4rec evaluate`` and ``mmm4rec serve export`` call
:func:`is_export` / :func:`read_header` / :func:`read_export` / :func:`load_compatible`.
For shell scripts: ``python -m mmm4rec.export_format detect PATH`` prints the model type
and exits 0 for an export, or prints why not and exits 1.

What an export never holds: the item tables (frozen features, and the trainable
per-domain rows: the ID term ``id_text`` / ``id_image`` of ``use_id: true`` and the
``dynamic_instance`` fusion rows), because they live in the tables, not in the dense;
a fine-tuning model starts them at their init (zeros). The release drops the same at
load (``text/vision_item_embedding_bias``), and also ``fusion_factor``; ours keeps the
``dynamic_shared`` weight (``fusion``, two logits shared by every item) as transferable.

Loading is strict (:func:`check_compatible`: every tensor missing, unexpected or
differently shaped is an error) with one rule: **whole extra layers are dropped**. An
export with more layers than the model (``layers.<i>.*`` for ``i >= `` the model's
``num_layers``; e.g. the release's 2-layer pretraining into its 1-layer fine-tuning)
loads its first layers; each extra layer is dropped only when it is complete (the same
tensor names and shapes as the model's layer 0), and what was dropped is logged and
listed in the header's ``"skipped"`` (:func:`load_compatible`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import ConfigError

__all__ = ["EXPORT_FILES", "EXPORT_DTYPES", "is_export", "read_header", "read_export", "write_files",
           "check_compatible", "extra_layers", "load_compatible"]

log = logging.getLogger(__name__)
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

#: what an export holds (the model card, README.md, when written)
EXPORT_FILES = ("model.safetensors", "config.json", "README.md")

#: how the floating-point weights are stored (``mmm4rec export --dtype``)
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_WHAT = "an export is OUTPUT_DIR/export of a run, or the output of 'mmm4rec export'"


def _header_problem(path: Path) -> str | None:
    """Why ``path`` is not an export (None: it is one)."""
    for f in ("config.json", "model.safetensors"):
        if not (path / f).is_file():
            return f"{path} is not an export (missing {f}; {_WHAT})"
    try:
        head = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"{path}/config.json is not valid JSON: {e}"
    if not isinstance(head, dict) or "model_type" not in head or "config" not in head:
        return f"{path}/config.json has no model_type/config"
    return None


def is_header(config_json: Path) -> bool:
    """Whether ``config_json`` parses as an export header (``model_type`` + ``config``)."""
    try:
        head = json.loads(Path(config_json).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and "model_type" in head and "config" in head


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an export's files (``read_header`` then checks the header)."""
    return all((Path(path) / f).is_file() for f in ("config.json", "model.safetensors"))


def read_header(path: str | os.PathLike, what: str = "") -> dict:
    """``config.json`` of an export; a clear ConfigError (prefixed ``what: ``) otherwise."""
    problem = _header_problem(Path(path))
    if problem:
        raise ConfigError(f"{what}: {problem}" if what else problem)
    head = json.loads((Path(path) / "config.json").read_text())
    if head["model_type"] == "mmm4rec" and isinstance(head["config"], dict):
        # exports written before `missing_modality` existed computed "zero"; the default is
        # "bias" since it was measured (docs/model.md), so such an export keeps what it was
        head["config"].setdefault("missing_modality", "zero")
    return head


def read_export(path: str | os.PathLike, what: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, state dict) of an export."""
    from safetensors.torch import load_file

    head = read_header(path, what)
    return head, load_file(str(Path(path) / "model.safetensors"))


def write_files(out_dir: str | os.PathLike, model_type: str, config, state: Mapping[str, torch.Tensor],
                dtype: str = "fp32", card: str | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``README.md`` = ``card``) into
    ``out_dir``; ``dtype`` (fp32 | bf16) for the floating-point tensors, recorded in the
    header (loading casts back to the model's)."""
    from safetensors.torch import save_file

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype: must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(EXPORT_DTYPES[dtype]) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state.items()}, str(out / "model.safetensors"))
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) \
        else dict(config)
    head = {"model_type": model_type, "config": cfg, "dtype": str(EXPORT_DTYPES[dtype]).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(head, indent=2))
    if card is not None:
        (out / "README.md").write_text(card)
    return out


def check_compatible(own: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], source: str) -> None:
    """Raise ConfigError listing every tensor missing, unexpected or differently shaped
    between a model's state dict ``own`` and an export's tensor ``shapes``."""
    problems = [f"  {k}: export {tuple(shapes[k])} vs model {tuple(own[k].shape)}"
                for k in shapes if k in own and tuple(own[k].shape) != tuple(shapes[k])]
    problems += [f"  {k}: missing in the export" for k in own if k not in shapes]
    problems += [f"  {k}: not in the model" for k in shapes if k not in own]
    if problems:
        raise ConfigError(f"{source} is incompatible with the model config:\n" + "\n".join(problems))


def extra_layers(own: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple]) -> list[str]:
    """Names in ``shapes`` (an export's) that are whole layers beyond the model's: the
    tensors ``layers.<i>.<rest>`` with ``i`` >= the model's layer count, for each such
    ``i`` whose tensors are exactly the model's layer 0's (names and shapes). A partial or
    differently shaped extra layer is not listed (so :func:`check_compatible` reports it)."""
    own_layers: dict[int, dict[str, tuple]] = {}
    for k, v in own.items():
        m = _LAYER.match(k)
        if m:
            own_layers.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(v.shape)
    if not own_layers:
        return []
    n_own, template = max(own_layers) + 1, own_layers[0]
    theirs: dict[int, dict[str, tuple]] = {}
    for k, shape in shapes.items():
        m = _LAYER.match(k)
        if m and int(m.group(1)) >= n_own:
            theirs.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(shape)
    return sorted(f"layers.{i}.{rest}" for i, layer in theirs.items() if layer == template for rest in layer)


def load_compatible(path: str | os.PathLike, model_type: str, own: Mapping[str, torch.Tensor],
                    what: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, state) of the export at ``path`` for a ``model_type`` model whose state
    dict is ``own``: the type and every tensor's shape checked before any is read.
    Whole extra layers are dropped (module docstring): the header's ``"skipped"`` lists
    the names not loaded (empty when none)."""
    from safetensors import safe_open

    head = read_header(path, what)
    prefix = f"{what}: {path}" if what else str(path)
    if head["model_type"] != model_type:
        raise ConfigError(f"{prefix} holds a {head['model_type']} model, the config builds {model_type}")
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        skipped = extra_layers(own, shapes)
        check_compatible(own, {k: v for k, v in shapes.items() if k not in set(skipped)}, prefix)
        state = {k: fh.get_tensor(k) for k in fh.keys() if k not in set(skipped)}
    head["skipped"] = skipped
    if skipped:
        layers = sorted({int(_LAYER.match(k).group(1)) for k in skipped})   # type: ignore[union-attr]
        log.warning("%s: the export has %d layer(s) more than the model: loaded layers 0..%d, dropped layer(s) %s "
                    "(%d tensors)", prefix, len(layers), layers[0] - 1, layers, len(skipped))
    return head, state


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmm4rec.export_format",
                                 description="Inspect the export format (for shell scripts).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("detect", help="print the model type of the export at PATH (exit 0), or why PATH is not "
                                      "one (stderr, exit 1)")
    d.add_argument("path")
    args = ap.parse_args(argv)
    problem = _header_problem(Path(args.path))
    if problem:
        print(problem, file=sys.stderr)
        return 1
    print(read_header(args.path)["model_type"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
