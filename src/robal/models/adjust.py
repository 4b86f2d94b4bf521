"""Inference-time adjustments: applied in order to the head's logits when the model predicts.

Each is stored in the checkpoint's model spec, so `robal.load_model` returns exactly what the method
predicts with, and any outside attack evaluates that.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import ConfigError, Registry

ADJUSTMENTS = Registry("inference adjustment")


def log_prior(class_counts) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float)
    return torch.log(counts / counts.sum())


class Adjustment(nn.Module):
    def forward(self, logits, features, head):
        raise NotImplementedError


@ADJUSTMENTS.register("scale")
class Scale(Adjustment):
    """z * s (the scale a cosine head was trained with)."""

    def __init__(self, class_counts, s: float = 10.0):
        super().__init__()
        self.s = s

    def forward(self, logits, features, head):
        return logits * self.s


@ADJUSTMENTS.register("logit_adjust")
class LogitAdjust(Adjustment):
    """Post-hoc logit adjustment / RoBal boundary adjustment: z - tau * log pi_c."""

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__()
        self.tau = tau
        self.register_buffer("log_prior", log_prior(class_counts))

    def forward(self, logits, features, head):
        return logits - self.tau * self.log_prior


@ADJUSTMENTS.register("cdt_post")
class CDTPost(Adjustment):
    """Inference-time class-dependent temperature: z_c / n_c^tau."""

    def __init__(self, class_counts, tau: float = 0.3):
        super().__init__()
        self.register_buffer("divisor", torch.as_tensor(class_counts, dtype=torch.float) ** tau)

    def forward(self, logits, features, head):
        return logits / self.divisor


@ADJUSTMENTS.register("tau_norm")
class TauNorm(Adjustment):
    """tau-normalisation (Kang et al.): the classifier uses w_c / ||w_c||^tau (bias kept as it is)."""

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__()
        self.tau = tau

    def forward(self, logits, features, head):
        if not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ConfigError("inference.tau_norm needs a head with a weight matrix")
        bias = head.bias if getattr(head, "bias", None) is not None else 0.0
        return (logits - bias) / head.weight.norm(dim=1) ** self.tau + bias


@ADJUSTMENTS.register("tde")
class TDERemoval(Adjustment):
    """Total direct effect: the head's logits with alpha times the moving-average feature direction removed."""

    def __init__(self, class_counts, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, logits, features, head):
        if not hasattr(head, "logits_without_direction"):
            raise ConfigError("inference.tde needs the 'tde' head (it tracks the feature direction in training)")
        return head.logits_without_direction(features, self.alpha)
