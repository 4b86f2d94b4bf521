"""Every attack `robal eval` knows, by name, as a function giving the model's predictions under attack.

`clean`, `fgsm`, `pgd20`, `mim`, `cw` are robal's own; `aa` (standard AutoAttack: APGD-CE, APGD-T, FAB-T,
Square), `aa-paper` (APGD-CE + APGD-T, the paper's AA column) and `aa:<a>+<b>...` (a custom list, e.g.
`aa:apgd-ce+square`) run the official implementation (PyPI `pyautoattack`).
"""
from __future__ import annotations

import logging

import torch

from ..attacks import EVAL_ATTACKS

AA_VERSIONS = {"aa": None, "aa-paper": ["apgd-ce", "apgd-t"]}
AA_ATTACKS = ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square")


def aa_attack_list(name: str) -> list[str] | None:
    """The custom attack list of an AutoAttack name (None means the standard version)."""
    if name in AA_VERSIONS:
        return AA_VERSIONS[name]
    return name.removeprefix("aa:").split("+")


def is_autoattack(name: str) -> bool:
    return name in AA_VERSIONS or name.startswith("aa:")


def is_known_attack(name: str) -> bool:
    if name.startswith("aa:"):
        return all(a in AA_ATTACKS for a in aa_attack_list(name))
    return name == "clean" or name in AA_VERSIONS or name in EVAL_ATTACKS


def known_attacks() -> list[str]:
    return ["clean", *EVAL_ATTACKS.names(), *AA_VERSIONS, "aa:<" + "|".join(AA_ATTACKS) + ">+..."]


@torch.inference_mode()
def predict(model, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def gradient_attack_predictions(name, model, x, y, eps, step_size, batch_size, device):
    attack = EVAL_ATTACKS.get(name, "--attacks")
    preds = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        x_adv = attack(model, xb, yb, eps, step_size)
        with torch.inference_mode():
            preds.append(model(x_adv).argmax(1).cpu())
    return torch.cat(preds)


def autoattack_predictions(name, model, x, y, eps, batch_size, device, seed=0):
    from pyautoattack import AutoAttack

    attacks = aa_attack_list(name)
    version = "standard" if attacks is None else "custom"
    adversary = AutoAttack(model, eps=eps, norm="Linf", version=version, attacks=attacks, device=device, seed=seed)
    n_target = min(9, model.num_classes - 1)
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = n_target
    if attacks is not None:  # a custom list keeps the standard version's settings of each attack
        adversary.apgd.n_restarts = adversary.fab.n_restarts = 1
    adversary.logger.setLevel(logging.WARNING)
    _, y_adv = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
    return y_adv.cpu()


def attack_predictions(name, model, x, y, eps, step_size, batch_size, device, seed=0):
    """Predictions of `model` on x under the named attack (for `clean`, on x itself)."""
    torch.manual_seed(seed)
    if name == "clean":
        return predict(model, x, batch_size, device)
    if is_autoattack(name):
        return autoattack_predictions(name, model, x, y, eps, batch_size, device, seed)
    return gradient_attack_predictions(name, model, x, y, eps, step_size, batch_size, device)
