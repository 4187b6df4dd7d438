"""The model card (``README.md``) written beside an export's weights.

It says what the weights are and where they came from: the model config and
parameter count, the data (shard-set URL, ``manifest.json`` sha256, dataset, sizes),
the frozen feature encoders (from the manifest), the metrics of the run (best
validation and its test metrics, from the checkpoint's state) and the experiment
config with credentials redacted. Everything comes from the checkpoint and the
shard set's manifest; a manifest that cannot be read at export time is named as such.
"""
from __future__ import annotations

import json
from typing import Any

import yaml

from mmm4rec.config import redact_secrets

__all__ = ["model_card"]


def _metrics_table(valid: dict | None, test: dict | None) -> str:
    keys = [k for k in (valid or test or {}) if k != "count"]
    if not keys:
        return "No evaluation was recorded for this checkpoint.\n"
    rows = ["| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in (("valid", valid), ("test", test)):
        if m:
            rows.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k))
                                                   for k in keys) + " |")
    return "\n".join(rows) + "\n"


def _read_manifest(url: str, storage: dict) -> tuple[dict | None, str | None, str | None]:
    from data_shards import read_manifest

    from .plan import manifest_digest

    try:
        return read_manifest(url, storage), manifest_digest(url, storage), None
    except Exception as e:  # noqa: BLE001 -- the card says the manifest was not readable, export goes on
        return None, None, f"{type(e).__name__}: {e}"


def model_card(model_type: str, config: dict, n_params: int, dtype: str, state: dict[str, Any],
               experiment: dict | None, source: str) -> str:
    """The card's text. ``state``: the checkpoint's ``checkpoint.json`` (best metrics,
    step, epoch); ``experiment``: its ``config.yaml`` (None when absent)."""
    exp = redact_secrets(experiment or {})              # what the card shows
    data = (experiment or {}).get("data", {}) or {}     # what reads the manifest (real credentials)
    url = data.get("url") or ""
    manifest, digest, err = _read_manifest(url, data.get("storage") or {}) if url else (None, None, "no data.url")
    name = exp.get("name") or model_type
    lines = [
        "---",
        "library_name: mmm4rec",
        f"tags: [sequential-recommendation, multi-modal, {model_type}]",
        "---",
        f"# {name}: {model_type} transferable weights",
        "",
        f"Exported from checkpoint `{source}` (optimizer step {state.get('step')}, "
        f"{state.get('epoch')} epoch(s) done). The file holds the dense, transferable weights only "
        "(adapters, blocks, norms, fusion weight); the item tables (frozen features, per-domain ID term) "
        "stay with the data they belong to.",
        "",
        "```python",
        "from mmm4rec import MMM4Rec",
        "model = MMM4Rec.from_pretrained(\"PATH\", num_items=NUM_ITEMS_OF_YOUR_DOMAIN)",
        "```",
        "",
        "## Model",
        "",
        f"- type: `{model_type}`, {n_params:,} parameters, stored as `{dtype}` (`model.safetensors`)",
        "- config (`config.json`):",
        "",
        "```json",
        json.dumps(config, indent=1),
        "```",
        "",
        "## Data",
        "",
        f"- shard set: `{url or 'unknown'}`",
    ]
    if manifest is not None:
        ds = manifest.get("dataset", {}) or {}
        lines += [
            f"- manifest sha256: `{digest}`",
            f"- dataset: {manifest.get('name')}" + (f" ({ds.get('format')})" if ds.get("format") else ""),
            f"- {int(manifest['num_items']):,} items, {int(manifest.get('num_users', 0)):,} users, "
            f"{int(manifest.get('num_interactions', 0)):,} interactions; samples "
            + ", ".join(f"{s} {int(manifest['splits'][s]['samples']):,}" for s in ("train", "valid", "test")
                        if s in manifest.get("splits", {})),
        ]
    else:
        lines.append(f"- manifest: not readable at export time ({err})")
    lines += ["", "## Feature encoders", ""]
    if manifest is not None:
        for modality, f in manifest.get("features", {}).items():
            if f.get("dim"):
                lines.append(f"- {modality}: `{f.get('encoder') or 'unnamed'}`, {f['dim']}-d {f.get('dtype', '')}, "
                             f"present for {int(f.get('present', 0)):,} of {int(manifest['num_items']):,} items")
            else:
                lines.append(f"- {modality}: none")
        lines.append("")
        lines.append("Fine-tuning data must be encoded with the same encoders (same dims) for the adapters "
                     "to fit.")
    else:
        lines.append("- unknown (manifest not readable at export time)")
    lines += [
        "", "## Metrics", "",
        f"Best validation at epoch {state.get('best_epoch')} (step {state.get('best_step')}), full ranking over "
        "all items; test with the same weights:", "",
        _metrics_table(state.get("best_valid"), state.get("best_test")),
        "## Training config", "",
        "The experiment config of the run (credentials redacted):", "",
        "```yaml", yaml.safe_dump(exp, sort_keys=False).rstrip(), "```", "",
    ]
    return "\n".join(lines)
