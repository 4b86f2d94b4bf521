"""Every attack `robal eval` knows, by name, as a function giving the model's predictions under attack.

`clean`, `fgsm`, `pgd20`, `mim`, `cw` are robal's own. The AutoAttack versions run the official implementation
(PyPI `pyautoattack`), each built by one entry of `AA_VERSIONS` and labelled in the eval JSON with the settings
read back from the pyautoattack objects (`autoattack_settings`):

- `aa`: standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; 100 iterations, 5,000 Square queries);
- `aa-paper`: APGD-CE + APGD-T with the standard settings (the RoBal paper's AA column);
- `aa-10step`: the standard attacks with APGD-CE, APGD-T and FAB-T at 10 iterations and Square at 5,000 queries,
  the settings of torchattacks' AutoAttack, which later long-tailed AT papers (AT-BSL, TAET, RobustLT) report;
- `aa-plus`: the official "plus" version (APGD-CE, APGD-DLR and FAB with 5 restarts, Square, APGD-T, FAB-T);
- `aa:<a>+<b>...`: a custom list with the standard settings of each attack, e.g. `aa:apgd-ce+square`.
APGD-T and FAB-T take 9 target classes, or C - 1 when the model has fewer than 10 classes.

Every attack runs batch by batch (batches of `batch_size` test images, in order): our own attacks seed each
batch's random start by its index; AutoAttack runs once per batch with the same seed (as pyautoattack seeds each
of its own batches). A batch's predictions therefore depend on its images and index only, which makes an
evaluation resumable per batch (`resume.py`) and a torchrun evaluation equal to one process's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..attacks import EVAL_ATTACKS
from ..distributed import shard_batches

AA_ATTACKS = ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square")
AA_MAX_TARGETS = 9  # APGD-T's and FAB-T's target classes in every version (fewer when C - 1 < 9)
TEN_STEP_ITERATIONS = 10  # torchattacks' APGD, APGDT and FAB default `steps`


# ------------------------------------------------------------------------------------ AutoAttack versions

def _with_targets(adversary, num_classes: int):
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = min(AA_MAX_TARGETS, num_classes - 1)
    return adversary


def _new(model, eps, device, seed, **kwargs):
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, eps=eps, norm="Linf", device=device, seed=seed, **kwargs)
    adversary.logger.setLevel(logging.WARNING)
    return adversary


def build_standard(model, eps, device, seed, num_classes):
    return _with_targets(_new(model, eps, device, seed, version="standard"), num_classes)


def custom_builder(attacks: list[str]) -> Callable:
    """A builder running `attacks` with the standard version's settings of each (pyautoattack's custom version
    starts APGD and FAB with 5 restarts; the standard version uses 1)."""
    def build(model, eps, device, seed, num_classes):
        adversary = _new(model, eps, device, seed, version="custom", attacks=list(attacks))
        adversary.apgd.n_restarts = adversary.fab.n_restarts = 1
        return _with_targets(adversary, num_classes)
    return build


def _apgd_with_iterations(apgd, n_iter: int):
    """The same APGD attack made anew with n_iter iterations: its constructor also sets the step-size checkpoints
    (n_iter_2, n_iter_min, size_decr) from n_iter, which setting `n_iter` afterwards would leave at 100's."""
    from pyautoattack.autopgd_base import APGDAttack_targeted

    kwargs = dict(n_iter=n_iter, norm=apgd.norm, n_restarts=apgd.n_restarts, eps=apgd.eps, seed=apgd.seed,
                  eot_iter=apgd.eot_iter, rho=apgd.thr_decr, topk=apgd.topk, verbose=apgd.verbose,
                  device=apgd.device, use_largereps=apgd.use_largereps, is_tf_model=apgd.is_tf_model,
                  logger=apgd.logger)
    if isinstance(apgd, APGDAttack_targeted):
        kwargs["n_target_classes"] = apgd.n_target_classes
    else:
        kwargs["loss"] = apgd.loss
    return type(apgd)(apgd.model, **kwargs)


def build_ten_step(model, eps, device, seed, num_classes):
    """torchattacks' AutoAttack (APGD-CE, APGD-T, FAB-T with `steps=10`, Square with 5,000 queries, one restart
    each) on the official implementation: the standard version with 10 iterations."""
    adversary = build_standard(model, eps, device, seed, num_classes)
    adversary.apgd = _apgd_with_iterations(adversary.apgd, TEN_STEP_ITERATIONS)
    adversary.apgd_targeted = _apgd_with_iterations(adversary.apgd_targeted, TEN_STEP_ITERATIONS)
    adversary.fab.n_iter = TEN_STEP_ITERATIONS  # FAB reads n_iter at each step; nothing derived from it
    return adversary


