"""Adversarial training frameworks: how a batch becomes a loss.

Each gets the outer (long-tailed) loss and the training attack; the attack maximises its own inner loss on
the head's attack logits (the training logits, CDT's raw logits; unscaled for a cosine head unless
train.attack.loss_args sets s), with BatchNorm
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
from .budgets import EPS_BUDGETS

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


@contextlib.contextmanager
def frozen_parameters(model):
    """No parameter requires grad while the attack runs, then each its own flag back. The attack takes the input's
    gradient only: eager autograd skips the weight gradients either way, a compiled backbone (train.compile) only
    when the parameters say so (docs/performance.md)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def attack_logits(model):
    """The logits the training attack maximises its loss on: `model.attack_logits` (CDT attacks its raw logits),
    the training logits for a model without it."""
    return getattr(model, "attack_logits", model.training_logits)


@dataclass
class TrainingAttack:
    """PGD on the inner loss. With a class-wise budget (`train.attack.budget`, see budgets.py) each image gets
    the radius of its class in the current epoch (`set_epoch`), and a step size scaled in proportion."""
    eps: float
    step_size: float
    steps: int
    loss: str = "ce"
    loss_args: dict | None = None
    random_start: bool = True
    budget: str = "constant"
    budget_args: dict | None = None
    class_counts: list | None = None
    start: str = "auto"  # a START_POINTS name, or auto: the framework's (uniform; TRADES and MART: normal)

    def __post_init__(self):
        self.class_eps = None  # (C,) radii of the current epoch; None: self.eps for every image
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        args = self.budget_args or {}
        if self.budget == "constant" and not args.get("warmup_epochs"):
            self.class_eps = None
            return
        if self.class_counts is None:
            raise ValueError(f"train.attack.budget '{self.budget}' needs the training class counts")
        self.class_eps = EPS_BUDGETS.build(self.budget, args, "train.attack.budget_args",
                                           class_counts=self.class_counts, eps=self.eps, epoch=epoch).float()

    def inner_loss(self):
        return partial(ATTACK_LOSSES.get(self.loss, "train.attack.loss"), **(self.loss_args or {}))

    def radius(self, x, y):
        """(eps, step size) for the batch: scalars, or (N, 1, 1, 1) tensors from the labels' class radii."""
        if self.class_eps is None:
            return self.eps, self.step_size
        if y is None:
            raise ValueError("a class-wise training budget needs the labels: call the attack with y=")
        eps = self.class_eps.to(x.device)[y].view(-1, *([1] * (x.dim() - 1)))
        step = eps * (self.step_size / self.eps) if self.eps > 0 else torch.full_like(eps, self.step_size)
        return eps, step

    def start_for(self, framework_start: str) -> str:
        if not self.random_start:
            return "none"
        return framework_start if self.start == "auto" else self.start

    def __call__(self, model, x, target, y=None, loss_fn=None, start="uniform"):
        """PGD examples of x maximising loss_fn(logits, target) (default: train.attack.loss); `y` are the labels
        (taken from target when it holds labels), needed by a class-wise budget; `start`: the framework's start,
        used unless train.attack.start names one."""
        if y is None and not target.is_floating_point():
            y = target
        eps, step = self.radius(x, y)
        with eval_mode(model), frozen_parameters(model):
            return pgd(attack_logits(model), x, target, eps, step, self.steps, loss_fn or self.inner_loss(),
                       start=self.start_for(start))


def batch_kl(logits_adv, logits_nat):
    """KL(softmax(z_nat) || softmax(z_adv)) per sample."""
    return F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits_nat.float(), 1),
                    reduction="none").sum(1)


class Framework:
    """Returns (loss, clean training logits or None, adversarial training logits or None).

    `set_epoch(epoch)` is called by the trainer before each (0-based) epoch; epoch-dependent pieces (a
    class-wise attack budget, a loss or framework with per-epoch state) update there.
    """

    def __init__(self, loss, attack: TrainingAttack, class_counts=None):
        self.loss, self.attack, self.class_counts = loss, attack, class_counts

    def set_epoch(self, epoch: int) -> None:
        for piece in (self.attack, self.loss):
            if hasattr(piece, "set_epoch"):
                piece.set_epoch(epoch)

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


