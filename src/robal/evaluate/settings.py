"""The settings of an evaluation and its output files, checked before the first attack runs: each bad value is
named (a negative --n-test once evaluated 490 images, --eps nan ran, an unwritable --json failed after hours)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..registry import ConfigError

LARGE_EPS = 32 / 255  # above this on [0, 1] pixels an L-inf radius is almost surely a mistake (8 meant as 8/255)


def _key(name: str, cli: bool) -> str:
    return f"--{name.replace('_', '-')}" if cli else name


def check_subset_size(n: int | None, name: str, num_classes: int, n_available: int, cli: bool = True) -> None:
    """A stratified subset size: a positive multiple of the class count, at most the test set."""
    if n is None:
        return
    key = _key(name, cli)
    if isinstance(n, bool) or not isinstance(n, int) or n < num_classes or n % num_classes:
        raise ConfigError(f"{key} {n}: expected a positive multiple of the {num_classes} classes (the subset is "
                          f"stratified: {key}/{num_classes} images per class), e.g. {10 * num_classes}")
    if n > n_available:
        raise ConfigError(f"{key} {n}: the test set holds only {n_available} images")


def check_eval_settings(eps: float, step_size: float, batch_size: int, n_test: int | None, num_classes: int,
                        n_available: int, checks_n: int | None = None, cli: bool = True) -> list[str]:
    """Raise ConfigError naming the first bad setting; return warnings for suspicious ones."""
    if n_available == 0:
        raise ConfigError("data: the test set holds no images (x_test / y_test are empty); evaluation needs some")
    for name, value in (("eps", eps), ("step_size", step_size)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{_key(name, cli)} {value}: expected a finite number >= 0 on [0, 1] pixels, e.g. "
                              f"8/255 = {8 / 255:.4f}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{_key('batch_size', cli)} {batch_size}: expected a positive number of images per batch")
    check_subset_size(n_test, "n_test", num_classes, n_available, cli)
    if checks_n is not None and (isinstance(checks_n, bool) or not isinstance(checks_n, int) or checks_n < 1):
        raise ConfigError(f"{_key('checks_n', cli)} {checks_n}: expected a positive number of images (about "
                          f"{_key('checks_n', cli)}/{num_classes} per class, at least one)")
    warnings = []
    if eps > LARGE_EPS:
        warnings.append(f"{_key('eps', cli)} {eps:g} is above 32/255 = {LARGE_EPS:.4f} on [0, 1] pixels: an attack "
                        f"that large changes what the image shows (did you mean {eps:g}/255?)")
    return warnings


def check_output_file(path: str | Path, what: str) -> Path:
    """`path` can be written: not a directory, below a directory (or a folder to be created) we may write in.
    Nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file name, e.g. {path / 'eval.json'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: no permission to write in {parent}")
    return path


def default_eval_json(target: str | Path, checkpoint: Path) -> Path:
    """Where `robal eval TARGET` writes: RUN/eval.json for a run or its final model.pt; any other checkpoint gets
    its own name (RUN/eval_epoch_050.json), so it never replaces the run's evaluation. A zoo model has no run
    directory: it needs --json."""
    if str(target).startswith("zoo:"):
        raise ConfigError(f"robal eval {target}: give --json OUT.json (a zoo model has no run directory to write "
                          f"its evaluation into)")
    if Path(target).is_dir():
        return Path(target) / "eval.json"
    if checkpoint.name == "model.pt":
        return checkpoint.parent / "eval.json"
    return checkpoint.parent / f"eval_{checkpoint.stem}.json"