def build_plus(model, eps, device, seed, num_classes):
    return _with_targets(_new(model, eps, device, seed, version="plus"), num_classes)


@dataclass(frozen=True)
class AAVersion:
    description: str
    build: Callable  # (model, eps, device, seed, num_classes) -> pyautoattack.AutoAttack, ready to run


AA_VERSIONS: dict[str, AAVersion] = {
    "aa": AAVersion("standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square)", build_standard),
    "aa-paper": AAVersion("APGD-CE + APGD-T", custom_builder(["apgd-ce", "apgd-t"])),
    "aa-10step": AAVersion("APGD-CE, APGD-T, FAB-T at 10 iterations + Square 5,000 queries "
                           "(torchattacks' AutoAttack)", build_ten_step),
    "aa-plus": AAVersion("AutoAttack+ (APGD-CE, APGD-DLR, FAB with 5 restarts, Square, APGD-T, FAB-T)", build_plus),
}


def aa_version(name: str) -> AAVersion:
    """The registered version, or for `aa:<a>+<b>...` a custom one."""
    if name in AA_VERSIONS:
        return AA_VERSIONS[name]
    attacks = name.removeprefix("aa:").split("+")
    unknown = [a for a in attacks if a not in AA_ATTACKS]
    if not name.startswith("aa:") or unknown:
        raise ValueError(f"unknown AutoAttack version '{name}'"
                         + (f" (unknown attacks {', '.join(unknown)})" if unknown else "")
                         + f"; known: {', '.join(AA_VERSIONS)}, aa:<{'|'.join(AA_ATTACKS)}>+...")
    return AAVersion(" + ".join(a.upper() for a in attacks), custom_builder(attacks))


def is_autoattack(name: str) -> bool:
    return name in AA_VERSIONS or name.startswith("aa:")


def is_known_attack(name: str) -> bool:
    if name.startswith("aa:"):
        return all(a in AA_ATTACKS for a in name.removeprefix("aa:").split("+"))
    return name == "clean" or name in AA_VERSIONS or name in EVAL_ATTACKS


def known_attacks() -> list[str]:
    return ["clean", *EVAL_ATTACKS.names(), *AA_VERSIONS, "aa:<" + "|".join(AA_ATTACKS) + ">+..."]


def build_autoattack(name: str, model, eps: float, device, seed: int, num_classes: int):
    """A fresh pyautoattack.AutoAttack for the named version (fresh for every batch: running FAB-T sets
    `fab.n_restarts = 1` on the object, which a later FAB in the plus version would inherit)."""
    return aa_version(name).build(AutoAttackAdapter(model), eps, device, seed, num_classes)


def _apgd_settings(apgd) -> dict:
    return {"n_iter": apgd.n_iter, "n_restarts": apgd.n_restarts, "loss": apgd.loss, "eot_iter": apgd.eot_iter,
            "rho": apgd.thr_decr, "step_checkpoints": [apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr]}


def autoattack_settings(name: str, eps: float, seed: int, num_classes: int) -> dict:
    """The exact settings of the named version, read back from the pyautoattack objects it builds: version,
    attacks in order, eps, seed, and per attack its iterations, restarts, target classes or queries."""
    from importlib.metadata import version

    adversary = build_autoattack(name, torch.nn.Identity(), eps, "cpu", seed, num_classes)
    apgd, apgd_t, fab, square = adversary.apgd, adversary.apgd_targeted, adversary.fab, adversary.square
    per_attack = {
        "apgd-ce": {**_apgd_settings(apgd), "loss": "ce"},  # the loss each run sets on the shared APGD object
        "apgd-dlr": {**_apgd_settings(apgd), "loss": "dlr"},
        "apgd-t": {**_apgd_settings(apgd_t), "n_target_classes": apgd_t.n_target_classes},
        "fab": {"n_iter": fab.n_iter, "n_restarts": fab.n_restarts, "targeted": False},
        # pyautoattack's run loop sets fab.n_restarts = 1 on the shared FAB object before FAB-T
        "fab-t": {"n_iter": fab.n_iter, "n_restarts": 1, "n_target_classes": fab.n_target_classes,
                  "targeted": True},
        "square": {"n_queries": square.n_queries, "n_restarts": square.n_restarts, "p_init": square.p_init},
    }
    attacks = list(adversary.attacks_to_run)
    return {"name": name, "description": aa_version(name).description, "version": adversary.version,
            "attacks": attacks, "norm": adversary.norm, "eps": adversary.epsilon, "seed": adversary.seed,
            "per_attack": {a: per_attack[a] for a in attacks},
            "batches": "each batch of the evaluation's batch_size run separately, with this seed",
            "implementation": f"pyautoattack {version('pyautoattack')}"}


