"""Per-class loss weights by epoch. `effective_number` with start_epoch > 1 is deferred re-weighting (DRW)."""
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
def effective_number(class_counts, epoch: int, beta: float = 0.9999, start_epoch: int = 1):
    """Weight each class by its effective number from epoch `start_epoch` on, no weights before it.

    `start_epoch` counts from 1 like train.lr_milestones, so DRW (deferred re-weighting, Cao et al.) starting
    with the first lr decay uses the same number: milestones [15, 18] -> start_epoch 15. The trainer passes
    the 0-based `epoch`. start_epoch 1 (or 0) weights the whole run.
    """
    return effective_number_weights(class_counts, beta) if epoch + 1 >= start_epoch else None
