"""Reliability checks: signs that an evaluation overestimates robustness (gradient masking, fake gains).

Each check gives `{"name", "status": "pass" | "warn" | "fail", "detail": sentence, "values": {...}, "seconds"}`.
`fake_gain` reads the attacks the evaluation already ran; the others attack a small fixed stratified subset of
the test set (`n_images`, default 200, seeded like the evaluation subset), each attack from the same seed, so
they stay cheap and compare like with like. Levels: `basic` runs every check below except `black_box`; `full`
adds `black_box`, a 1,000-query Square attack on the subset (its own run, because AutoAttack reports only its
combined result, never Square's alone).

A difference between two attacks on the same images counts only when it exceeds both its threshold in points
and its noise, twice the paired standard error of the difference (`paired_noise`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks import pgd
from ..data import stratified_indices
from .attacks import is_autoattack
from .metrics import GRADIENT_ATTACKS, strongest
from .runner import to_images

# Thresholds in points of accuracy (warn, fail). Paper Table 1: honest methods lose 1-2 points from PGD-20 to
# AA; the rescaling methods lose 5.5 (CB re-weighting), 6.8 (tau-norm) and 10.8 (CDT-post).
FAKE_GAIN = (2.0, 5.0)        # strongest gradient attack minus AutoAttack
RISE = (1.0, 5.0)             # accuracy rising with more PGD steps or a larger eps
BLACK_BOX = (2.0, 5.0)        # PGD-20 minus Square
LOGIT_FACTOR = 10.0           # eval / train logit scale, either way: warn
ZERO_GRAD = (10.0, 50.0)      # % of clean-correct images whose CE input gradient is exactly zero
LARGE_EPS, LARGE_EPS_ACC = 0.5, (2.0, 10.0)   # PGD-20 at eps 0.5 must leave at most 2% (warn above, fail > 10)
PGD_STEPS = (5, 10, 20, 50)
SQUARE_QUERIES = 1000


@dataclass
class CheckContext:
    """What checks look at: the model, the checks subset, the evaluation so far; attack results are cached."""
    model: torch.nn.Module
    x: torch.Tensor               # checks subset, [0, 1] NCHW, on the CPU
    y: torch.Tensor
    result: dict                  # the evaluation JSON so far (attacks, labels, eps, train_logit_scale, ...)
    batch_size: int = 500
    device: str | torch.device = "cpu"
    cache: dict = field(default_factory=dict)

    @property
    def eps(self) -> float:
        return self.result["eps"]

    @property
    def seed(self) -> int:
        return self.result.get("test_indices_seed", 0)

    def batches(self):
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i:i + self.batch_size].to(self.device), self.y[i:i + self.batch_size].to(self.device)

    def correct_under(self, key, attack: Callable) -> np.ndarray:
        """Per-image correctness under attack(x, y) -> x_adv on the subset, seeded, cached by key."""
        if key not in self.cache:
            torch.manual_seed(self.seed)
            right = []
            for xb, yb in self.batches():
                x_adv = attack(xb, yb)
                with torch.inference_mode():
                    right.append((self.model(x_adv).argmax(1) == yb).cpu())
            self.cache[key] = torch.cat(right).numpy()
        return self.cache[key]

    def pgd_correct(self, steps: int, eps: float | None = None) -> np.ndarray:
        """PGD on CE with the evaluation's step size, scaled with eps (so 20 steps reach the same share of it)."""
        eps = self.eps if eps is None else eps
        step = self.result["step_size"] * eps / self.eps
        return self.correct_under(("pgd", steps, eps), lambda x, y: pgd(self.model, x, y, eps, step, steps))

    def square_correct(self) -> np.ndarray:
        from pyautoattack.square import SquareAttack

        square = SquareAttack(self.model, p_init=0.8, n_queries=SQUARE_QUERIES, eps=self.eps, norm="Linf",
                              n_restarts=1, seed=self.seed, verbose=False, device=self.device, resc_schedule=False)
        return self.correct_under("square", square.perturb)

    def clean_pass(self) -> dict:
        """Clean correctness, mean per-image logit std and whether each CE input gradient is exactly zero."""
        if "clean" not in self.cache:
            right, stds, zero = [], [], []
            for xb, yb in self.batches():
                xb = xb.clone().requires_grad_(True)
                logits = self.model(xb).float()
                grad, = torch.autograd.grad(F.cross_entropy(logits, yb, reduction="sum"), xb)
                right.append((logits.argmax(1) == yb).cpu())
                stds.append(logits.detach().std(1).cpu())
                zero.append((grad.flatten(1).abs().amax(1) == 0).cpu())
            self.cache["clean"] = {"correct": torch.cat(right).numpy(), "logit_std": float(torch.cat(stds).mean()),
                                   "zero_grad": torch.cat(zero).numpy()}
        return self.cache["clean"]


