"""Adversarial training frameworks: how a batch becomes a loss.

Each gets the outer (long-tailed) loss and the training attack; the attack maximises its own inner loss on
the head's training logits (unscaled for a cosine head unless train.attack.loss_args sets s), with BatchNorm
in eval mode (as in the TRADES and RoBal reference code).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..attacks.gradient import ATTACK_LOSSES, pgd
from ..registry import Registry

FRAMEWORKS = Registry("framework")


@contextlib.contextmanager
def eval_mode(model):
    """The whole model in eval mode, then every module's own mode back: a frozen backbone (fine-tuning keeps
    it in eval mode) stays frozen, where `model.train(was_training)` would switch its BatchNorm back on."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class TrainingAttack:
    eps: float
    step_size: float
    steps: int
    loss: str = "ce"
    loss_args: dict | None = None
    random_start: bool = True

    def __call__(self, model, x, target):
        loss_fn = partial(ATTACK_LOSSES.get(self.loss, "train.attack.loss"), **(self.loss_args or {}))
        with eval_mode(model):
            return pgd(model.training_logits, x, target, self.eps, self.step_size, self.steps, loss_fn,
                       self.random_start)


def batch_kl(logits_adv, logits_nat):
    """KL(softmax(z_nat) || softmax(z_adv)) per sample."""
    return F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits_nat.float(), 1),
                    reduction="none").sum(1)


class Framework:
    """Returns (loss, clean training logits or None, adversarial training logits or None)."""

    def __init__(self, loss, attack: TrainingAttack):
        self.loss, self.attack = loss, attack

    def __call__(self, model, x, y, class_weight=None):
        raise NotImplementedError


@FRAMEWORKS.register("plain")
class Plain(Framework):
    """Standard (non-adversarial) training: the loss on clean images."""

    def __call__(self, model, x, y, class_weight=None):
        z = model.training_logits(x)
        return self.loss(z, y, class_weight), z, None


@FRAMEWORKS.register("pgd_at")
class PGDAT(Framework):
    """Madry et al.: the loss on PGD examples of the inner loss."""

    def __call__(self, model, x, y, class_weight=None):
        x_adv = self.attack(model, x, y)
        z_adv = model.training_logits(x_adv)
        return self.loss(z_adv, y, class_weight), None, z_adv


@FRAMEWORKS.register("trades")
class TRADES(Framework):
    """Zhang et al.: loss(z_on) + beta * KL(softmax(z_nat) || softmax(z_adv)).

    `outer_on: natural` is TRADES; `adversarial` puts the long-tailed loss on the adversarial logits (RoBal).
    The default attack loss is the KL itself (`train.attack.loss: kl`); RoBal attacks with CE.
    """

    def __init__(self, loss, attack, beta: float = 6.0, outer_on: str = "natural"):
        super().__init__(loss, attack)
        if outer_on not in ("natural", "adversarial"):
            raise ValueError(f"train.framework_args.outer_on must be natural or adversarial; got '{outer_on}'")
        self.beta, self.outer_on = beta, outer_on

    def attack_target(self, model, x, y):
        if self.attack.loss != "kl":
            return y
        with eval_mode(model), torch.no_grad():
            return F.softmax(model.training_logits(x).float(), 1)

    def __call__(self, model, x, y, class_weight=None):
        x_adv = self.attack(model, x, self.attack_target(model, x, y))
        z_nat = model.training_logits(x)
        z_adv = model.training_logits(x_adv)
        outer = self.loss(z_nat if self.outer_on == "natural" else z_adv, y, class_weight)
        return outer + self.beta * batch_kl(z_adv, z_nat).mean(), z_nat, z_adv


@FRAMEWORKS.register("mart")
class MART(Framework):
    """Wang et al.: loss(z_adv) - log(1 - max_{k!=y} p_adv,k) + beta * mean(KL(p_nat || p_adv) * (1 - p_nat,y))."""

    def __init__(self, loss, attack, beta: float = 6.0):
        super().__init__(loss, attack)
        self.beta = beta

    def __call__(self, model, x, y, class_weight=None):
        x_adv = self.attack(model, x, y)
        z_nat = model.training_logits(x)
        z_adv = model.training_logits(x_adv)
        p_adv = F.softmax(z_adv.float(), 1)
        wrong = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), 0).amax(1)
        boosted = self.loss(z_adv, y, class_weight) - torch.log(1.0001 - wrong).mean()
        p_nat_true = F.softmax(z_nat.float(), 1).gather(1, y[:, None]).squeeze(1)
        return boosted + self.beta * (batch_kl(z_adv, z_nat) * (1 - p_nat_true)).mean(), z_nat, z_adv
