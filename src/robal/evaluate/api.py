"""Evaluate any model: `robal.evaluate(model, data, ...)` and `robal eval --model module:factory --data ...`.

`model` is any `torch.nn.Module` or callable from [0, 1] NCHW float images to logits (no robal head, spec or
`num_classes` needed); `data` is a robal config (path or object), an `.npz` path, `(x_test, y_test)` as uint8 HWC
arrays or float NCHW images in [0, 1], or a torch `Dataset` of (image, label). The result is the structure that
`robal eval --json` writes, with the same per-class, group, boundary-error and reliability-check entries.
"""
from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..registry import ConfigError


@dataclass
class EvalData:
    x_test: np.ndarray | torch.Tensor   # uint8 N x H x W x C, or float N x C x H x W in [0, 1]
    y_test: np.ndarray                  # int64 labels
    class_counts: list[int] | None      # training images per class, when known
    class_names: list[str] | None
    description: str


class OutsideModel(torch.nn.Module):
    """A user's model or callable as robal's attacks see it: NCHW-contiguous float images in (whatever layout an
    attack works in), float logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.contiguous()).float()

    def train(self, mode: bool = True):
        super().train(mode)
        if not isinstance(self.model, torch.nn.Module):  # a plain callable has no modes
            return self
        self.model.train(mode)
        return self


# ---------------------------------------------------------------- data in any form

def _from_config(cfg, description: str) -> EvalData:
    from ..data import prepare_data

    data = prepare_data(cfg.data)
    return EvalData(data.x_test, data.y_test, list(data.class_counts), list(data.class_names), description)


def _from_path(path: Path) -> EvalData:
    from ..config import load_config
    from ..data import load_source

    if path.suffix == ".npz":
        ds = load_source("npz", str(path))
        return EvalData(ds.x_test, ds.y_test, None, list(ds.class_names), f"{path} (x_test, y_test)")
    if path.suffix in (".yaml", ".yml") or not path.exists():
        return _from_config(load_config(path), f"{path} (data section)")
    raise ConfigError(f"data {path}: expected a robal config (.yaml) or an .npz with x_test and y_test")


def _from_arrays(x, y, description: str) -> EvalData:
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1 or y.dtype.kind not in "iu" or (y.size and y.min() < 0):
        raise ConfigError(f"data: y_test has dtype {y.dtype} and shape {y.shape}; expected 1-D labels >= 0")
    floating = (isinstance(x, torch.Tensor) and x.is_floating_point()) or (isinstance(x, np.ndarray)
                                                                          and x.dtype.kind == "f")
    if floating:
        x = torch.as_tensor(x).float().cpu()
        if x.ndim != 4 or len(x) != len(y):
            raise ConfigError(f"data: float images of shape {tuple(x.shape)} for {len(y)} labels; expected "
                              f"N x C x H x W in [0, 1] with N = {len(y)}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ConfigError(f"data: float images span [{x.min():.3g}, {x.max():.3g}]; expected [0, 1] (robal "
                              f"attacks in pixel space; put any normalisation inside the model)")
    else:
        x = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y):
            raise ConfigError(f"data: images of dtype {x.dtype} and shape {x.shape} for {len(y)} labels; expected "
                              f"uint8 N x H x W x C (the .npz layout) or float N x C x H x W in [0, 1]")
        x = x[..., None] if x.ndim == 3 else x
    return EvalData(x, y.astype(np.int64), None, None, description)


def _from_dataset(dataset) -> EvalData:
    images, labels = [], []
    for i in range(len(dataset)):
        image, label = dataset[i]
        images.append(torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image))
        labels.append(int(label))
    if not images:
        raise ConfigError("data: the Dataset is empty")
    x = torch.stack(images)
    if not x.is_floating_point():
        x = x.float().div(255).permute(0, 3, 1, 2) if x.ndim == 4 and x.shape[-1] in (1, 3) else x.float()
    return _from_arrays(x, np.asarray(labels, dtype=np.int64), f"{type(dataset).__name__} of {len(labels)} items")


def eval_data(data) -> EvalData:
    """Any of the `data` forms `evaluate` takes, as test images and labels (and training counts when known)."""
    from ..config import Config

    if isinstance(data, EvalData):
        return data
    if isinstance(data, (str, Path)):
        return _from_path(Path(data))
    if isinstance(data, Config):
        return _from_config(data, f"config '{data.name}'")
    if isinstance(data, tuple) and len(data) == 2:
        return _from_arrays(*data, "(x_test, y_test) arrays")
    if isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return _from_dataset(data)
    raise ConfigError(f"data: got a {type(data).__name__}; expected a config path or Config, an .npz path, "
                      f"(x_test, y_test) or a torch Dataset")


# ---------------------------------------------------------------- the model

def checked_logits(model, x: torch.Tensor, num_classes: int, device) -> int:
    """One forward pass on two images: logits must be (2, C) with C >= the labels' classes; returns C."""
    with torch.no_grad():
        try:
            z = model(x[:2].to(device))
        except Exception as err:  # the user's code: whatever it raises, name it
            raise ConfigError(f"model: fails on a batch of shape {tuple(x[:2].shape)} (N x C x H x W, [0, 1]): "
                              f"{type(err).__name__}: {err}") from None
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or len(z) != len(x[:2]):
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ConfigError(f"model: returned {shape} for {len(x[:2])} images; expected logits of shape "
                          f"({len(x[:2])}, number of classes)")
    if z.shape[1] < num_classes:
        raise ConfigError(f"model: gives {z.shape[1]} logits per image but the test labels span {num_classes} "
                          f"classes")
    return int(z.shape[1])


