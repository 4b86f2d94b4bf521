"""The catastrophic-overfitting guard (`train.overfit_guard`), for fast adversarial training above all.

FGSM-based training can lose its robustness within one epoch: the model learns to defeat the single step, and
PGD accuracy falls to near zero while FGSM accuracy climbs (Wong et al. 2020). The guard measures PGD accuracy
on a fixed held-out batch after every epoch and calls it a collapse when it falls more than `drop` points below
the best so far. Then, by `action`:

    log      warn and record it in log.jsonl (`guard_collapse: true`); training goes on
    stop     record it and stop the run with an error; the checkpoints written before it are kept
    restore  record it, load the weights of the last good checkpoint (train.checkpoint_every: 1 keeps it one
             epoch back) and end the run with them as model.pt: Wong et al.'s early stopping
    off      (default) no guard

The held-out batch is the validation split (data.val_per_class) when there is one, else `images` training
images chosen by a seeded draw, as Wong et al.'s training minibatch. The attack: PGD-`steps` at the training eps
(train.attack.eps), step eps/4, a random start, cross-entropy on the model's predicted logits, BatchNorm in eval
mode; its random start comes from its own seed, so the guard changes nothing in training's random stream and
every rank of a torchrun job reaches the same verdict. Every epoch's accuracy is logged (`guard_pgd_acc`); a
resumed run takes the best so far from its log.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..attacks.gradient import ce_loss, pgd
from ..registry import ConfigError, did_you_mean
from .frameworks import eval_mode

ACTIONS = ("off", "log", "stop", "restore")


@dataclass(frozen=True)
class GuardSettings:
    action: str = "off"
    images: int = 256        # held-out batch size when there is no validation split
    drop: float = 20.0       # a collapse: PGD accuracy this many points below the best so far
    steps: int = 10
    seed: int = 0


def guard_settings(args: dict) -> GuardSettings:
    """train.overfit_guard as settings; a ConfigError names the key."""
    key = "train.overfit_guard"
    names = [f.name for f in fields(GuardSettings)]
    for k in args:
        if k not in names:
            raise ConfigError(f"{key}.{k}: unknown key{did_you_mean(k, names)}; allowed: {', '.join(names)}")
    s = GuardSettings(**args)
    checks = [(s.action in ACTIONS, "action", f"must be one of {', '.join(ACTIONS)}; got {s.action!r}"),
              (isinstance(s.images, int) and s.images >= 1, "images", f"must be an integer >= 1; got {s.images!r}"),
              (isinstance(s.drop, (int, float)) and 0 < s.drop <= 100, "drop",
               f"must be accuracy points in (0, 100]; got {s.drop!r}"),
              (isinstance(s.steps, int) and s.steps >= 1, "steps", f"must be an integer >= 1; got {s.steps!r}"),
              (isinstance(s.seed, int) and s.seed >= 0, "seed", f"must be an integer >= 0; got {s.seed!r}")]
    for ok, name, message in checks:
        if not ok:
            raise ConfigError(f"{key}.{name}: {message}")
    return s


class OverfitGuard:
    def __init__(self, settings: GuardSettings, x: np.ndarray, y: np.ndarray, eps: float, device,
                 out: Path | None = None, main: bool = True):
        self.s, self.eps, self.out, self.main = settings, eps, out, main
        self.x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div(255).to(device)
        self.y = torch.as_tensor(y, dtype=torch.long).to(device)
        self.best, self.best_epoch = None, None
        self.read_history = out is not None

    @classmethod
    def build(cls, cfg, data, device, out=None, main: bool = True) -> "OverfitGuard | None":
        """The guard of a config (None when train.overfit_guard.action is off)."""
        settings = guard_settings(cfg.train.overfit_guard)
        if settings.action == "off":
            return None
        if len(data.y_val):
            x, y = data.x_val, data.y_val
        else:
            pick = np.sort(np.random.default_rng(settings.seed).permutation(len(data.y_train))[:settings.images])
            x, y = np.asarray(data.x_train[pick]), data.y_train[pick]
        return cls(settings, x, y, cfg.train.attack.eps, device, Path(out) if out is not None else None, main)

    def pgd_accuracy(self, model) -> float:
        """PGD accuracy (percent) on the held-out batch, with the guard's own random start."""
        devices = [self.x.device] if self.x.device.type == "cuda" else []
        with eval_mode(model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.s.seed)
            x_adv = pgd(model, self.x, self.y, self.eps, self.eps / 4, self.s.steps, ce_loss, random_start=True)
            with torch.no_grad():
                return 100.0 * (model(x_adv).argmax(1) == self.y).float().mean().item()

    def _history(self, epoch: int) -> None:
        """A resumed run: the best accuracy of its logged epochs before this one."""
        self.read_history = False
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            acc = record.get("guard_pgd_acc")
            if acc is not None and not record.get("guard_collapse") and record.get("epoch", epoch + 1) <= epoch:
                if self.best is None or acc > self.best:
                    self.best, self.best_epoch = acc, record["epoch"]

    def after_epoch(self, model, epoch: int, record: dict) -> bool:
        """Measure, add `guard_pgd_acc` (and on a collapse `guard_collapse`) to the epoch's record; True when the
        run must end here with the restored weights (action restore). Raises on a collapse with action stop."""
        if self.read_history:
            self._history(epoch)
        acc = self.pgd_accuracy(model)
        record["guard_pgd_acc"] = round(acc, 2)
        if self.best is None or acc >= self.best - self.s.drop:
            if self.best is None or acc > self.best:
                self.best, self.best_epoch = acc, epoch + 1
            return False
        record["guard_collapse"] = True
        message = (f"catastrophic overfitting at epoch {epoch + 1}: PGD-{self.s.steps} accuracy on the held-out batch "
                   f"({len(self.y)} images, eps {self.eps:.4g}) fell to {acc:.1f}% from {self.best:.1f}% at epoch "
                   f"{self.best_epoch} (train.overfit_guard.drop: {self.s.drop:g} points)")
        if self.main:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        if self.s.action == "log":
            return False
        return self._end(model, record, message)

    def _end(self, model, record: dict, message: str) -> bool:
        from .. import distributed
        from .checkpoint import checkpoint_paths, latest_good_checkpoint
        from .trainer import TrainingDiverged

        found = distributed.main_first(latest_good_checkpoint, self.out) if self.out is not None else None
        if self.s.action == "restore" and found is not None:
            path, ckpt = found
            model.load_state_dict(ckpt["state_dict"])
            record["guard_restored"] = int(ckpt["meta"]["epoch"])
            self._log(record)
            if self.main:
                print(f"restored the weights of {path} (epoch {record['guard_restored']}); the run ends with them "
                      f"(train.overfit_guard.action: restore)", file=sys.stderr, flush=True)
            return True
        self._log(record)
        kept = checkpoint_paths(self.out) if self.out is not None else []
        why = ("no checkpoint to restore yet" if self.s.action == "restore" else "train.overfit_guard.action: stop")
        raise TrainingDiverged(f"{message}; the run stops ({why}); "
                               + (f"the last good checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint was "
                                  "written yet"))

    def _log(self, record: dict) -> None:
        """The collapsed epoch's record: the trainer does not reach its own log line for it."""
        if self.main and self.out is not None:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
