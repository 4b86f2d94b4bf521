"""robal: adversarial robustness under long-tailed data."""
from ._version import __version__
from .train.checkpoint import load_model

__all__ = ["load_model", "__version__"]
