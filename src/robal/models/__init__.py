"""Models: backbone + head + inference-time adjustments, with input normalisation inside.

A model is fully described by a plain `spec` dict (saved in every checkpoint), so it can be rebuilt
without the training config.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..registry import ConfigError
from .adjust import ADJUSTMENTS
from .backbones import BACKBONES
from .heads import HEADS


# Head arguments whose default changed, with the value of every spec written before the change: a new spec names
# them (explicit_head_args), so a spec without them is an older checkpoint's and keeps its old meaning.
CHANGED_HEAD_DEFAULTS = {"lws": {"bias": True}}  # LWS leaves the FC bias out by default since issue 27


def explicit_head_args(head: str, head_args: dict) -> dict:
    """head_args for a new spec: the arguments whose default changed written out with today's default."""
    import inspect

    changed = CHANGED_HEAD_DEFAULTS.get(head, {})
    params = inspect.signature(HEADS.get(head)).parameters if changed else {}
    return {**{k: params[k].default for k in changed}, **dict(head_args)}


def spec_head_args(spec: dict) -> dict:
    return {**CHANGED_HEAD_DEFAULTS.get(spec["head"], {}), **(spec.get("head_args") or {})}


class RobustClassifier(nn.Module):
    """Maps [0, 1] NCHW images to the logits the method predicts with.

    `features(x)`: backbone output; `training_logits(x)`: what training losses see; `attack_logits(x)`: what the
    training attack maximises its loss on (the training logits except for CDT's raw-logit attack);
    `forward(x)`: head logits with the inference-time adjustments applied in order.
    """

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = copy.deepcopy(spec)
        counts = spec["class_counts"]
        self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float).view(1, -1, 1, 1))
        self.backbone = BACKBONES.build(spec["backbone"], spec.get("backbone_args"), "model.backbone_args")
        self.head = HEADS.build(spec["head"], spec_head_args(spec), "model.head_args",
                                in_features=self.backbone.feature_dim, num_classes=len(counts),
                                class_counts=counts)
        self.adjustments = nn.ModuleList(build_adjustments(spec.get("inference", []), counts))

    @property
    def num_classes(self) -> int:
        return len(self.spec["class_counts"])

    def features(self, x):
        return self.backbone((x - self.mean) / self.std)

    def training_logits(self, x):
        return self.head.training_logits(self.features(x))

    def attack_logits(self, x):
        return self.head.attack_logits(self.features(x))

    def forward(self, x):
        f = self.features(x)
        logits = self.head(f)
        for adjust in self.adjustments:
            logits = adjust(logits, f, self.head)
        return logits

    def set_inference(self, inference: list[dict]) -> None:
        """Replace the inference-time adjustments (recorded in the spec, so checkpoints carry them)."""
        self.adjustments = nn.ModuleList(build_adjustments(inference, self.spec["class_counts"])).to(self.mean.device)
        self.spec["inference"] = copy.deepcopy(inference)


def build_adjustments(inference: list[dict], class_counts) -> list[nn.Module]:
    modules = []
    for i, item in enumerate(inference):
        key = f"inference[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{key}: expected a mapping with a 'name' (one of {', '.join(ADJUSTMENTS.names())})")
        args = {k: v for k, v in item.items() if k != "name"}
        for k, v in args.items():
            if isinstance(v, float) and not math.isfinite(v) or isinstance(v, str):
                raise ConfigError(f"{key}.{k}: expected a finite number, got {v!r}")
        if item["name"] == "tde" and i != 0:
            raise ConfigError(f"{key}: 'tde' recomputes the head's logits, so it must come first")
        modules.append(ADJUSTMENTS.build(item["name"], args, key, class_counts=class_counts))
    return modules


def build_model(spec: dict) -> RobustClassifier:
    return RobustClassifier(spec)
