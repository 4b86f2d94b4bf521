"""Accuracy per class and per group, worst class, and the natural / boundary error decomposition."""
from __future__ import annotations

import math

import numpy as np

# many / medium / few by training images per class (the usual bands); when a band would be empty the
# classes are split into thirds by training count instead.
BANDS = {"many": lambda n: n > 1000, "medium": lambda n: 200 <= n <= 1000, "few": lambda n: n < 200}


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    right = np.bincount(labels, weights=correct.astype(float), minlength=num_classes)
    seen = np.bincount(labels, minlength=num_classes)
    return [float(100 * r / s) if s else float("nan") for r, s in zip(right, seen)]


def class_groups(class_counts: list[int]) -> tuple[dict[str, list[int]], str]:
    """Classes of each group and the rule used ('bands >1000 / 200-1000 / <200' or 'thirds')."""
    groups = {g: [c for c, n in enumerate(class_counts) if in_band(n)] for g, in_band in BANDS.items()}
    if all(groups.values()):
        return groups, "bands: many > 1000, medium 200-1000, few < 200 training images"
    return dict(zip(BANDS, class_thirds(class_counts))), "thirds of the classes by training images"


def class_thirds(class_counts: list[int]) -> list[list[int]]:
    """The head, middle and tail thirds of the classes by training images (the tail third: the fewest)."""
    order = list(np.argsort(class_counts, kind="stable")[::-1])
    k = len(order)
    return [sorted(int(c) for c in order[round(i * k / 3):round((i + 1) * k / 3)]) for i in range(3)]


GRADIENT_ATTACKS = ("fgsm", "pgd20", "mim", "cw")


def strongest(attacks: dict, names) -> str | None:
    """The attack among `names` with the lowest accuracy in `attacks` (None when none of them ran)."""
    ran = [n for n in names if n in attacks]
    return min(ran, key=lambda n: attacks[n]["accuracy"]) if ran else None


def standard_error(accuracy_pct: float, n: int) -> float:
    p = accuracy_pct / 100
    return float(100 * math.sqrt(max(p * (1 - p), 0) / n)) if n else float("nan")


NO_COUNTS = "no training class counts given: groups left out"


def head_to_tail(class_counts: list[int] | None, num_classes: int) -> list[int]:
    """Classes from most to fewest training images (index order when the counts are not known)."""
    if class_counts is None:
        return list(range(num_classes))
    return [int(c) for c in np.argsort(class_counts, kind="stable")[::-1]]


def attack_metrics(correct: np.ndarray, clean_correct: np.ndarray, labels: np.ndarray,
                   class_counts: list[int] | None, num_classes: int | None = None) -> dict:
    """Everything reported for one attack; accuracies in percent. Without class_counts (a model robal did not
    train) the many/medium/few groups are None and `num_classes` gives the class count."""
    c = len(class_counts) if class_counts is not None else num_classes
    per_class = per_class_accuracy(correct, labels, c)
    groups = class_groups(class_counts)[0] if class_counts is not None else None
    boundary = clean_correct & ~correct  # right on the clean image, wrong under attack
    worst = int(np.nanargmin(per_class))
    accuracy = float(100 * correct.mean())
    return {
        "accuracy": accuracy,
        "std_error": standard_error(accuracy, len(labels)),
        "per_class": per_class,
        "groups": None if groups is None else {g: float(np.mean([per_class[k] for k in ks])) for g, ks in
                                                groups.items()},
        "worst_class": {"class": worst, "accuracy": per_class[worst]},
        "natural_error": float(100 * (~clean_correct).mean()),
        "boundary_error": float(100 * boundary.mean()),
        "per_class_boundary_error": per_class_accuracy(boundary, labels, c),
        "balanced_robustness": float(np.nanmean(per_class)),
    }
