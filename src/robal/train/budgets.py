"""Training perturbation budgets by class and epoch (`train.attack.budget`), a plug-in to every framework.

A budget is built each epoch from the training class counts, the configured `train.attack.eps` and the 0-based
epoch, and returns the L-inf radius of each class, shape (C,). The training attack gives every image the radius
of its label (and, by default, scales its step size in proportion), so one PGD run mixes radii. Evaluation is
untouched: it always uses eval.eps.
"""
from __future__ import annotations

import torch

from ..registry import Registry

EPS_BUDGETS = Registry("eps budget")


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up from 0: (epoch + 1) / warmup_epochs in the first warmup_epochs epochs, then 1."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)


@EPS_BUDGETS.register("constant")
def constant(class_counts, eps: float, epoch: int, warmup_epochs: int = 0) -> torch.Tensor:
    """The same eps for every class (the default), optionally ramped up over the first warmup_epochs."""
    return torch.full((len(class_counts),), eps * warmup_factor(epoch, warmup_epochs))


@EPS_BUDGETS.register("power")
def power(class_counts, eps: float, epoch: int, tau: float = 0.1, max_scale: float = 2.0,
          warmup_epochs: int = 0) -> torch.Tensor:
    """Class-wise budget: eps_c = eps * min((n_max / n_c)^tau, max_scale), times the warm-up factor.

    The largest class keeps eps; rarer classes get a larger radius (tau 0.1 on CIFAR-10-LT rho 50: the rarest
    class 50^0.1 = 1.48 x eps, i.e. 11.8/255 for eps 8/255), so the tail, which the balanced test set
    weighs as much as the head, is trained against stronger perturbations.
    """
    if tau < 0 or max_scale < 1:
        raise ValueError(f"train.attack.budget_args: tau must be >= 0 and max_scale >= 1; got {tau}, {max_scale}")
    counts = torch.as_tensor(class_counts, dtype=torch.float).clamp_min(1)
    scale = (counts.max() / counts).pow(tau).clamp(max=max_scale)
    return eps * scale * warmup_factor(epoch, warmup_epochs)
