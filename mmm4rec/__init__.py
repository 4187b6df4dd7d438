"""MMM4Rec: multi-modal sequential recommendation with state space duality, at scale."""
from .models import MMM4Rec, MMM4RecConfig, SASRec, SASRecConfig, build_model

__version__ = "0.1.0"
__all__ = ["MMM4Rec", "MMM4RecConfig", "SASRec", "SASRecConfig", "build_model", "__version__"]
