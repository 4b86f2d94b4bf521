"""Every attack `robal eval` knows, by name, as a function giving the model's predictions under attack.

`clean`, `fgsm`, `pgd20`, `mim`, `cw` are robal's own; `aa` (standard AutoAttack: APGD-CE, APGD-T, FAB-T,
Square), `aa-paper` (APGD-CE + APGD-T, the paper's AA column) and `aa:<a>+<b>...` (a custom list, e.g.
`aa:apgd-ce+square`) run the official implementation (PyPI `pyautoattack`).
"""
from __future__ import annotations

import logging

import torch

from ..attacks import EVAL_ATTACKS
from ..distributed import shard_batches, shard_indices

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
    return torch.cat([torch.zeros(0, dtype=torch.long)] +
                     [model(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def batch_seed(seed: int, batch: int) -> int:
    """The random-start seed of batch `batch` (batch 0: `seed` itself): a batch's attack depends on its images and
    index only, not on which process ran the batches before it."""
    return seed + 1_000_003 * batch


def gradient_attack_predictions(name, model, x, y, eps, step_size, batch_size, device, seed=0, shard=(0, 1)):
    attack = EVAL_ATTACKS.get(name, "--attacks")
    preds = [torch.zeros(0, dtype=torch.long)]
    for b in shard_batches(len(x), batch_size, shard):
        i = b * batch_size
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        torch.manual_seed(batch_seed(seed, b))
        x_adv = attack(model, xb, yb, eps, step_size)
        with torch.inference_mode():
            preds.append(model(x_adv).argmax(1).cpu())
    return torch.cat(preds)


class _NCHWGradient(torch.autograd.Function):
    """Identity whose backward hands back an NCHW-contiguous gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class AutoAttackAdapter(torch.nn.Module):
    """The model as pyautoattack gets it: NCHW images in, NCHW input gradients out (pyautoattack reshapes them
    with .view), while the convolutions run channels_last as in robal's own attacks (1.27x on CPU,
    docs/performance.md)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        x = _NCHWGradient.apply(x)
        return self.model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


def autoattack_predictions(name, model, x, y, eps, batch_size, device, seed=0):
    from pyautoattack import AutoAttack

    attacks = aa_attack_list(name)
    version = "standard" if attacks is None else "custom"
    adversary = AutoAttack(AutoAttackAdapter(model), eps=eps, norm="Linf", version=version, attacks=attacks,
                           device=device, seed=seed)
    n_target = min(9, model.num_classes - 1)
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = n_target
    if attacks is not None:  # a custom list keeps the standard version's settings of each attack
        adversary.apgd.n_restarts = adversary.fab.n_restarts = 1
    adversary.logger.setLevel(logging.WARNING)
    # NCHW-contiguous images: pyautoattack's gradient buffers take their layout (to_images's are channels_last)
    _, y_adv = adversary.run_standard_evaluation(x.to(device).contiguous(), y.to(device), batch_size=batch_size)
    return y_adv.cpu()


def attack_predictions(name, model, x, y, eps, step_size, batch_size, device, seed=0, shard=(0, 1)):
    """Predictions of `model` on x under the named attack (for `clean`, on x itself).

    shard=(rank, world): only the batches of `batch_size` that this rank handles (r, r + world, ...), their
    predictions concatenated in order (`robal.distributed.gather_shards` puts every rank's back together). Our
    own attacks seed each batch's random start by its index, so the gathered predictions equal one process's;
    AutoAttack runs on the rank's images as one set (its per-batch random draws differ from one process's).
    """
    if name != "clean" and not is_autoattack(name):
        return gradient_attack_predictions(name, model, x, y, eps, step_size, batch_size, device, seed, shard)
    idx = shard_indices(len(x), batch_size, shard) if shard[1] > 1 else slice(None)
    x, y = x[idx], y[idx]
    torch.manual_seed(seed)
    if name == "clean":
        return predict(model, x, batch_size, device)
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long)
    return autoattack_predictions(name, model, x, y, eps, batch_size, device, seed)
