"""One training step on a copy of the model before anything is written: a config whose pieces fail only when they
meet (a loss argument of the wrong type, RGB data for a one-channel model, images too small for the backbone)
fails here, naming the piece, instead of after the run directory was created."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

from ..registry import ConfigError
from .stages import build_framework
from .weighting import WEIGHTINGS

PROBE_IMAGES = 4


def _fork_rng(device: torch.device):
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda")


def _named(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"


def try_one_batch(model, train, class_counts, x_train: np.ndarray, y_train: np.ndarray, device,
                  autocast=None) -> None:
    """Forward, loss, attack and backward of the first and last epochs' training step on PROBE_IMAGES training
    images, with a deep copy of the model and every random generator restored: the run itself is unchanged."""
    x = torch.from_numpy(np.ascontiguousarray(x_train[:PROBE_IMAGES])).permute(0, 3, 1, 2).float().div(255)
    x, y = x.to(device), torch.as_tensor(y_train[:PROBE_IMAGES], dtype=torch.long).to(device)
    probe = copy.deepcopy(model).train()
    autocast = autocast or contextlib.nullcontext
    with _fork_rng(torch.device(device)):
        try:
            with torch.no_grad(), autocast():
                z = probe(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ConfigError(f"model: the {model.spec['backbone']} backbone with the '{model.spec['head']}' head "
                              f"cannot take the training images (shape {tuple(x.shape[1:])}, channels x height x "
                              f"width; check model.backbone_args such as in_channels, and the data): "
                              f"{_named(err)}") from None
        if z.dim() != 2 or z.shape[1] != len(class_counts):
            raise ConfigError(f"model: gives logits of shape {tuple(z.shape)} for {len(class_counts)} classes")
        for epoch in sorted({0, max(int(train.epochs) - 1, 0)}):
            framework = build_framework(train, class_counts, device)
            framework.set_epoch(epoch)
            try:
                weight = WEIGHTINGS.build(train.weighting, train.weighting_args, "train.weighting_args",
                                          class_counts=class_counts, epoch=epoch)
                if weight is not None:
                    weight = weight.to(device)
                with autocast():
                    loss, _, _ = framework(probe, x, y, weight)
                probe.zero_grad(set_to_none=True)
                loss.backward()
            except ConfigError:
                raise
            except (RuntimeError, ValueError, TypeError, AttributeError, IndexError, ZeroDivisionError) as err:
                raise ConfigError(f"train: the framework '{train.framework}' with the loss '{train.loss}' fails on "
                                  f"one batch at epoch {epoch + 1} (check train.framework_args, train.loss_args, "
                                  f"train.attack and train.weighting_args): {_named(err)}") from None
