"""robal: adversarial robustness under long-tailed data."""
from .train.checkpoint import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]
