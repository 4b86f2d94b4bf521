"""Inference-time adjustments: applied in order to the head's logits when the model predicts.

Each is stored in the checkpoint's model spec, so `robal.load_model` returns exactly what the method
predicts with, and any outside attack evaluates that.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

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
    """tau-normalisation (Kang et al.): z_c = <w_c / ||w_c||^tau, f> on a linear head's features.

    It recomputes the head's logits, so it comes first. The bias b_c is dropped, as in Kang et al.'s tau-norm
    evaluation and the RoBal reference code (its PostNorm classifier); `keep_bias: true` adds it back.
    """

    def __init__(self, class_counts, tau: float = 1.0, keep_bias: bool = False):
        super().__init__()
        self.tau, self.keep_bias = tau, keep_bias

    def forward(self, logits, features, head):
        if not isinstance(head, nn.Linear) or hasattr(head, "class_scale"):
            raise ConfigError("inference.tau_norm needs a linear head (linear or cdt: z_c = <w_c, f> + b_c)")
        weight = head.weight / head.weight.norm(dim=1, keepdim=True) ** self.tau
        return F.linear(features, weight, head.bias if self.keep_bias else None)


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
