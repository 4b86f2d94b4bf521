"""`robal split CONFIG --out FILE`: the training images a config chooses, written as a split file.

The file holds one `relative/path label` line per image of the configured subset (`data.subset`, e.g. the
seeded long-tailed subset, before `data.val_per_class` is carved from it), paths relative to `data.root`, in
class order then path order, after `#` comment lines saying where it came from. Trained with
`data.train_list: FILE` and `data.subset: full`, the same images form the training set, so a split can be
shared and kept fixed across papers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import class_counts_of, load_configured_source, training_subset
from .folder import write_split_file
from .sources import DataError


def write_training_split(cfg, out: str | Path, config_name: str = "") -> tuple[Path, list[int]]:
    """Write the training split of DataConfig `cfg` to `out`; returns the path and the images per class."""
    ds = load_configured_source(cfg, lazy=True)  # only the file names and labels are needed
    if ds.train_files is None:
        raise DataError(f"data.source: '{cfg.source}' holds arrays, not image files; a split file lists the images "
                        f"of a folder dataset (data.source: folder or tiny_imagenet)")
    keep = training_subset(cfg, ds)
    keep = keep[np.lexsort(([ds.train_files[i] for i in keep], ds.y_train[keep]))]  # class, then path
    counts = class_counts_of(ds.y_train[keep], ds.num_classes)
    header = (f"robal split of {config_name or 'a config'}: source {cfg.source}, root {ds.root}\n"
              f"subset {cfg.subset}, imbalance_ratio {cfg.imbalance_ratio}, profile {cfg.profile}, "
              f"n_max {cfg.n_max}, subset_seed {cfg.subset_seed}: {len(keep)} images\n"
              f"use with data.train_list: THIS_FILE and data.subset: full\n"
              f"classes (label name): " + ", ".join(f"{i} {n}" for i, n in enumerate(ds.class_names)))
    path = write_split_file(out, [ds.train_files[i] for i in keep], ds.y_train[keep], header)
    return path, counts
