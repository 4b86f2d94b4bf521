"""TensorBoard view of a run (`train.tensorboard: true`; `pip install 'robal[tensorboard]'`).

RUN/tensorboard/ gets, per epoch (step = epoch, 1-based), the numbers the epoch's log.jsonl record holds:
train/loss, train/lr, train/clean_acc and train/adv_acc (training batches, in %), train/images_per_s; at the end
of training, the final model's clean accuracy on the test set per class (final/test_clean_acc/NN_name) and its
mean (final/test_clean_acc/balanced); `robal eval` of the run adds eval/ATTACK and eval_per_class/ATTACK/NN_name
at the checkpoint's epoch. log.jsonl and the eval JSONs stay the record of truth: this is a view of them. A
resumed run drops the events of the epochs it trains again (purge_step), as it drops their log.jsonl records.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from ..registry import ConfigError

KEY = "train.tensorboard"
EXTRA = "pip install 'robal[tensorboard]'"
DIRNAME = "tensorboard"
EPOCH_SCALARS = ("loss", "lr", "clean_acc", "adv_acc", "images_per_s")


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard() -> None:
    if not tensorboard_installed():
        raise ConfigError(f"{KEY}: true needs the tensorboard package, which is not installed: {EXTRA} (or pip "
                          f"install tensorboard), or set {KEY}: false")


def _tag(index: int, names) -> str:
    name = names[index] if names and index < len(names) else ""
    return f"{index:02d}_{name}".rstrip("_").replace(" ", "_")


class RunBoard:
    """The event writer of one run directory, opened on first use (nothing is written there before that)."""

    def __init__(self, run_dir: str | Path, start_epoch: int = 0):
        self.dir = Path(run_dir) / DIRNAME
        self.purge_step = start_epoch + 1 if start_epoch else None  # a resumed run trains these epochs again
        self._writer = None

    @classmethod
    def for_run(cls, cfg, run_dir, start_epoch: int = 0) -> RunBoard | None:
        """A board when the config asks for one (train.tensorboard), else None."""
        if not cfg.train.tensorboard or run_dir is None:
            return None
        require_tensorboard()
        return cls(run_dir, start_epoch)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir), purge_step=self.purge_step)
        return self._writer

    def epoch(self, record: dict) -> None:
        for key in EPOCH_SCALARS:
            if isinstance(record.get(key), (int, float)):
                self.writer.add_scalar(f"train/{key}", record[key], record["epoch"])
        self.writer.flush()

    @torch.no_grad()
    def final(self, model, data, epoch: int, batch_size: int, device) -> list[float]:
        """Per-class clean accuracy of the final model on the test set (the inference-time adjustments on)."""
        was_training = model.training
        model.eval()
        right = []
        for i in range(0, len(data.y_test), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(data.x_test[i:i + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float().div(255)
            right.append(model(x).argmax(1).cpu().numpy() == np.asarray(data.y_test[i:i + batch_size]))
        model.train(was_training)
        per_class = _per_class(np.concatenate(right), np.asarray(data.y_test), len(data.class_counts))
        self.scalars("final/test_clean_acc", per_class, data.class_names, epoch)
        self.close()
        return per_class

    def scalars(self, prefix: str, per_class: list[float], names, step: int) -> None:
        for c, acc in enumerate(per_class):
            if not np.isnan(acc):
                self.writer.add_scalar(f"{prefix}/{_tag(c, names)}", acc, step)
        self.writer.add_scalar(f"{prefix}/balanced", float(np.nanmean(per_class)), step)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _per_class(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    right = np.bincount(labels, weights=correct.astype(float), minlength=num_classes)
    seen = np.bincount(labels, minlength=num_classes)
    return [float(100 * r / s) if s else float("nan") for r, s in zip(right, seen)]


def log_eval(checkpoint: Path, cfg, meta: dict, result: dict, json_path: Path) -> Path | None:
    """`robal eval` of a run trained with train.tensorboard: its results join the run's TensorBoard log (step: the
    checkpoint's epoch). Returns the log folder, or None when there is no such run."""
    run_dir = Path(checkpoint).parent
    if not cfg.train.tensorboard or not (run_dir / "config.yaml").is_file():
        return None
    if not tensorboard_installed():
        print(f"warning: {run_dir} was trained with {KEY}: true, but tensorboard is not installed ({EXTRA}): the "
              f"results are in {json_path} only", file=sys.stderr)
        return None
    board = RunBoard(run_dir)
    step = int(meta.get("epoch") or 0)
    names = result.get("class_names") or meta.get("class_names")
    for attack, r in result.get("attacks", {}).items():
        board.writer.add_scalar(f"eval/{attack}", r["accuracy"], step)
        if r.get("per_class"):
            board.scalars(f"eval_per_class/{attack}", [float(a) for a in r["per_class"]], names, step)
    board.writer.add_text("eval/json", f"{json_path} (n_test {result.get('n_test')})", step)
    board.close()
    return board.dir
