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


@EPS_BUDGETS.register("robustlt")
def robustlt(class_counts, eps: float, epoch: int, alpha: float = 0.3, warmup_epochs: float = 0) -> torch.Tensor:
    """RobustLT's class-wise budget (Zhang et al.; its core/methods/robustlt.py):

        eps_c = (1 - alpha) eps + t sqrt(log(n_max / n_c)) eps,   t = alpha / sum_c pi_c sqrt(log(n_max / n_c)),

    so the prior-weighted mean radius stays eps (the head class gets (1 - alpha) eps, the tail more), times the
    ramp min((e - 1) / warmup_epochs, 1) of the 1-based epoch e (0 in the first epoch; RobustLT sets
    warmup_epochs = beta * epochs with beta 0.8; 0 turns the ramp off).
    """
    if not 0 <= alpha <= 1 or warmup_epochs < 0:
        raise ValueError(f"train.attack.budget_args: alpha must be in [0, 1] and warmup_epochs >= 0; got {alpha}, "
                         f"{warmup_epochs}")
    counts = torch.as_tensor(class_counts, dtype=torch.float64).clamp_min(1)
    spread = torch.log(counts.max() / counts).sqrt()
    weighted = (counts / counts.sum() * spread).sum()
    t = alpha / weighted if weighted > 0 else 0.0  # balanced data: every class keeps eps
    radius = ((1 - alpha) * eps + t * spread * eps) if weighted > 0 else torch.full_like(counts, eps)
    ramp = min(epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
    return (radius * ramp).float()