@FRAMEWORKS.register("fgsm_at")
class FGSMAT(Framework):
    """Fast adversarial training (Wong, Rice, Kolter 2020, "Fast is better than free"): one FGSM step of
    `step` x eps (1.25) on the inner loss from a uniform random start in the eps-ball, then the loss on it.

    About a third of PGD-5 AT's cost. With `beta` > 0 it adds beta * KL(softmax(z_nat) || softmax(z_adv)) (the
    TRADES term RoBal trains with; the outer loss stays on the adversarial logits). Its known failure is
    catastrophic overfitting (robust accuracy collapsing within an epoch): watch it with train.overfit_guard.
    train.attack.steps and step_size are not used; eps (and a class-wise budget) are. As in every robal framework
    the attack sees BatchNorm in eval mode (Wong et al.'s code attacks in train mode). It starts at a uniform point
    unless train.attack.start (or random_start: false) says otherwise.
    """

    def __init__(self, loss, attack, step: float = 1.25, beta: float = 0.0, class_counts=None):
        super().__init__(loss, attack, class_counts)
        if not step > 0:
            raise ValueError(f"train.framework_args.step must be > 0 (a multiple of eps, 1.25 in Wong et al.); "
                             f"got {step}")
        if beta < 0:
            raise ValueError(f"train.framework_args.beta must be >= 0; got {beta}")
        self.step, self.beta = step, beta

    def __call__(self, model, x, y, class_weight=None):
        eps, _ = self.attack.radius(x, y)
        with eval_mode(model), frozen_parameters(model):
            x_adv = pgd(attack_logits(model), x, y, eps, self.step * eps, 1, self.attack.inner_loss(),
                        start=self.attack.start_for("uniform"))
        z_adv = model.training_logits(x_adv)
        loss = self.loss(z_adv, y, class_weight)
        if self.beta == 0:
            return loss, None, z_adv
        z_nat = model.training_logits(x)
        return loss + self.beta * batch_kl(z_adv, z_nat).mean(), z_nat, z_adv


@FRAMEWORKS.register("trades")
class TRADES(Framework):
    """Zhang et al.: loss(z_on) + beta * KL(softmax(z_nat) || softmax(z_adv)).

    `outer_on: natural` is TRADES; `adversarial` puts the long-tailed loss on the adversarial logits (RoBal).
    The default attack loss is the KL itself (`train.attack.loss: kl`); RoBal attacks with CE. Unless
    train.attack.start names one, the attack starts as in each method's reference code: TRADES at
    x + 0.001 N(0, I), RoBal (outer_on adversarial, the reference's add_reg training) at a uniform point.
    """

    def __init__(self, loss, attack, beta: float = 6.0, outer_on: str = "natural", class_counts=None):
        super().__init__(loss, attack, class_counts)
        if outer_on not in ("natural", "adversarial"):
            raise ValueError(f"train.framework_args.outer_on must be natural or adversarial; got '{outer_on}'")
        self.beta, self.outer_on = beta, outer_on

    def attack_target(self, model, x, y):
        if self.attack.loss != "kl":
            return y
        with eval_mode(model), torch.no_grad():
            return F.softmax(attack_logits(model)(x).float(), 1)

    def __call__(self, model, x, y, class_weight=None):
        start = "normal" if self.outer_on == "natural" else "uniform"
        x_adv = self.attack(model, x, self.attack_target(model, x, y), y=y, start=start)
        z_nat = model.training_logits(x)
        z_adv = model.training_logits(x_adv)
        outer = self.loss(z_nat if self.outer_on == "natural" else z_adv, y, class_weight)
        return outer + self.beta * batch_kl(z_adv, z_nat).mean(), z_nat, z_adv


@FRAMEWORKS.register("mart")
class MART(Framework):
    """Wang et al.: loss(z_adv) - log(1 - max_{k!=y} p_adv,k) + beta * mean(KL(p_nat || p_adv) * (1 - p_nat,y)).
    The attack starts at x + 0.001 N(0, I) as the MART reference code, unless train.attack.start says otherwise."""

    def __init__(self, loss, attack, beta: float = 6.0, class_counts=None):
        super().__init__(loss, attack, class_counts)
        self.beta = beta

    def __call__(self, model, x, y, class_weight=None):
        x_adv = self.attack(model, x, y, start="normal")
        z_nat = model.training_logits(x)
        z_adv = model.training_logits(x_adv)
        p_adv = F.softmax(z_adv.float(), 1)
        wrong = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), 0).amax(1)
        boosted = self.loss(z_adv, y, class_weight) - torch.log(1.0001 - wrong).mean()
        p_nat_true = F.softmax(z_nat.float(), 1).gather(1, y[:, None]).squeeze(1)
        return boosted + self.beta * (batch_kl(z_adv, z_nat) * (1 - p_nat_true)).mean(), z_nat, z_adv


def reat_attack_weights(class_counts, adv_counts) -> torch.Tensor:
    """REAT's re-balanced attack weights (Li et al. 2023): w_c proportional to 1 / E_c, normalised to sum C, with
    E_c = (1 - beta_c^a_c) / (1 - beta_c), beta_c = (n_c - 1) / n_c, the effective number of the a_c adversarial
    examples predicted as class c in the previous epoch (n_c before the first)."""
    n = torch.as_tensor(class_counts, dtype=torch.float64).clamp_min(1)
    a = torch.as_tensor(adv_counts, dtype=torch.float64)
    beta = (n - 1) / n
    effective = torch.where(beta > 0, (1 - beta ** a) / (1 - beta).clamp_min(1e-12), (a > 0).double())
    w = 1 / (effective + 1e-5)
    return (w / w.sum() * len(n)).float()


