"""robal: adversarial robustness under long-tailed data.

    robal.evaluate(model, data, attacks=...)      # any model: the eval JSON structure (robal/evaluate/api.py)
    robal.write_report(result, out_dir)           # its JSON, Markdown and plots
    robal.load_model(path)                        # a robal checkpoint as an eval-mode nn.Module
    robal.long_tailed_counts(n_max, C, ratio)     # the long-tail profile
"""
from ._version import __version__
from . import evaluate
from .data.longtail import long_tailed_counts, subsample_indices
from .evaluate.api import write_report
from .train.checkpoint import load_model

__all__ = ["evaluate", "load_model", "long_tailed_counts", "subsample_indices", "write_report", "__version__"]
