"""Typed, validated configuration. Every error names the key path; nothing runs before validation passes."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .registry import ConfigError, did_you_mean

EPS_8 = 8 / 255
STEP_2 = 2 / 255


@dataclass
class DataConfig:
    source: str = "npz"                  # cifar10 | cifar100 | npz | digits | folder | tiny_imagenet
    path: str | None = None              # relative paths are taken from the working directory
    root: str | None = None              # folder | tiny_imagenet: the dataset's folder (data/folder.py)
    train_list: str | None = None        # split files of `relative/path label` lines, relative to data.root
    test_list: str | None = None
    image_size: int | None = None        # folder sources: shorter side to data.resize, center crop S x S
    resize: int | None = None            # default: image_size
    workers: int = 0                     # folder sources: processes decoding the images (0: this one)
    loader: str = "memory"               # memory (uint8 tensor on the device) | streaming (data/streaming.py)
    cache: str | None = None             # folder sources: a folder keeping the decoded images (decode once)
    crop: str = "pad"                    # training crop: pad (data.crop_padding) | random_resized
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random_resized: area fractions
    download: bool = False
    source_args: dict = field(default_factory=dict)
    subset: str = "long_tailed"          # long_tailed | matched_balanced | full
    imbalance_ratio: float = 50.0        # n_max / n_min
    profile: str = "exp"                 # exp | step
    n_max: int | None = None             # default: the smallest class size of the training split
    subset_seed: int = 0
    val_per_class: int = 0               # held out from the long-tailed training set (tune-tau)
    crop_padding: int = 4
    flip: bool = True
    augment: str = "crop_flip"           # crop_flip | randaugment | autoaugment (before the crop and flip)
    augment_args: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    backbone: str = "preact_resnet18"
    backbone_args: dict = field(default_factory=dict)
    head: str = "linear"
    head_args: dict = field(default_factory=dict)


@dataclass
class AttackConfig:
    eps: float = EPS_8
    step_size: float = STEP_2
    steps: int = 5
    loss: str = "ce"
    loss_args: dict = field(default_factory=dict)
    random_start: bool = True
    start: str = "auto"                  # auto (the method's reference: normal for TRADES and MART, else
                                         # uniform) | uniform | normal | none
    budget: str = "constant"             # constant | power (class-wise eps): radius per class and epoch
    budget_args: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    framework: str = "pgd_at"            # plain | pgd_at | trades | mart
    framework_args: dict = field(default_factory=dict)
    loss: str = "ce"
    loss_args: dict = field(default_factory=dict)
    attack: AttackConfig = field(default_factory=AttackConfig)
    sampler: str = "random"              # random | class_balanced
    weighting: str = "none"              # none | effective_number (DRW when start_epoch > 0)
    weighting_args: dict = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    lr_milestones: list[int] = field(default_factory=lambda: [15, 18])
    lr_gamma: float = 0.1
    init_from: str | None = None         # start from this checkpoint (fine-tuning)
    reset_head: bool = False             # with init_from: keep the head freshly initialised (cRT)
    trainable: str = "all"               # all | head | class_scale
    frozen_bn: bool = False              # trainable head/class_scale: BatchNorm in eval mode (True) or, as the
                                         # reference fine-tunes, normalising with batch statistics (False)
    checkpoint_every: int = 5
    keep_last: int = 2
    amp: str = "off"                     # off (fp32, every device) | bf16 (opt-in) | auto (= off; older configs)
    channels_last: bool = True
    compile: bool = False                # torch.compile the backbone (opt-in; docs/performance.md)
    stats_every: int = 10                # clean batch accuracy measured every N batches (costs a forward)
    skip_nonfinite: int = 0              # skip up to N batches with a non-finite loss (no step); stop beyond N
    sync_bn: bool = False                # several ranks (torchrun): BatchNorm on the global batch's statistics
    stages: list[dict] = field(default_factory=list)  # [{until_epoch, framework, loss, ...}] before the main one
    overfit_guard: dict = field(default_factory=dict)  # {action: off|log|stop|restore, ...} (train/guard.py)
    tensorboard: bool = False            # RUN/tensorboard/ event files (robal[tensorboard]; train/tensorboard_log.py)

    def __post_init__(self):
        if self.amp == "auto":  # the old default (bf16 on CUDA) now means fp32, so a run started with it resumes
            self.amp = "off"


@dataclass
class EvalConfig:
    eps: float = EPS_8
    step_size: float = STEP_2
    attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20"])
    n_test: int | None = None
    batch_size: int = 500
    seed: int = 0


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N | mps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: list[dict] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- parsing with key paths

def _parse_float(value, key):
    if isinstance(value, str) and "/" in value:  # "8/255"
        num, _, den = value.partition("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            pass
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number (or a fraction like '8/255'), got {value!r}")
    return float(value)


def _parse(tp, value, key):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _parse(options[0], value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_parse(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        return _parse_float(value, key)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: (_parse_float(v, f"{key}.{k}") if isinstance(v, str) and "/" in v else v) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp}")


def from_dict(cls, data, key: str = ""):
    if data is None:
        data = {}
    where = key or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(f"{_join(key, k)}: unknown key{did_you_mean(k, names)}; allowed: {', '.join(names)}")
    return cls(**{k: _parse(hints[k], v, _join(key, k)) for k, v in data.items()})


def _join(key, k):
    return f"{key}.{k}" if key else str(k)


def set_override(data: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.epochs=2")
    path, _, raw = assignment.partition("=")
    parts = path.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {path}: '{part}' is not a mapping")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {path}: {raw!r} is not a YAML value ({str(err).splitlines()[0]}); e.g. "
                          f"--set {path}=[1, 2] or --set {path}=0.1") from None


def deep_merge(base: dict, update: dict) -> dict:
    """Nested update; a `*_args` mapping belongs to one piece, so it replaces the base's instead of merging."""
    merged = dict(base)
    for k, v in update.items():
        nested = isinstance(v, dict) and isinstance(merged.get(k), dict) and not str(k).endswith("_args")
        merged[k] = deep_merge(merged[k], v) if nested else v
    return merged


