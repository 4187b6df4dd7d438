"""Models behind one contract (see ``base.py``)."""
from .base import ItemTables, SeqInput, SeqRecModel, TableSpec
from .configs import MMM4RecConfig, SASRecConfig
from .mmm4rec import MMM4Rec, MMM4RecDense
from .sasrec import SASRec

MODELS = {"mmm4rec": MMM4Rec, "sasrec": SASRec}


def build_model(model_type: str, config) -> SeqRecModel:
    if model_type not in MODELS:
        raise ValueError(f"unknown model type {model_type!r}; known: {sorted(MODELS)}")
    return MODELS[model_type](config)


__all__ = ["ItemTables", "SeqInput", "SeqRecModel", "TableSpec", "MMM4RecConfig",
           "SASRecConfig", "MMM4Rec", "MMM4RecDense", "SASRec", "MODELS", "build_model"]