def rarest_classes(class_counts, k: int | None = None) -> list[int]:
    """The k classes with the fewest training images; default k = C - (2 (C // 3) + 1), the REAT reference
    code's tail (classes 7-9 of CIFAR-10-LT, 67-99 of CIFAR-100-LT)."""
    c = len(class_counts)
    k = c - (2 * (c // 3) + 1) if k is None else k
    order = sorted(range(c), key=lambda i: (class_counts[i], -i))
    return sorted(order[:k])


def tail_alignment(features, y, is_tail, class_weight, same_sign: float = -1.0, other_sign: float = 1.0):
    """REAT's tail-feature term on the adversarial features f (N, D):

        (1 / |T|) sum_{i in T} (1 / (N D)) sum_j s_ij (w_{y_i} + w_{y_j}) KL(softmax(f_i) || softmax(f_j))

    T: the batch's images of tail classes; s_ij = same_sign when y_i = y_j, other_sign otherwise (-1 / +1 as in
    the reference code); w_c = sqrt(n / n_c); softmax(f_i) of the anchor detached. Zero without tail images.
    """
    log_q = F.log_softmax(features.float(), 1)
    log_p = log_q.detach()
    p = log_p.exp()
    kl = (p * log_p).sum(1, keepdim=True) - p @ log_q.t()                     # (N, N): KL(p_i || q_j)
    sign = torch.where(y[:, None] == y[None, :], same_sign, other_sign)
    w = class_weight.to(features.device)[y]
    per_anchor = (sign * (w[:, None] + w[None, :]) * kl).mean(1) / features.shape[1]
    anchors = is_tail.to(features.device)[y].float()
    return (per_anchor * anchors).sum() / anchors.sum().clamp_min(1)


@FRAMEWORKS.register("reat")
class REAT(Framework):
    """REAT (Li, Xu, Zhang 2023, "Adversarial training over long-tailed distribution"; code GuanlinLee/REAT):

    - attack: PGD on w_y * inner_loss, w from the effective number of last epoch's adversarial predictions per
      class (`reat_attack_weights`);
    - outer: loss(z_adv) (balanced softmax in reat.yaml) + lam * tail_alignment(f_adv) on the rarest classes.

    Note: with sign-gradient PGD and BatchNorm in eval mode a positive per-class factor on each image's loss
    leaves its adversarial example unchanged; the weights are kept, as published, for other attacks.
    The per-epoch prediction counts start again from n_c when a run is resumed.
    """

    def __init__(self, loss, attack, class_counts=None, lam: float = 1.0, tail_classes: list | None = None,
                 same_sign: float = -1.0, other_sign: float = 1.0):
        super().__init__(loss, attack, class_counts)
        if class_counts is None:
            raise ValueError("the reat framework needs the training class counts")
        c = len(class_counts)
        tail = rarest_classes(class_counts) if tail_classes is None else list(tail_classes)
        if any(not 0 <= t < c for t in tail):
            raise ValueError(f"train.framework_args.tail_classes must be class indices in [0, {c}); got {tail}")
        self.lam, self.same_sign, self.other_sign = lam, same_sign, other_sign
        self.is_tail = torch.zeros(c, dtype=torch.bool)
        self.is_tail[tail] = True
        counts = torch.as_tensor(class_counts, dtype=torch.float)
        self.pair_weight = torch.sqrt(counts.sum() / counts.clamp_min(1))          # w_c = sqrt(1 / pi_c)
        self.adv_counts = counts.clone()
        self.attack_weight = reat_attack_weights(class_counts, self.adv_counts)
        self._counting, self._epoch = None, None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if epoch == self._epoch:
            return
        if self._counting is not None:  # several ranks (torchrun): the counts of the global batches
            from ..distributed import all_reduce_sum
            all_reduce_sum(self._counting)
        if self._counting is not None and float(self._counting.sum()) > 0:
            self.adv_counts = self._counting.cpu()
        self._counting, self._epoch = None, epoch
        self.attack_weight = reat_attack_weights(self.class_counts, self.adv_counts)

    def __call__(self, model, x, y, class_weight=None):
        w = self.attack_weight.to(x.device)
        inner = self.attack.inner_loss()
        x_adv = self.attack(model, x, y, y=y, loss_fn=lambda z, t: w[t] * inner(z, t))
        f_adv = model.features(x_adv)
        z_adv = model.head.training_logits(f_adv)
        predicted = torch.bincount(z_adv.detach().argmax(1), minlength=len(w)).float()
        self._counting = predicted if self._counting is None else self._counting + predicted
        tail = tail_alignment(f_adv, y, self.is_tail, self.pair_weight, self.same_sign, self.other_sign)
        return self.loss(z_adv, y, class_weight) + self.lam * tail, None, z_adv
