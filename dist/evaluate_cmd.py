"""``mmm4rec evaluate``: one-process evaluation of a checkpoint or an export.

This is also the single-process reference the distributed evaluation is checked
against (``tests/test_dist_runs.py``): a plain ``mmm4rec.models`` model and
``mmm4rec.evaluate.evaluate`` (chunked ranking, items encoded once; the trainer calls
it with a cross-rank ``all_reduce``) over a world-of-one loader.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mmm4rec.config import ConfigError
from mmm4rec.export_format import is_export, read_header

from .checkpoint import CheckpointDir

__all__ = ["evaluate_path", "load_plain_model"]


def load_plain_model(path: str | Path, cfg, url: str):
    """(model, kind) for a checkpoint or an export, with the data's item features."""
    from data_shards import load_item_table, read_manifest
    from mmm4rec.models import MODELS

    from .config import DATA_FIELDS, resolve_model_config
    from .export import model_from_checkpoint

    storage = cfg.data.storage.to_options()
    table = load_item_table(url, storage)
    p = Path(path)
    if is_export(p):
        head = read_header(p)
        _, model_cfg = resolve_model_config(cfg, read_manifest(url, storage))
        cls = MODELS[head["model_type"]]
        data_fields = {k: getattr(model_cfg, k) for k in DATA_FIELDS
                       if hasattr(model_cfg, k)}
        model = cls.from_pretrained(p, **data_fields)
        model.set_item_table(table)
        return model, "export"
    ck = CheckpointDir.resolve(p)
    model = model_from_checkpoint(ck, table)
    if model.num_items != table.num_items:
        raise ConfigError(f"{ck.path} was trained on {model.num_items} items, the data {url} has "
                          f"{table.num_items}")
    return model, f"checkpoint {ck.path.name}"


def _progress(loader, desc: str):
    """The loader's batches under a tqdm bar on stderr (users ranked so far)."""
    from tqdm.auto import tqdm

    return tqdm(loader, total=len(loader), desc=desc, unit="batch", dynamic_ncols=True)


def evaluate_path(path: str, config: str | None, split: str = "test", overrides: list[str] | None = None) -> dict:
    import torch

    from data_shards import SequenceLoader
    from mmm4rec.evaluate import evaluate

    from .build import resolve_data_url
    from .config import load_experiment

    p = Path(path)
    if config is None:
        ck_cfg = None
        if not is_export(p):
            ck = CheckpointDir.resolve(p)
            ck_cfg = ck.path / "config.yaml"
        if ck_cfg is None or not ck_cfg.is_file():
            raise ConfigError(f"{path}: give --config (the experiment YAML naming the data to evaluate on)")
        config = str(ck_cfg)
    cfg = load_experiment(config, overrides or [])

    class _Solo:   # a world of one for resolve_data_url
        is_main, rank, world_size = True, 0, 1

        @staticmethod
        def barrier():
            return None

    url = resolve_data_url(cfg, _Solo)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, url=url, sample=None))
    model, kind = load_plain_model(p, cfg, url)
    loader = SequenceLoader(cfg.data, split, rank=0, world_size=1, shuffle=False)
    with torch.no_grad():
        metrics = evaluate(model, _progress(loader, f"evaluate {split}"), ks=cfg.eval.ks,
                           mask_history=cfg.eval.mask_history, item_chunk_size=cfg.eval.item_chunk_size)
    return {"path": str(path), "kind": kind, "split": split, "data": url, **metrics}