@dataclass
class Check:
    fn: Callable[[CheckContext], dict]
    level: str


CHECKS: dict[str, Check] = {}
LEVELS = {"none": (), "basic": ("basic",), "full": ("basic", "full")}


def check(name: str, level: str = "basic"):
    def add(fn):
        CHECKS[name] = Check(fn, level)
        return fn
    return add


def verdict(status: str, detail: str, **values) -> dict:
    return {"status": status, "detail": detail, "values": values}


def pct(correct: np.ndarray) -> float:
    return float(100 * correct.mean()) if len(correct) else float("nan")


def paired_noise(a: np.ndarray, b: np.ndarray) -> float:
    """Twice the standard error, in points, of the accuracy difference of two attacks on the same images."""
    d = a.astype(float) - b.astype(float)
    return float(200 * d.std() / math.sqrt(len(d))) if len(d) else 0.0


def grade(excess: float, noise: float, thresholds: tuple[float, float]) -> str:
    warn_at, fail_at = thresholds
    if excess > max(fail_at, noise):
        return "fail"
    return "warn" if excess > max(warn_at, noise) else "pass"


# ---------------------------------------------------------------- the checks

@check("fake_gain")
def fake_gain(ctx: CheckContext) -> dict:
    """The strongest gradient attack that ran must not be beaten by AutoAttack by more than the noise."""
    attacks = ctx.result["attacks"]
    aa = strongest(attacks, [a for a in attacks if is_autoattack(a)])
    grad = strongest(attacks, GRADIENT_ATTACKS)
    if aa is None:
        return verdict("warn", "not checked: no AutoAttack variant ran (add aa or aa-paper to --attacks); "
                               "gradient attacks alone can be fooled by gradient masking")
    if grad is None:
        return verdict("pass", f"no gradient attack ran to compare with; {aa} is the robust accuracy")
    labels = np.asarray(ctx.result["labels"])
    g, a = (np.asarray(attacks[n]["predictions"]) == labels for n in (grad, aa))
    gap, noise = pct(g) - pct(a), paired_noise(g, a)
    status = grade(gap, noise, FAKE_GAIN)
    verdict_text = {"pass": "consistent", "warn": "PGD-style numbers overestimate robustness here",
                    "fail": "a fake gain: gradient masking inflates the gradient attacks"}[status]
    return verdict(status, f"{grad} {pct(g):.2f}% vs {aa} {pct(a):.2f}%: AutoAttack is {gap:.2f} points lower "
                           f"(noise {noise:.2f}); {verdict_text}", gradient_attack=grad, autoattack=aa,
                   gap=gap, noise=noise)


@check("logit_scale")
def logit_scale(ctx: CheckContext) -> dict:
    """Logits far larger (or smaller) at evaluation than in training saturate the softmax attacks rely on."""
    scale, train = ctx.clean_pass()["logit_std"], ctx.result.get("train_logit_scale")
    if not train or not math.isfinite(train):
        return verdict("pass", f"logit std at evaluation {scale:.3g}; no training value recorded to compare",
                       eval_scale=scale, train_scale=train)
    factor = max(scale / train, train / scale) if scale > 0 else math.inf
    status = "warn" if factor > LOGIT_FACTOR else "pass"
    return verdict(status, f"logit std {scale:.3g} at evaluation vs {train:.3g} in training (x{factor:.3g}); "
                           + ("rescaled logits can mask gradients" if status == "warn"
                              else f"within the x{LOGIT_FACTOR:g} this check allows"),
                   eval_scale=scale, train_scale=train, factor=factor)


@check("zero_gradients")
def zero_gradients(ctx: CheckContext) -> dict:
    """Share of correctly classified clean images whose CE input gradient vanishes exactly (saturated softmax)."""
    clean = ctx.clean_pass()
    n = int(clean["correct"].sum())
    share = float(100 * clean["zero_grad"][clean["correct"]].mean()) if n else 0.0
    warn_at, fail_at = ZERO_GRAD
    status = "fail" if share > fail_at else "warn" if share > warn_at else "pass"
    return verdict(status, f"{share:.1f}% of the {n} correctly classified clean images have an exactly zero CE "
                           f"input gradient" + ("" if status == "pass" else "; gradient attacks cannot move them"),
                   share=share, n=n)


