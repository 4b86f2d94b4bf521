"""Per-class loss weights by epoch. `effective_number` with start_epoch > 0 is deferred re-weighting (DRW)."""
from __future__ import annotations

import torch

from ..registry import Registry

WEIGHTINGS = Registry("weighting")


def effective_number_weights(class_counts, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights (Cui et al.): w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to C."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta ** counts)
    return (w / w.sum() * len(counts)).float()


@WEIGHTINGS.register("none")
def no_weighting(class_counts, epoch: int):
    return None


@WEIGHTINGS.register("effective_number")
def effective_number(class_counts, epoch: int, beta: float = 0.9999, start_epoch: int = 0):
    """From `start_epoch` (0-based) on, weight each class by its effective number; before it, no weights."""
    return effective_number_weights(class_counts, beta) if epoch >= start_epoch else None
