"""MMM4Rec: multi-modal sequential recommendation with state space duality, at scale.

Importing the package is light: the leaf modules (``mmm4rec.config``, ``mmm4rec.paths``,
``mmm4rec.errors``) load without torch; the models load on first use of a name below
(PEP 562), so ``import data_shards`` does not import the models or the kernels.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MMM4Rec", "MMM4RecConfig", "SASRec", "SASRecConfig", "build_model", "__version__"]

if TYPE_CHECKING:
    from .models import MMM4Rec, MMM4RecConfig, SASRec, SASRecConfig, build_model


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".models", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