def settings_summary(settings: dict) -> str:
    """One line, e.g. `standard: apgd-ce 100 it, apgd-t 100 it x 9 targets, fab-t 100 it x 9 targets, square
    5000 queries`."""
    parts = []
    for attack in settings["attacks"]:
        s = settings["per_attack"][attack]
        text = f"{attack} {s['n_queries']} queries" if "n_queries" in s else f"{attack} {s['n_iter']} it"
        if s.get("n_restarts", 1) > 1:
            text += f" x {s['n_restarts']} restarts"
        if "n_target_classes" in s:
            text += f" x {s['n_target_classes']} targets"
        parts.append(text)
    return f"{settings['version']}: " + ", ".join(parts)


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


# ------------------------------------------------------------------------------------ predictions

@torch.inference_mode()
def predict(model, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([torch.zeros(0, dtype=torch.long)] +
                     [model(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


@torch.inference_mode()
def output_classes(model, x: torch.Tensor, device) -> int:
    """The number of logits the model gives (one forward pass on one image)."""
    return int(model(x[:1].to(device)).shape[1])


def batch_seed(seed: int, batch: int) -> int:
    """The random-start seed of batch `batch` (batch 0: `seed` itself): a batch's attack depends on its images and
    index only, not on which process ran the batches before it."""
    return seed + 1_000_003 * batch


def batch_predictions(name, model, xb, yb, batch, eps, step_size, device, seed=0, num_classes=None) -> torch.Tensor:
    """Predictions on one batch (index `batch`) of test images under the named attack."""
    if name == "clean":
        return predict(model, xb, len(xb), device)
    xb, yb = xb.to(device), yb.to(device)
    if is_autoattack(name):
        torch.manual_seed(seed)
        num_classes = num_classes or output_classes(model, xb, device)
        adversary = build_autoattack(name, model, eps, device, seed, num_classes)
        # NCHW-contiguous images: pyautoattack's gradient buffers take their layout (to_images's are channels_last)
        _, y_adv = adversary.run_standard_evaluation(xb.contiguous(), yb, batch_size=len(xb))
        return y_adv.cpu()
    attack = EVAL_ATTACKS.get(name, "--attacks")
    torch.manual_seed(batch_seed(seed, batch))
    x_adv = attack(model, xb, yb, eps, step_size)
    with torch.inference_mode():
        return model(x_adv).argmax(1).cpu()


def attack_predictions(name, model, x, y, eps, step_size, batch_size, device, seed=0, shard=(0, 1), store=None,
                       num_classes=None):
    """Predictions of `model` on x under the named attack (for `clean`, on x itself), batch by batch.

    shard=(rank, world): only the batches of `batch_size` that this rank handles (r, r + world, ...), their
    predictions concatenated in order (`robal.distributed.gather_shards` puts every rank's back together, equal
    to one process's). store: an `EvalState` (resume.py): batches it holds are read from it, the others computed
    and stored as soon as each is done.
    """
    if not is_known_attack(name):
        EVAL_ATTACKS.get(name, "--attacks")  # raises, naming the known attacks
    if is_autoattack(name) and num_classes is None and len(x):
        num_classes = output_classes(model, x, device)
    preds = [torch.zeros(0, dtype=torch.long)]
    for b in shard_batches(len(x), batch_size, shard):
        xb, yb = x[b * batch_size:(b + 1) * batch_size], y[b * batch_size:(b + 1) * batch_size]
        stored = store.load(name, b, len(xb)) if store is not None else None
        if stored is None:
            start = time.perf_counter()
            stored = batch_predictions(name, model, xb, yb, b, eps, step_size, device, seed, num_classes)
            if store is not None:
                store.save(name, b, stored, time.perf_counter() - start)
        preds.append(stored)
    return torch.cat(preds)
