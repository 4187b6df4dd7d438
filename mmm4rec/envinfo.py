"""``mmm4rec env``: what this installation runs on (paste it into bug reports)."""
from __future__ import annotations

import importlib
import os
import platform


def collect() -> dict[str, str]:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "deepspeed", "torchrec", "fbgemm_gpu", "triton", "webdataset", "fsspec", "s3fs",
                "safetensors", "sentence_transformers", "matplotlib", "wandb", "mlflow", "mamba_ssm"):
        try:
            m = importlib.import_module(mod)
            info[mod] = getattr(m, "__version__", "installed")
        except Exception as e:  # report, never fail
            info[mod] = f"not available ({type(e).__name__})"
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"
    except Exception:
        info["cuda"] = "no"
    from .kernels import dispatch

    info["kernel backend"] = getattr(dispatch, "describe", lambda: os.environ.get("MMM4REC_KERNELS", "auto"))()
    return info


def run(args) -> int:
    info = collect()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("env", help="print versions of the stack and the kernel backend",
                       description="Print Python, torch, DeepSpeed, torchrec, Triton ... versions and the "
                                   "kernel backend that would be used.")
    p.set_defaults(func=run)