def rise_verdict(what: str, labels: list[str], corrects: list[np.ndarray]) -> dict:
    """Accuracy must not rise from an earlier (weaker) attack to a later (stronger) one beyond the noise."""
    accs = [pct(c) for c in corrects]
    pairs = [(i, j) for i in range(len(accs)) for j in range(i + 1, len(accs))]
    i, j = max(pairs, key=lambda p: accs[p[1]] - accs[p[0]])
    rise, noise = accs[j] - accs[i], paired_noise(corrects[j], corrects[i])
    status = grade(rise, noise, RISE)
    curve = ", ".join(f"{label} {a:.1f}%" for label, a in zip(labels, accs))
    tail = "" if status == "pass" else f"; accuracy rises by {rise:.2f} points from {labels[i]} to {labels[j]}"
    return verdict(status, f"PGD accuracy vs {what} on {len(corrects[0])} images: {curve} (noise {noise:.2f}){tail}",
                   labels=labels, accuracy=accs, rise=rise, noise=noise)


@check("more_steps")
def more_steps(ctx: CheckContext) -> dict:
    out = rise_verdict("steps", [f"PGD-{s}" for s in PGD_STEPS], [ctx.pgd_correct(s) for s in PGD_STEPS])
    out["values"]["steps"] = list(PGD_STEPS)
    return out


@check("larger_eps")
def larger_eps(ctx: CheckContext) -> dict:
    eps = [ctx.eps, 2 * ctx.eps]
    out = rise_verdict("eps", [f"eps {e:.4g}" for e in eps], [ctx.pgd_correct(20, e) for e in eps])
    out["values"]["eps"] = eps
    return out


@check("large_eps_to_zero")
def large_eps_to_zero(ctx: CheckContext) -> dict:
    """At eps 0.5 any image can be turned into another class: PGD must reach about 0% accuracy."""
    acc = pct(ctx.pgd_correct(20, LARGE_EPS))
    warn_at, fail_at = LARGE_EPS_ACC
    status = "fail" if acc > fail_at else "warn" if acc > warn_at else "pass"
    return verdict(status, f"PGD-20 at eps {LARGE_EPS} leaves {acc:.1f}% accuracy on {len(ctx.y)} images"
                           + ("" if status == "pass" else f" (expected <= {warn_at:g}%): the attack is blocked"),
                   eps=LARGE_EPS, accuracy=acc)


@check("black_box", level="full")
def black_box(ctx: CheckContext) -> dict:
    """A gradient-free attack must not beat white-box PGD-20 (if it does, the gradients are masked)."""
    p, s = ctx.pgd_correct(20), ctx.square_correct()
    gap, noise = pct(p) - pct(s), paired_noise(p, s)
    status = grade(gap, noise, BLACK_BOX)
    return verdict(status, f"Square ({SQUARE_QUERIES} queries) {pct(s):.1f}% vs PGD-20 {pct(p):.1f}% on {len(p)} "
                           f"images (noise {noise:.2f})" + ("" if status == "pass" else
                                                            "; the black-box attack is stronger: masked gradients"),
                   square=pct(s), pgd20=pct(p), gap=gap, noise=noise, queries=SQUARE_QUERIES)


# ---------------------------------------------------------------- running them

def checks_subset(y_test: np.ndarray, n_images: int, seed: int = 0) -> np.ndarray:
    """A fixed stratified subset of about n_images (n_images // C per class, at least one)."""
    per_class = max(1, n_images // (int(y_test.max()) + 1))
    return np.sort(stratified_indices(y_test, per_class, seed))


def run_checks(model, x_test: np.ndarray, y_test: np.ndarray, result: dict, level: str = "basic",
               n_images: int = 200, batch_size: int = 500, device="cpu") -> list[dict]:
    """The checks of `level` ('none', 'basic', 'full') on an evaluation `result` of `model`."""
    names = [n for n, c in CHECKS.items() if c.level in LEVELS[level]]
    if not names:
        return []
    idx = checks_subset(y_test, n_images, result.get("test_indices_seed", 0))
    ctx = CheckContext(model.eval(), to_images(x_test[idx]), torch.as_tensor(y_test[idx], dtype=torch.long),
                       result, batch_size, device)
    out = []
    for name in names:
        start = time.perf_counter()
        out.append({"name": name, **CHECKS[name].fn(ctx), "seconds": round(time.perf_counter() - start, 2)})
    return out


def format_checks(checks: list[dict]) -> str:
    return "\n".join(f"[{c['status'].upper():>4}] {c['name']}: {c['detail']}" for c in checks)
