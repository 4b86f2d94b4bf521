"""Data: sources, long-tailed subsets, on-device batching."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .loader import SAMPLERS, DeviceLoader
from .longtail import long_tailed_counts, matched_balanced_counts, stratified_indices, subsample_indices
from .sources import DataError, ImageDataset, SOURCES, load_source


def _long_tailed(cfg, available: list[int]) -> list[int]:
    n_max = cfg.n_max if cfg.n_max is not None else min(available)
    return long_tailed_counts(n_max, len(available), cfg.imbalance_ratio, cfg.profile)


def _matched_balanced(cfg, available: list[int]) -> list[int]:
    """Balanced, with the same total as the long-tailed set of these settings (13,996 -> 1,400 each)."""
    return matched_balanced_counts(sum(_long_tailed(cfg, available)), len(available))


def _full(cfg, available: list[int]) -> list[int]:
    return list(available)


# data.subset: how many training images each class keeps
SUBSETS = {"long_tailed": _long_tailed, "matched_balanced": _matched_balanced, "full": _full}


@dataclass
class PreparedData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_counts: list[int]      # training images per class, after the validation split
    class_names: list[str]
    mean: list[float]
    std: list[float]


def class_counts_of(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


def prepare_data(cfg) -> PreparedData:
    """Load the source, keep the configured subset per class (seeded), carve a validation split from it."""
    ds = load_source(cfg.source, cfg.path, cfg.download, **cfg.source_args)
    available = class_counts_of(ds.y_train, ds.num_classes)
    counts = SUBSETS[cfg.subset](cfg, available)
    if any(c > a for c, a in zip(counts, available)):
        raise DataError(f"data.n_max: the subset needs {counts} images per class but {ds.name} has {available}")
    keep = subsample_indices(ds.y_train, counts, cfg.subset_seed)
    x, y = ds.x_train[keep], ds.y_train[keep]
    val = np.zeros(0, dtype=np.int64)
    if cfg.val_per_class:
        if cfg.val_per_class >= min(counts):
            raise DataError(f"data.val_per_class: {cfg.val_per_class} leaves no training image in the smallest "
                            f"class ({min(counts)} images)")
        val = stratified_indices(y, cfg.val_per_class, cfg.subset_seed + 1)
    train = np.setdiff1d(np.arange(len(y)), val)
    x_train, y_train = x[train], y[train]
    pixels = x_train.reshape(-1, x_train.shape[-1]).astype(np.float64) / 255.0
    return PreparedData(x_train, y_train, x[val], y[val], ds.x_test, ds.y_test,
                        class_counts_of(y_train, ds.num_classes), ds.class_names,
                        pixels.mean(0).tolist(), pixels.std(0).tolist())


__all__ = ["DataError", "DeviceLoader", "ImageDataset", "PreparedData", "SAMPLERS", "SOURCES", "SUBSETS",
           "class_counts_of", "load_source", "long_tailed_counts", "matched_balanced_counts", "prepare_data",
           "stratified_indices", "subsample_indices"]
