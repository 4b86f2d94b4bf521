"""L-inf gradient attacks, batched and device-agnostic: FGSM, PGD (with restarts), MIM, CW-inf.

One routine, `pgd`, does the work; the named attacks are settings of it. `loss_fn(logits, target)` returns
per-sample losses to maximise, so training reuses the same code with its own inner loss (CE, TRADES' KL, ...).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..registry import Registry

ATTACK_LOSSES = Registry("attack loss")


@ATTACK_LOSSES.register("ce")
def ce_loss(logits, target, s: float = 1.0):
    """Cross-entropy of s * logits. A cosine head's training attack chooses s: 1 attacks the unscaled
    cosines (RoBal), the loss's s attacks the scaled logits the model predicts with."""
    return F.cross_entropy(s * logits.float(), target, reduction="none")


@ATTACK_LOSSES.register("cw")
def cw_loss(logits, target, kappa: float = 50.0):
    """CW margin: max_{k != y} z_k - z_y, clamped at kappa (Carlini & Wagner's f6, L-inf via PGD)."""
    logits = logits.float()
    true = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(other - true, max=kappa)


@ATTACK_LOSSES.register("kl")
def kl_loss(logits, target_probs):
    """TRADES' inner loss: KL(p_clean || p_adv); the target is the clean softmax."""
    return F.kl_div(F.log_softmax(logits.float(), 1), target_probs, reduction="none").sum(1)


def project(x_adv, x, eps):
    """Into the eps-ball around x and the [0, 1] image box."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


START_POINTS = Registry("attack start")


@START_POINTS.register("uniform")
def uniform_start(x, eps):
    """A uniform point of the eps-ball (Madry et al.)."""
    if torch.is_tensor(eps):  # per-image radii
        return x + (torch.rand_like(x) * 2 - 1) * eps
    return x + torch.empty_like(x).uniform_(-eps, eps)


@START_POINTS.register("normal")
def normal_start(x, eps, std: float = 0.001):
    """x + 0.001 N(0, I), the start of the TRADES and MART reference code."""
    return x + std * torch.randn_like(x)


@START_POINTS.register("none")
def no_start(x, eps):
    return x.clone()


def pgd(forward: Callable, x: torch.Tensor, target: torch.Tensor, eps: float, step_size: float, steps: int,
        loss_fn: Callable = ce_loss, random_start: bool = True, restarts: int = 1, momentum: float = 0.0,
        start: str | None = None):
    """Projected gradient ascent of `loss_fn` in the L-inf eps-ball (momentum > 0 gives MIM).

    The start: `start` names one of START_POINTS; without it a uniform point of the ball (`random_start`) or x.
    With several restarts each sample keeps the restart with the highest final loss. No host syncs inside.
    eps and step_size may be tensors broadcasting against x, e.g. (N, 1, 1, 1): one radius per image.
    """
    x = x.detach()
    if steps == 0 or (not torch.is_tensor(eps) and eps == 0):
        return x.clone()
    begin = START_POINTS.get(start or ("uniform" if random_start else "none"), "attack start")
    best, best_loss = x.clone(), None
    for _ in range(restarts):
        x_adv = project(begin(x, eps), x, eps)
        grad_avg = torch.zeros_like(x) if momentum > 0 else None
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(forward(x_adv), target)
            grad, = torch.autograd.grad(loss.sum(), x_adv)
            if momentum > 0:  # MIM: accumulate L1-normalised gradients
                grad = grad_avg.mul_(momentum).add_(grad / grad.abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-12))
            x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            final = loss_fn(forward(x_adv), target)
            if best_loss is None:
                best, best_loss = x_adv, final
            else:
                better = final > best_loss
                best = torch.where(better[:, None, None, None], x_adv, best)
                best_loss = torch.where(better, final, best_loss)
    return best


def fgsm(forward, x, target, eps, loss_fn=ce_loss):
    return pgd(forward, x, target, eps, eps, 1, loss_fn, random_start=False)
