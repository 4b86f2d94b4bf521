"""Data: sources, long-tailed subsets, on-device batching."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from . import folder, tiny_imagenet  # noqa: F401 (registers the folder and tiny_imagenet sources)
from .loader import CROPS, SAMPLERS, DeviceLoader
from .longtail import long_tailed_counts, matched_balanced_counts, stratified_indices, subsample_indices
from .sources import DataError, ImageDataset, ROOT_SOURCES, SOURCES, load_source


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


# DataConfig keys handed to the sources that take them (the folder sources), besides data.source_args
FOLDER_KEYS = ("train_list", "test_list", "image_size", "resize", "workers", "cache")
LOADERS = ("memory", "streaming")  # data.loader
STATS_IMAGES = 10_000  # streaming: the normalisation comes from up to this many training images, evenly spaced


def load_configured_source(cfg, lazy: bool = False) -> ImageDataset:
    """The dataset of a DataConfig: its source, read from data.root (folder sources) or data.path. With lazy=True
    a folder source's images stay files (ImageFiles) until something reads them."""
    options = dict(cfg.source_args)
    if cfg.source in SOURCES:
        params = inspect.signature(SOURCES[cfg.source]).parameters
        options.update({k: getattr(cfg, k) for k in FOLDER_KEYS if k in params and getattr(cfg, k) is not None})
        if lazy and "lazy" in params:
            options["lazy"] = True
    path = cfg.root if cfg.source in ROOT_SOURCES else cfg.path
    return load_source(cfg.source, path, cfg.download, **options)


def training_subset(cfg, ds: ImageDataset) -> np.ndarray:
    """Indices of the training images the configured subset keeps (data.subset, seeded), grouped by class."""
    available = class_counts_of(ds.y_train, ds.num_classes)
    _every_class_has_images(available, ds, "the source's training split", cfg.path or cfg.source)
    counts = SUBSETS[cfg.subset](cfg, available)
    _every_class_has_images(counts, ds, f"data.subset '{cfg.subset}' with data.imbalance_ratio "
                                        f"{cfg.imbalance_ratio:g} and data.n_max {cfg.n_max}", None)
    if any(c > a for c, a in zip(counts, available)):
        raise DataError(f"data.n_max: the subset needs {counts} images per class but {ds.name} has {available}")
    return subsample_indices(ds.y_train, counts, cfg.subset_seed)


def _every_class_has_images(counts: list[int], ds, what: str, where) -> None:
    """A class with no training image cannot be learned, and its prior log(0) breaks every balanced loss."""
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        named = ", ".join(f"class {c} ('{ds.class_names[c]}')" for c in empty[:5])
        source = f" ({where})" if where else ""
        raise DataError(f"{what}{source} leaves {named}{' and more' if len(empty) > 5 else ''} with no training "
                        f"image; every class needs at least one (lower data.imbalance_ratio, or fix the labels)")


def prepare_data(cfg) -> PreparedData:
    """Load the source, keep the configured subset per class (seeded), carve a validation split from it.

    A folder source decodes only the images kept; with `data.loader: streaming` the training images stay files
    (the validation and test images are decoded)."""
    ds = load_configured_source(cfg, lazy=True)
    keep = training_subset(cfg, ds)
    counts = class_counts_of(ds.y_train[keep], ds.num_classes)
    x, y = ds.x_train[keep], ds.y_train[keep]
    val = np.zeros(0, dtype=np.int64)
    if cfg.val_per_class:
        if cfg.val_per_class >= min(counts):
            raise DataError(f"data.val_per_class: {cfg.val_per_class} leaves no training image in the smallest "
                            f"class ({min(counts)} images)")
        val = stratified_indices(y, cfg.val_per_class, cfg.subset_seed + 1)
    train = np.setdiff1d(np.arange(len(y)), val)
    x_train, y_train = x[train], y[train]
    if cfg.loader == "memory":
        x_train = np.asarray(x_train)
    mean, std = pixel_stats(x_train)
    return PreparedData(x_train, y_train, np.asarray(x[val]), y[val], np.asarray(ds.x_test), ds.y_test,
                        class_counts_of(y_train, ds.num_classes), ds.class_names, mean, std)


