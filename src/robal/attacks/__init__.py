"""Attacks for evaluation, by the names `robal eval --attacks` takes."""
from __future__ import annotations

from functools import partial

from ..registry import Registry
from .gradient import ATTACK_LOSSES, ce_loss, cw_loss, fgsm, kl_loss, pgd, project

# Each entry: (forward, x, y, eps, step_size) -> adversarial x. Defaults follow DESIGN.md section 1.
EVAL_ATTACKS = Registry("attack")


@EVAL_ATTACKS.register("fgsm")
def fgsm_attack(forward, x, y, eps, step_size):
    return fgsm(forward, x, y, eps)


@EVAL_ATTACKS.register("pgd20")
def pgd20_attack(forward, x, y, eps, step_size):
    return pgd(forward, x, y, eps, step_size, 20)


@EVAL_ATTACKS.register("mim")
def mim_attack(forward, x, y, eps, step_size):
    return pgd(forward, x, y, eps, step_size, 20, momentum=1.0)


@EVAL_ATTACKS.register("cw")
def cw_attack(forward, x, y, eps, step_size):
    return pgd(forward, x, y, eps, step_size, 20, loss_fn=partial(cw_loss, kappa=50.0))


__all__ = ["ATTACK_LOSSES", "EVAL_ATTACKS", "ce_loss", "cw_loss", "kl_loss", "fgsm", "pgd", "project"]
