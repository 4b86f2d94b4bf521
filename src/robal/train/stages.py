"""Building the training step from `train`: the framework, its loss and attack, and epoch-ranged stages.

`train.stages` switches framework and loss by epoch (TAET's cross-entropy warm-up, then its equalisation loss).
A run shorter than a stage's until_epoch ends in that stage (e.g. a 2-epoch check of taet.yaml):

    train:
      framework: pgd_at            # the main stage: every epoch after the last until_epoch
      loss: harl
      stages:
        - {until_epoch: 8, framework: plain, loss: ce}   # epochs 1..8 (1-based, like lr_milestones)

A stage names any of framework, framework_args, loss, loss_args; what it leaves out comes from `train`, except
that naming a framework (loss) without its *_args gives it no arguments. All stages share the training attack
(`train.attack`, with its budget). The trainer calls `set_epoch` before each epoch, the one mechanism for every
epoch-dependent piece (stages, class-wise budgets, REAT's per-epoch counts).
"""
from __future__ import annotations

from ..losses import LOSSES
from ..registry import ConfigError
from .frameworks import FRAMEWORKS, Framework, TrainingAttack

STAGE_KEYS = ("until_epoch", "framework", "framework_args", "loss", "loss_args")


def resolve_stage(train, stage: dict, key: str) -> dict:
    """A stage's full framework/loss settings, with what it leaves out taken from `train`."""
    from ..config import _parse

    out = {}
    for piece in ("framework", "loss"):
        own = piece in stage
        out[piece] = stage.get(piece, getattr(train, piece))
        args = stage.get(f"{piece}_args", {} if own else getattr(train, f"{piece}_args"))
        out[f"{piece}_args"] = _parse(dict, args, f"{key}.{piece}_args")
    return out


def validate_stages(train) -> None:
    """Every error names the key, e.g. `train.stages[0].until_epoch: ...`."""
    last = 0
    for i, stage in enumerate(train.stages):
        key = f"train.stages[{i}]"
        for k in stage:
            if k not in STAGE_KEYS:
                raise ConfigError(f"{key}.{k}: unknown key; a stage takes {', '.join(STAGE_KEYS)}")
        until = stage.get("until_epoch")
        if isinstance(until, bool) or not isinstance(until, int):
            raise ConfigError(f"{key}.until_epoch: expected the last (1-based) epoch of the stage, got {until!r}")
        if until <= last:
            raise ConfigError(f"{key}.until_epoch: {until} must be above the previous stage's ({last}); stages "
                              f"run in order, each up to its (1-based) until_epoch")
        last = until
        s = resolve_stage(train, stage, key)
        FRAMEWORKS.get(s["framework"], f"{key}.framework")
        LOSSES.get(s["loss"], f"{key}.loss")
        FRAMEWORKS.check_args(s["framework"], s["framework_args"], f"{key}.framework_args",
                              ("loss", "attack", "class_counts"))
        LOSSES.check_args(s["loss"], s["loss_args"], f"{key}.loss_args", ("class_counts",))


class Staged(Framework):
    """Runs stage k's framework while the (1-based) epoch is <= its until_epoch, then the main framework."""

    def __init__(self, stages: list[tuple[int, Framework]], main: Framework):
        self.stages, self.main = stages, main
        self.active = stages[0][1] if stages else main

    @property
    def loss(self):
        return self.active.loss

    @property
    def attack(self):
        return self.active.attack

    def set_epoch(self, epoch: int) -> None:
        self.active = next((fw for until, fw in self.stages if epoch + 1 <= until), self.main)
        self.active.set_epoch(epoch)

    def __call__(self, model, x, y, class_weight=None):
        return self.active(model, x, y, class_weight)


def _build_one(settings: dict, key: str, attack, class_counts, device):
    try:
        loss = LOSSES.build(settings["loss"], settings["loss_args"], f"{key}.loss_args", class_counts=class_counts)
        if device is not None:
            loss.to(device)
        return FRAMEWORKS.build(settings["framework"], settings["framework_args"], f"{key}.framework_args",
                                loss=loss, attack=attack, class_counts=list(class_counts))
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}.loss_args / {key}.framework_args: {err}") from None


def build_framework(train, class_counts, device=None) -> Framework:
    """The framework the trainer calls each batch, with `set_epoch(epoch)` to call before each epoch."""
    a = train.attack
    attack = TrainingAttack(a.eps, a.step_size, a.steps, a.loss, a.loss_args, a.random_start,
                            getattr(a, "budget", "constant"), getattr(a, "budget_args", None), list(class_counts),
                            getattr(a, "start", "auto"))
    main = _build_one({"framework": train.framework, "framework_args": train.framework_args, "loss": train.loss,
                       "loss_args": train.loss_args}, "train", attack, class_counts, device)
    stages = getattr(train, "stages", None) or []
    if not stages:
        return main
    built = [(s["until_epoch"], _build_one(resolve_stage(train, s, f"train.stages[{i}]"), f"train.stages[{i}]",
                                           attack, class_counts, device)) for i, s in enumerate(stages)]
    return Staged(built, main)