def pixel_stats(x) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training pixels in [0, 1]; images that are still files (streaming) give
    them from up to STATS_IMAGES of them, evenly spaced (all of them when there are no more)."""
    if not isinstance(x, np.ndarray) and len(x) > STATS_IMAGES:
        x = x[np.linspace(0, len(x) - 1, STATS_IMAGES).round().astype(np.int64)]
    x = np.asarray(x)
    pixels = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    return pixels.mean(0).tolist(), pixels.std(0).tolist()


def build_train_loader(cfg, data: PreparedData, batch_size: int, device, sampler: str = "random", seed: int = 0,
                       channels_last: bool = False, shard: tuple[int, int] = (0, 1)):
    """The training batches of a DataConfig: crop (data.crop), flip and augmentation on the device, the images
    held there (data.loader: memory) or decoded batch by batch by data.workers processes (streaming)."""
    kwargs = dict(seed=seed, channels_last=channels_last, shard=shard, augment=cfg.augment,
                  augment_args=cfg.augment_args, crop=cfg.crop, crop_scale=cfg.crop_scale)
    if cfg.loader == "streaming":
        from .streaming import StreamingLoader

        return StreamingLoader(data.x_train, data.y_train, batch_size, device, sampler, cfg.crop_padding, cfg.flip,
                               workers=cfg.workers, **kwargs)
    return DeviceLoader(data.x_train, data.y_train, batch_size, device, sampler, cfg.crop_padding, cfg.flip,
                        **kwargs)


def validate_image_keys(d, check_files: bool = True) -> None:
    """Config checks of data.root, data.train_list / data.test_list, data.image_size, data.resize, data.workers,
    data.loader, data.cache, data.crop and data.crop_scale; a ConfigError names the key."""
    from pathlib import Path

    from ..registry import ConfigError

    def require(ok, key, message):
        if not ok:
            raise ConfigError(f"{key}: {message}")

    folder_source = d.source in ROOT_SOURCES
    readers = ", ".join(sorted(ROOT_SOURCES))
    if folder_source:
        require(d.root is not None, "data.root", f"source '{d.source}' reads a folder of images from data.root"
                + (f" (not data.path: set data.root: {d.path})" if d.path is not None else ""))
        require(d.path is None, "data.path", f"source '{d.source}' reads data.root, not data.path; remove data.path")
        if check_files and not (d.source == "tiny_imagenet" and d.download):
            require(Path(d.root).is_dir(), "data.root", f"{d.root} is not a directory")
    else:
        require(d.root is None, "data.root", f"only the {readers} sources read data.root; source '{d.source}' reads "
                                             f"data.path")
    for key in ("train_list", "test_list", "image_size", "resize"):
        require(folder_source or getattr(d, key) is None, f"data.{key}",
                f"only the {readers} sources take it; source '{d.source}' does not")
    for key in ("train_list", "test_list"):
        name = getattr(d, key)
        if check_files and name is not None and Path(d.root or ".").is_dir():
            require(Path(name).is_file() or (Path(d.root) / name).is_file(), f"data.{key}",
                    f"split file {name} not found (neither from the working directory nor in data.root {d.root})")
    require(d.image_size is None or d.image_size >= 1, "data.image_size", f"must be >= 1; got {d.image_size}")
    if d.resize is not None:
        require(d.image_size is not None, "data.resize", "needs data.image_size (the center crop after the resize)")
        require(d.resize >= d.image_size, "data.resize",
                f"the shorter side ({d.resize}) must be >= data.image_size ({d.image_size}) to center-crop it")
    require(d.workers >= 0, "data.workers", f"must be >= 0; got {d.workers}")
    require(d.loader in LOADERS, "data.loader", f"must be one of {', '.join(LOADERS)}; got '{d.loader}'")
    require(folder_source or d.cache is None, "data.cache",
            f"only the {readers} sources decode images to cache; source '{d.source}' does not")
    require(d.crop in CROPS, "data.crop", f"must be one of {', '.join(CROPS)}; got '{d.crop}'")
    require(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
            f"must be [min, max] area fractions with 0 < min <= max <= 1; got {d.crop_scale}")


__all__ = ["DataError", "DeviceLoader", "ImageDataset", "PreparedData", "SAMPLERS", "SOURCES", "SUBSETS",
           "build_train_loader", "class_counts_of", "load_configured_source", "load_source", "long_tailed_counts",
           "matched_balanced_counts", "prepare_data", "stratified_indices", "subsample_indices", "training_subset",
           "validate_image_keys"]