def read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A config file as a dict; `base: other.yaml` (relative to this file) is read first and updated by it."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as "
                          f"UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    return deep_merge(read_yaml(path.parent / base, seen + (path.resolve(),)), data)


PACKAGED_CONFIGS = Path(__file__).parent / "configs"  # the repository's configs/ links here


def resolve_config(path: str | Path) -> Path:
    """The config file `path` names: the file itself when it exists, else the config of that name packaged with
    robal (`cifar10_lt/robal_n`, with or without `.yaml`, or `configs/cifar10_lt/robal_n.yaml`)."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.as_posix().removeprefix("configs/")
    if not given.is_absolute() and ".." not in given.parts:
        for candidate in (name, name + ".yaml"):
            if (PACKAGED_CONFIGS / candidate).is_file():
                return PACKAGED_CONFIGS / candidate
    known = sorted(q.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix()
                   for q in PACKAGED_CONFIGS.rglob("*.yaml"))
    folder = Path(name).parent.as_posix()
    nearby = [k for k in known if Path(k).parent.as_posix() == folder] if folder != "." else []
    listing = (f"packaged configs in {folder}/: {', '.join(Path(k).name for k in nearby)}" if nearby else
               f"packaged config folders: {', '.join(sorted({Path(k).parent.as_posix() + '/' for k in known}))}")
    raise ConfigError(f"config {path}: no such file ({given.absolute()}) and no packaged config of that name (in "
                      f"{PACKAGED_CONFIGS}){did_you_mean(name.removesuffix('.yaml'), known)}; {listing}")


def load_config(path: str | Path | None = None, overrides: list[str] = (), validate_files: bool = True) -> Config:
    source = resolve_config(path) if path is not None else None
    data: dict[str, Any] = read_yaml(source) if source is not None else {}
    for assignment in overrides:
        set_override(data, assignment)
    cfg = from_dict(Config, data)
    try:
        validate(cfg, check_files=validate_files)
    except ConfigError as err:
        packaged = source is not None and source != Path(path)
        if not packaged or not str(err).startswith("data.path") or Path(cfg.data.path or "").is_absolute():
            raise
        # a packaged config's relative data.path is read from the working directory, not from the package
        raise ConfigError(f"{err} (packaged config {Path(path).as_posix()}: data.path is taken from the working "
                          f"directory {Path.cwd()}; give the data's place with --set data.path=PATH)") from None
    return cfg


# ---------------------------------------------------------------- semantic checks

def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _is_device(name: str) -> bool:
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def validate(cfg: Config, check_files: bool = True) -> None:
    from .attacks import ATTACK_LOSSES, EVAL_ATTACKS
    from .attacks.gradient import START_POINTS
    from .data import SUBSETS, validate_image_keys
    from .data.loader import SAMPLERS
    from .data.sources import SOURCES
    from .losses import LOSSES
    from .models import build_adjustments
    from .models.backbones import BACKBONES
    from .models.heads import HEADS
    from .train.frameworks import FRAMEWORKS
    from .train.weighting import WEIGHTINGS
    from .evaluate.attacks import is_known_attack

    d, m, t, a, e = cfg.data, cfg.model, cfg.train, cfg.train.attack, cfg.eval
    _require(d.source in SOURCES, "data.source", f"unknown source '{d.source}'{did_you_mean(d.source, SOURCES)}; "
             f"known: {', '.join(sorted(SOURCES))}")
    _require(d.subset in SUBSETS, "data.subset", f"unknown subset '{d.subset}'{did_you_mean(d.subset, SUBSETS)}; "
             f"known: {', '.join(SUBSETS)}")
    _require(d.imbalance_ratio >= 1, "data.imbalance_ratio",
             f"must be n_max / n_min >= 1 (e.g. 50 for CIFAR-10-LT rho 50); got {d.imbalance_ratio}")
    _require(d.profile in ("exp", "step"), "data.profile", f"must be 'exp' or 'step'; got '{d.profile}'")
    _require(d.n_max is None or d.n_max >= 1, "data.n_max", f"must be >= 1; got {d.n_max}")
    _require(d.val_per_class >= 0, "data.val_per_class", f"must be >= 0; got {d.val_per_class}")
    _require(d.crop_padding >= 0, "data.crop_padding", f"must be >= 0; got {d.crop_padding}")
    validate_image_keys(d, check_files)  # data.root, split files, image_size, crop (robal/data/__init__.py)
    if check_files and d.source in ("npz",):
        _require(d.path is not None, "data.path", "the npz source needs a file path")
        _require(Path(d.path).is_file(), "data.path", f"file {d.path} does not exist")
    if check_files and d.source in ("cifar10", "cifar100") and not d.download:
        _require(d.path is not None and Path(d.path).exists(), "data.path",
                 f"{d.path} does not exist (set data.download: true to fetch {d.source})")
    SOURCES_ARGS_KEY = "data.source_args"
    import inspect
    params = inspect.signature(SOURCES[d.source]).parameters
    for k in d.source_args:
        _require(k in params, f"{SOURCES_ARGS_KEY}.{k}",
                 f"source '{d.source}' takes no argument '{k}'{did_you_mean(k, [p for p in params if p not in ('path', 'download')])}")

    _require(cfg.device == "auto" or _is_device(cfg.device), "device",
             f"must be auto, cpu, cuda, cuda:N or mps; got '{cfg.device}'")
    # each name first under its own key, then its arguments
    BACKBONES.get(m.backbone, "model.backbone")
    HEADS.get(m.head, "model.head")
    FRAMEWORKS.get(t.framework, "train.framework")
    LOSSES.get(t.loss, "train.loss")
    ATTACK_LOSSES.get(a.loss, "train.attack.loss")
    WEIGHTINGS.get(t.weighting, "train.weighting")
    BACKBONES.check_args(m.backbone, m.backbone_args, "model.backbone_args")
    HEADS.check_args(m.head, m.head_args, "model.head_args", ("in_features", "num_classes", "class_counts"))

    FRAMEWORKS.check_args(t.framework, t.framework_args, "train.framework_args", ("loss", "attack", "class_counts"))
    LOSSES.check_args(t.loss, t.loss_args, "train.loss_args", ("class_counts",))
    _require(a.eps >= 0, "train.attack.eps", f"must be >= 0; got {a.eps}")
    _require(a.step_size >= 0, "train.attack.step_size", f"must be >= 0; got {a.step_size}")
    _require(a.steps >= 0, "train.attack.steps", f"must be >= 0; got {a.steps}")
    _require(a.start == "auto" or a.start in START_POINTS, "train.attack.start",
             f"must be auto or one of {', '.join(START_POINTS.names())}; got '{a.start}'")
    ATTACK_LOSSES.check_args(a.loss, a.loss_args, "train.attack.loss_args", ("logits", "target", "target_probs"))
    _validate_beyond(cfg)
    SAMPLERS.get(t.sampler, "train.sampler")
    WEIGHTINGS.check_args(t.weighting, t.weighting_args, "train.weighting_args", ("class_counts", "epoch"))
    _require(t.epochs >= 1, "train.epochs", f"must be >= 1; got {t.epochs}")
    _require(t.batch_size >= 1, "train.batch_size", f"must be >= 1; got {t.batch_size}")
    _require(t.lr > 0, "train.lr", f"must be > 0; got {t.lr}")
    _require(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1); got {t.momentum}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0; got {t.weight_decay}")
    _require(0 < t.lr_gamma <= 1, "train.lr_gamma", f"must be in (0, 1]; got {t.lr_gamma}")
    for i, ms in enumerate(t.lr_milestones):
        _require(1 <= ms < t.epochs + 1, f"train.lr_milestones[{i}]",
                 f"epoch {ms} is outside the run (1..{t.epochs}); decay epochs must fall before the last epoch ends")
    _require(list(t.lr_milestones) == sorted(t.lr_milestones), "train.lr_milestones", "must be increasing")
    _require(t.trainable in ("all", "head", "class_scale"), "train.trainable",
             f"must be all, head or class_scale; got '{t.trainable}'")
    _require(not t.reset_head or t.init_from is not None, "train.reset_head", "needs train.init_from")
    _require(not t.frozen_bn or t.trainable != "all", "train.frozen_bn",
             "freezes the backbone's BatchNorm of a fine-tune: needs train.trainable head or class_scale")
    _require(t.trainable == "all" or t.init_from is not None, "train.trainable",
             "freezing the backbone needs train.init_from (a trained checkpoint)")
    if check_files and t.init_from is not None:
        _require(Path(t.init_from).exists(), "train.init_from", f"{t.init_from} does not exist")
    _require(t.checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1; got {t.checkpoint_every}")
    _require(t.keep_last >= 1, "train.keep_last", f"must be >= 1; got {t.keep_last}")
    _require(t.amp in ("auto", "off", "bf16"), "train.amp", f"must be auto, off or bf16; got '{t.amp}'")
    _require(t.stats_every >= 1, "train.stats_every", f"must be >= 1; got {t.stats_every}")
    _require(t.skip_nonfinite >= 0, "train.skip_nonfinite", f"must be >= 0; got {t.skip_nonfinite}")
    if t.tensorboard:
        from .train.tensorboard_log import require_tensorboard

        require_tensorboard()  # the package is there before anything runs

    build_adjustments(cfg.inference, [1] * 2)
    _require(e.eps >= 0, "eval.eps", f"must be >= 0; got {e.eps}")
    _require(e.step_size >= 0, "eval.step_size", f"must be >= 0; got {e.step_size}")
    _require(e.batch_size >= 1, "eval.batch_size", f"must be >= 1; got {e.batch_size}")
    _require(e.n_test is None or e.n_test >= 1, "eval.n_test", f"must be >= 1; got {e.n_test}")
    for i, name in enumerate(e.attacks):
        _require(is_known_attack(name), f"eval.attacks[{i}]", f"unknown attack '{name}'")
    _require(0 <= cfg.seed < 2**32, "seed", f"must be in [0, 2**32) (numpy's seed range); got {cfg.seed}")


def _validate_beyond(cfg: Config) -> None:
    """data.augment, train.attack.budget and train.stages (docs/methods.md, "Beyond the paper")."""
    from .data.augment import AUGMENTS, build_augment
    from .train.budgets import EPS_BUDGETS
    from .train.guard import guard_settings
    from .train.stages import validate_stages

    d, t, a = cfg.data, cfg.train, cfg.train.attack
    AUGMENTS.get(d.augment, "data.augment")
    AUGMENTS.check_args(d.augment, d.augment_args, "data.augment_args")
    build_augment(d.augment, d.augment_args)
    EPS_BUDGETS.get(a.budget, "train.attack.budget")
    EPS_BUDGETS.check_args(a.budget, a.budget_args, "train.attack.budget_args", ("class_counts", "eps", "epoch"))
    try:
        EPS_BUDGETS.build(a.budget, a.budget_args, "train.attack.budget_args", class_counts=[2, 1], eps=a.eps,
                          epoch=0)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"train.attack.budget_args: {err}") from None
    validate_stages(t)
    guard_settings(t.overfit_guard)


def config_warnings(cfg: Config) -> list[str]:
    """Values that are valid but almost surely a mistake."""
    from .evaluate.settings import LARGE_EPS

    out = []
    for key, eps in (("train.attack.eps", cfg.train.attack.eps), ("eval.eps", cfg.eval.eps)):
        if eps > LARGE_EPS:
            out.append(f"{key} {eps:g} is above 32/255 = {LARGE_EPS:.4f} on [0, 1] pixels: an attack that large "
                       f"changes what the image shows (did you mean {eps:g}/255?)")
    return out
