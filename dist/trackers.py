"""Optional experiment trackers: Weights & Biases and MLflow (rank 0 only).

Switched on in the experiment config (``trackers.wandb.enabled``,
``trackers.mlflow.enabled``); installed with ``pip install "mmm4rec[trackers]"``.
:class:`~dist.monitor.Monitor` hands them every scalar it writes to TensorBoard and
CSV (losses, LR, throughput, memory, evaluation metrics) with the optimizer step,
and the resolved config (secrets redacted) once at the start.

* W&B: ``mode: offline`` writes the run under ``trackers.wandb.dir`` (default OUTPUT_DIR;
  the run lands in ``OUTPUT_DIR/wandb/offline-run-*``) for a later ``wandb sync``; ``online`` needs ``WANDB_API_KEY``
  (read by wandb from the environment, never from our config).
* MLflow: ``tracking_uri`` empty -> a file store ``OUTPUT_DIR/mlruns`` (MLflow 3 keeps
  that backend in maintenance mode; ``MLFLOW_ALLOW_FILE_STORE=true`` is set for it);
  any other URI (``http://...``, ``sqlite:///...``, ``databricks``) as MLflow takes it.
  The ``[trackers]`` extra installs ``mlflow-skinny`` (the client); a server or
  ``mlflow ui`` needs the full ``mlflow`` package.

A resumed run (``--resume``) continues the same tracker run: its id is kept in
``OUTPUT_DIR/logs/<tracker>_run_id``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from mmm4rec.config import ConfigError, redact_argv
from mmm4rec.errors import import_optional

__all__ = ["check_trackers", "open_trackers", "WandbTracker", "MlflowTracker"]

_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(cfg) -> None:
    """Fail before training (ConfigError) when an enabled tracker is not installed."""
    for name, module in _PACKAGES.items():
        if getattr(cfg, name).enabled and importlib.util.find_spec(module) is None:
            raise ConfigError(f"trackers.{name}.enabled: the '{module}' package is not installed; "
                              f"pip install \"mmm4rec[trackers]\" (or set trackers.{name}.enabled=false)")


def _run_id_file(output_dir: Path, name: str) -> Path:
    return output_dir / "logs" / f"{name}_run_id"


class WandbTracker:
    def __init__(self, cfg, output_dir: Path, run_name: str, config: dict, resume: bool):
        wandb = import_optional("wandb", "trackers", "trackers.wandb")
        d = Path(cfg.dir) if cfg.dir else output_dir          # wandb adds its own wandb/ folder
        d.mkdir(parents=True, exist_ok=True)
        id_file = _run_id_file(output_dir, "wandb")
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        # wandb records the command line (sys.argv) as run metadata: --set overrides may carry
        # credentials (data.storage.secret=...), so it sees them redacted
        argv = sys.argv
        sys.argv = redact_argv(argv)
        try:
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(d), name=run_name,
                                  config=config, tags=list(cfg.tags) or None, id=run_id,
                                  resume="allow" if run_id else None)
        finally:
            sys.argv = argv
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.id)
        self.dir = Path(self.run.dir).parent     # .../wandb/<offline-|>run-<time>-<id>

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, cfg, output_dir: Path, run_name: str, config: dict, resume: bool):
        mlflow = import_optional("mlflow", "trackers", "trackers.mlflow")
        self.mlflow = mlflow
        uri = cfg.tracking_uri
        if not uri:
            # a file store in the run directory: MLflow 3 keeps it in maintenance mode and
            # refuses it unless allowed; a team server is `trackers.mlflow.tracking_uri`
            uri = (output_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.experiment)
        id_file = _run_id_file(output_dir, "mlflow")
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else (cfg.run_name or run_name))
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.info.run_id)
        if run_id is None:
            mlflow.log_params(_flat(config))
        self.uri = uri

    def log(self, scalars: dict, step: int) -> None:
        # MLflow metric names: letters, digits, _ - . / and spaces; '@' is not allowed
        self.mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = str(v)[:500]   # MLflow's parameter value limit is generous, not unbounded
    return out


def open_trackers(cfg, output_dir: Path, run_name: str, config: dict, resume: bool) -> list:
    """The enabled trackers (call on rank 0 only). ``config``: the resolved, redacted config."""
    check_trackers(cfg)
    out: list[WandbTracker | MlflowTracker] = []
    if cfg.wandb.enabled:
        os.environ.setdefault("WANDB_SILENT", "true")
        out.append(WandbTracker(cfg.wandb, output_dir, run_name, config, resume))
    if cfg.mlflow.enabled:
        out.append(MlflowTracker(cfg.mlflow, output_dir, run_name, config, resume))
    return out
