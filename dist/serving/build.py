"""``mmm4rec retrieval export``: a trained model + a shard set's catalog -> a retrieval export.

:func:`export_retrieval` takes a plain model (``mmm4rec.models``) whose item tables hold the
catalog's features; :func:`load_model` makes one from an export directory
(``model.safetensors`` + ``config.json``) or a ``dist/train.py`` checkpoint (read through
``dist.export.model_from_checkpoint``: the only place that touches the training stack).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmm4rec.config import ConfigError

from . import index as idx
from .store import FILES, FORMAT, FORMAT_VERSION, Retrieval, library_versions, now
from .tower import ItemEncoder, UserTower, export_program

_log = logging.getLogger(__name__)
__all__ = ["export_retrieval", "load_model", "export_from_paths"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model(path: str | os.PathLike, table):
    """(model, source dict) for an export directory or a checkpoint, with ``table``'s features."""
    from mmm4rec.export_format import is_export, read_header
    from mmm4rec.models import MODELS

    p = Path(path)
    if is_export(p):
        head = read_header(p)
        cls = MODELS.get(str(head.get("model_type")))
        if cls is None:
            raise ConfigError(f"{p}/config.json: unknown model_type {head.get('model_type')!r}")
        fields = {"num_items": table.num_items}
        if "text_dim" in head["config"]:
            fields.update(text_dim=table.text_dim, image_dim=table.image_dim or head["config"]["image_dim"])
        model = cls.from_pretrained(p, **fields)
        model.set_item_table(table)
        return model, {"kind": "export", "path": str(p), "sha256": _sha256(p / "model.safetensors")}
    from dist.checkpoint import CheckpointDir  # a training checkpoint: the training stack reads it
    from dist.export import model_from_checkpoint

    ck = CheckpointDir.resolve(p)
    model = model_from_checkpoint(ck, table)
    if model.num_items != table.num_items:
        raise ConfigError(f"{ck.path} was trained on {model.num_items} items, the catalog has {table.num_items}")
    return model, {"kind": "checkpoint", "path": str(ck.path)}


def _check_servable(model) -> None:
    cfg = model.config
    if getattr(cfg, "time_leak", False):
        raise ConfigError("model.time_leak=true reads the target's timestamp, which a served request does not "
                          "have; export a model trained without it")


@torch.no_grad()
def export_retrieval(model, item_table, out: str | os.PathLike, *, rows: np.ndarray | None = None,
                     source: dict | None = None, catalog: dict | None = None, nlist: int | None = None,
                     chunk: int = 65536, progress: bool = True) -> Path:
    """Write a retrieval export of ``model`` over the catalog ``item_table``.

    Args:
        model: a plain model whose tables hold the catalog's features (``set_item_table``).
        item_table: the ``data_shards.ItemTable`` (for the original item ids).
        rows: the item ids (1..num_items) to serve, in order (default: all); the others can
            be added later with ``items add`` (cold-start evaluation).
        source / catalog: what the manifest records about the model and the shard set.
        nlist: cells of the approximate (IVF) index (default ~sqrt(n)).
    """
    _check_servable(model)
    model = model.eval()
    names = [s.name for s in model.table_specs()]
    ids = np.arange(1, item_table.num_items + 1) if rows is None else np.asarray(rows, np.int64)
    if ids.size and (ids.min() < 1 or ids.max() > item_table.num_items or len(np.unique(ids)) != len(ids)):
        raise ValueError(f"rows: expected distinct item ids in 1..{item_table.num_items}")
    serve = torch.from_numpy(np.concatenate([[0], ids]).astype(np.int64))
    features = {n: model.tables.tables[n].weight[serve].detach().float().numpy().copy() for n in names}
    V = []
    with tqdm(total=len(serve), desc="encoding item vectors", unit="item", disable=not progress) as bar:
        for s in range(0, len(serve), chunk):
            V.append(model.item_vectors(serve[s:s + chunk]).float().numpy())
            bar.update(len(serve[s:s + chunk]))
    vectors = np.concatenate(V)
    vectors[0] = 0.0
    out = Path(out)
    work = out.with_name(f".{out.name}.build")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        # the two programs, exported from the model's own dense module (eval mode)
        L = model.config.max_len
        ex_seq = torch.ones(2, L, dtype=torch.int64)
        ex_rows = [model.tables.tables[n](ex_seq).detach() for n in names]
        ex_time = torch.arange(2 * L, dtype=torch.float64).reshape(2, L)
        ex_len = torch.tensor([L, 1], dtype=torch.int64)
        tower = UserTower(model.dense, names).eval()
        export_program(tower, (*ex_rows, ex_seq, ex_time, ex_len), work / FILES["tower"])
        encoder = ItemEncoder(model.dense, names).eval()
        export_program(encoder, tuple(model.tables.tables[n](serve[:2]).detach() for n in names),
                       work / FILES["encoder"])
        indexes = {}
        for kind in idx.KINDS:
            if progress:
                _log.info(f"building the {kind} index over {len(ids):,} items", extra={"tag": "retrieval"})
            indexes[kind] = idx.build_index(kind, vectors[1:], nlist=nlist)
        ivf = indexes["approx"]
        cfg = model.config
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created": now(),
            "model": {"model_type": model.model_type, "config": dataclasses.asdict(cfg),
                      "max_len": cfg.max_len, "dim": int(vectors.shape[1]),
                      "use_id": bool(getattr(cfg, "use_id", False)), "source": source or {}},
            "catalog": {**(catalog or {}), "items_from_catalog": int(len(ids)),
                        "text_encoder": item_table.text_encoder, "image_encoder": item_table.image_encoder,
                        "edits": []},
            "tables": [{"name": s.name, "dim": s.dim, "kind": s.kind} for s in model.table_specs()],
            "vectors": {"dim": int(vectors.shape[1]), "dtypes": ["fp32", "fp16"],
                        "score": "user_vector . item_vector (fusion weights and 1/temperature folded in)"},
            "index": {"exact": {"type": "IndexFlatIP"},
                      "approx": {"type": "IndexIVFFlat", "metric": "inner_product", "nlist": int(ivf.nlist),
                                 "nprobe": int(ivf.nprobe)}},
            "programs": {"user_tower": {"file": FILES["tower"], "inputs": [*names, "item_seq", "time_seq",
                                                                            "item_seq_len"]},
                         "item_encoder": {"file": FILES["encoder"], "inputs": names},
                         "runtime": "torch.export (torch.export.load(path).module()); no DeepSpeed/torchrec"},
            "versions": library_versions(),
        }
        item_ids = [""] + [str(item_table.item_ids[i]) for i in ids]
        active = np.ones(len(item_ids), bool)
        active[0] = False
        ret = Retrieval(manifest, item_ids, active, features, vectors, indexes, root=work)
        return ret.save(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_from_paths(model_path: str, data_url: str, out: str, storage_options: dict | None = None,
                      nlist: int | None = None, progress: bool = True) -> Path:
    """``mmm4rec retrieval export MODEL --data URL --out DIR``."""
    from data_shards import load_item_table, read_manifest

    manifest = read_manifest(data_url, storage_options)
    table = load_item_table(data_url, storage_options)
    model, source = load_model(model_path, table)
    catalog = {"url": data_url, "name": manifest.get("name"), "num_items": manifest["num_items"],
               "shards_fingerprint": hashlib.sha256(
                   "".join(s["sha256"] for s in manifest["items"]["shards"]).encode()).hexdigest()}
    return export_retrieval(model, table, out, source=source, catalog=catalog, nlist=nlist, progress=progress)
