"""Long-tailed training losses. Each is built from the training class counts and called as
`loss(z, y, class_weight=None)` on the head's training logits z, returning the batch mean.

Most are one formula: cross-entropy of  s * (z - m_y * onehot(y)) + b  with a per-class margin m and bias b.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .registry import Registry

LOSSES = Registry("loss")


def _counts(class_counts) -> torch.Tensor:
    return torch.as_tensor(class_counts, dtype=torch.float)


def log_prior(class_counts) -> torch.Tensor:
    counts = _counts(class_counts)
    return torch.log(counts / counts.sum())


def weighted_mean(per_sample, y, class_weight):
    if class_weight is None:
        return per_sample.mean()
    return (per_sample * class_weight[y]).mean()


def margin_logits(z, y, margins=None, scale: float = 1.0, bias=None):
    """s * (z - m_y at the target) + b: the logits every margin-style loss feeds to cross-entropy."""
    z = z.float()
    if margins is not None:
        z = z - F.one_hot(y, z.shape[1]) * margins[y][:, None]
    z = z * scale
    return z + bias if bias is not None else z


class MarginCrossEntropy(nn.Module):
    """CE(s * (z - m_y e_y) + b). Subclasses differ only in how they set the margins m and the bias b."""

    def __init__(self, num_classes: int, scale: float = 1.0, margins=None, bias=None):
        super().__init__()
        self.scale = scale
        self.register_buffer("margins", None if margins is None else torch.as_tensor(margins, dtype=torch.float))
        self.register_buffer("bias", None if bias is None else torch.as_tensor(bias, dtype=torch.float))

    def logits(self, z, y):
        return margin_logits(z, y, self.margins, self.scale, self.bias)

    def forward(self, z, y, class_weight=None):
        return weighted_mean(F.cross_entropy(self.logits(z, y), y, reduction="none"), y, class_weight)


@LOSSES.register("ce")
def cross_entropy(class_counts, s: float = 1.0):
    """Plain cross-entropy on s * z."""
    return MarginCrossEntropy(len(class_counts), scale=s)


def ldam_margins(class_counts, max_m: float = 0.5) -> torch.Tensor:
    """LDAM (Cao et al.): m_c proportional to n_c^(-1/4), the largest equal to max_m."""
    m = _counts(class_counts) ** -0.25
    return m * (max_m / m.max())


@LOSSES.register("ldam")
def ldam(class_counts, max_m: float = 0.5, s: float = 10.0):
    return MarginCrossEntropy(len(class_counts), s, ldam_margins(class_counts, max_m))


@LOSSES.register("cos_margin")
def cos_margin(class_counts, m: float = 0.2, s: float = 10.0):
    """Uniform additive cosine margin (HE / CosFace style): the same m for every class."""
    return MarginCrossEntropy(len(class_counts), s, torch.full((len(class_counts),), float(m)))


@LOSSES.register("logit_adjust")
def logit_adjust(class_counts, tau: float = 1.0, s: float = 1.0):
    """Logit-adjusted loss (Menon et al.) / balanced softmax (tau 1): CE(s * z + tau * log pi)."""
    return MarginCrossEntropy(len(class_counts), s, bias=tau * log_prior(class_counts))


def robal_margins(class_counts, m0: float, tau_m: float, s: float) -> torch.Tensor:
    """RoBal: m_y = m0 + (tau_m / s) * log(n_y / n_min)."""
    counts = _counts(class_counts)
    return m0 + (tau_m / s) * torch.log(counts / counts.min())


@LOSSES.register("robal")
def robal(class_counts, m0: float = 0.1, tau_m: float = 0.0, tau_b: float = 1.2, s: float = 10.0):
    """RoBal margin engineering: CE(s * (z - m_y e_y) + tau_b * log pi)."""
    return MarginCrossEntropy(len(class_counts), s, robal_margins(class_counts, m0, tau_m, s),
                              tau_b * log_prior(class_counts))


class FocalLoss(nn.Module):
    """Focal loss (Lin et al.). softmax form: (1 - p_y)^gamma * CE; sigmoid form: per-class binary focal
    terms summed over classes (the form of the class-balanced loss paper)."""

    def __init__(self, gamma: float = 1.0, form: str = "softmax", s: float = 1.0):
        super().__init__()
        if form not in ("softmax", "sigmoid"):
            raise ValueError(f"loss_args.form must be 'softmax' or 'sigmoid'; got '{form}'")
        self.gamma, self.form, self.scale = gamma, form, s

    def forward(self, z, y, class_weight=None):
        z = z.float() * self.scale
        if self.form == "softmax":
            log_p = F.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)
            per_sample = -((1 - log_p.exp()) ** self.gamma) * log_p
        else:
            target = F.one_hot(y, z.shape[1]).float()
            bce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
            p_t = torch.exp(-bce)
            per_sample = ((1 - p_t) ** self.gamma * bce).sum(1)
        return weighted_mean(per_sample, y, class_weight)


@LOSSES.register("focal")
def focal(class_counts, gamma: float = 1.0, form: str = "softmax", s: float = 1.0):
    return FocalLoss(gamma, form, s)


class EqualisationLoss(nn.Module):
    """TAET's hierarchical equalisation loss (HARL; Wang et al., CVPR 2025, code BuhuiOK/TAET-...):

        alpha * mean_c L_c + beta * mean_c (L_c - mean L)^2 + gamma * sum_c (L_c / sum_k L_k)^2

    L_c: the mean cross-entropy of the batch's images of class c (0 for a class absent from the batch, as in the
    reference code), taken over all C classes: a balanced loss, a penalty on its spread across classes, and a
    term that is smallest when every class carries the same share.
    """

    def __init__(self, alpha: float = 0.1, beta: float = 0.1, gamma: float = 0.1, s: float = 1.0):
        super().__init__()
        self.alpha, self.beta, self.gamma, self.scale = alpha, beta, gamma, s

    def class_losses(self, z, y, class_weight=None):
        per_sample = F.cross_entropy(z.float() * self.scale, y, reduction="none")
        if class_weight is not None:
            per_sample = per_sample * class_weight[y]
        onehot = F.one_hot(y, z.shape[1]).float()
        return (onehot * per_sample[:, None]).sum(0) / (onehot.sum(0) + 1e-10)

    def forward(self, z, y, class_weight=None):
        lc = self.class_losses(z, y, class_weight)
        mean = lc.mean()
        return (self.alpha * mean + self.beta * ((lc - mean) ** 2).mean()
                + self.gamma * ((lc / (lc.sum() + 1e-10)) ** 2).sum())


@LOSSES.register("harl")
def harl(class_counts, alpha: float = 0.1, beta: float = 0.1, gamma: float = 0.1, s: float = 1.0):
    return EqualisationLoss(alpha, beta, gamma, s)


def build(name: str, class_counts, **args):
    """A registered training loss by name for your own loop: `loss = build("robal", counts, m0=0.1, tau_b=1.2)`,
    then `loss(logits, y)` (or `loss(logits, y, class_weight)`). Names: LOSSES.names()."""
    return LOSSES.build(name, args, f"loss '{name}'", class_counts=class_counts)