def model_from_factory(spec: str, args: dict | None = None):
    """`package.module:factory` called with `args`; its return value must be an nn.Module (or a callable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--model {spec!r}: expected package.module:factory, e.g. mypkg.models:load_model")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # as `python -m`: modules of the working directory
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"--model {spec}: cannot import module '{module_name}' ({err}); is it installed or on "
                          f"PYTHONPATH?") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"--model {spec}: module '{module_name}' has no attribute '{attr}'")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"--model {spec}: '{attr}' is not callable")
    try:
        model = factory(**(args or {}))
    except TypeError as err:
        raise ConfigError(f"--model-args {args}: {spec} does not take them ({err})") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"--model {spec}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_class_counts(text: str | None) -> list[int] | None:
    """`--class-counts 5000,3237,...` or a .json / .yaml file holding that list."""
    if text is None:
        return None
    path = Path(text)
    try:
        values = yaml.safe_load(path.read_text()) if path.is_file() else [v for v in text.split(",") if v.strip()]
        counts = [int(v) for v in values]
    except (TypeError, ValueError, yaml.YAMLError):
        counts = []
    if not counts or min(counts) < 0:
        raise ConfigError(f"--class-counts {text!r}: expected comma-separated training images per class (e.g. "
                          f"5000,3237,2096) or a file holding that list")
    return counts


# ---------------------------------------------------------------- one call

def evaluate(model, data, attacks=("clean", "pgd20", "aa-paper"), class_counts=None, n_test=None, eps=8 / 255,
             step_size=None, batch_size=256, device=None, checks="basic", checks_n=200, seed=0, state_dir=None,
             progress=False) -> dict:
    """Evaluate `model` on `data` under `attacks`; the structure `robal eval --json` writes (accuracies in %).

    class_counts: training images per class, for the many/medium/few groups (taken from `data` when it is a robal
    config; without them the groups are left out and `groups_rule` says so). step_size: of PGD-20 / MIM / CW
    (default eps / 4, which is 2/255 at eps 8/255). state_dir: make the evaluation resumable (a rerun with the
    same arguments continues where a killed one stopped); the state is removed when the result is returned.
    """
    from .attacks import is_known_attack, known_attacks
    from .checks import run_checks
    from .resume import clear_state
    from .runner import evaluate_model, to_images
    from .settings import check_eval_settings

    for a in attacks:
        if not is_known_attack(a):
            raise ConfigError(f"attacks: unknown attack '{a}'; known: {', '.join(known_attacks())}")
    if checks not in ("none", "basic", "full"):
        raise ConfigError(f"checks: expected none, basic or full; got {checks!r}")
    d = eval_data(data)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    step_size = eps / 4 if step_size is None else step_size
    num_labels = int(d.y_test.max()) + 1 if len(d.y_test) else 0
    for warning in check_eval_settings(eps, step_size, batch_size, n_test, max(num_labels, 1), len(d.y_test),
                                       checks_n, cli=False):
        print(f"warning: {warning}")
    wrapped = model if _is_robal_model(model) else OutsideModel(model)
    wrapped.eval()
    num_classes = checked_logits(wrapped, to_images(d.x_test[:2]), num_labels, device)  # named errors first
    counts = class_counts if class_counts is not None else d.class_counts
    if counts is not None and len(counts) != num_classes:
        raise ConfigError(f"class_counts: {len(counts)} classes, but the model gives {num_classes} logits")
    result = evaluate_model(wrapped, d.x_test, d.y_test, list(attacks), eps, step_size, counts, batch_size, device,
                            n_test, seed, progress=progress, state_dir=state_dir)
    result.update({"data": d.description, "class_names": d.class_names, "model": _model_name(model)})
    result["checks"] = run_checks(wrapped, d.x_test, d.y_test, result, checks, checks_n, batch_size, device)
    result["checks_level"] = checks
    if state_dir is not None:
        clear_state(state_dir)
    return result


def write_report(result: dict, out_dir: str | Path, name: str = "eval") -> list[Path]:
    """OUT_DIR/NAME.json, NAME.md and the plots of an `evaluate` result; the paths written."""
    from .report import write_eval_outputs

    out = Path(out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return [out, *write_eval_outputs(result, out)]


def _is_robal_model(model) -> bool:
    from ..models import RobustClassifier

    return isinstance(model, RobustClassifier)


def _model_name(model) -> str:
    inner = model.model if isinstance(model, OutsideModel) else model
    return type(inner).__name__ if isinstance(inner, torch.nn.Module) else getattr(inner, "__name__", "callable")
