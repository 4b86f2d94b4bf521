"""Long-tailed subsampling: how many images each class keeps, and which ones."""
from __future__ import annotations

import numpy as np


def _check_ratio(imbalance_ratio: float) -> None:
    if not imbalance_ratio >= 1:
        raise ValueError(f"imbalance_ratio must be n_max / n_min >= 1 (e.g. 50 for CIFAR-10-LT rho 50, "
                         f"1 for balanced); got {imbalance_ratio}")


def _exp_profile(n_max: int, num_classes: int, ratio: float) -> list[int]:
    # n_i = n_max * (1/rho)^(i / (C - 1))
    if num_classes == 1:
        return [n_max]
    return [int(n_max * (1.0 / ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]


def _step_profile(n_max: int, num_classes: int, ratio: float) -> list[int]:
    # first half keeps n_max, the rest n_max / rho
    half = num_classes // 2
    return [n_max if i < half else int(n_max / ratio) for i in range(num_classes)]


PROFILES = {"exp": _exp_profile, "step": _step_profile}


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float, profile: str = "exp") -> list[int]:
    """Images kept per class, head first. `long_tailed_counts(5000, 10, 50)` sums to 13,996."""
    _check_ratio(imbalance_ratio)
    if profile not in PROFILES:
        raise ValueError(f"unknown long-tail profile '{profile}'; known: {', '.join(PROFILES)}")
    if n_max < 1 or num_classes < 1:
        raise ValueError(f"n_max and num_classes must be positive; got {n_max}, {num_classes}")
    return PROFILES[profile](int(n_max), int(num_classes), float(imbalance_ratio))


def matched_balanced_counts(total: int, num_classes: int) -> list[int]:
    """Balanced counts with (about) a given total: 13,996 over 10 classes gives 1,400 each."""
    return [int(round(total / num_classes))] * num_classes


def subsample_indices(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """The first counts[c] images of class c after a seeded shuffle of that class, grouped by class.

    The usual recipe of the long-tailed literature (one legacy NumPy RandomState, classes in order), so
    the same images are picked as in published CIFAR-LT benchmarks.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    chosen = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if n > len(idx):
            raise ValueError(f"class {c} has {len(idx)} images, cannot keep {n}")
        rng.shuffle(idx)
        chosen.append(idx[:n])
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def stratified_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """A fixed, seeded subset with `per_class` images of every class (for AutoAttack subsets)."""
    num_classes = int(np.max(labels)) + 1
    return subsample_indices(labels, [per_class] * num_classes, seed)
