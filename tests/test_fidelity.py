"""Fidelity to the reference code (issue 27): fp32 by default, RobustLT's class-wise budget, the evaluation step
scaled with eps, the training logit scale measured on every class."""
from pathlib import Path

import pytest

from robal.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits_lt/pgd_at.yaml"


def test_fp32_by_default_and_runs_started_with_amp_auto_resume():
    import contextlib

    from robal.train.trainer import autocast_for, config_differences

    cfg = load_config(DIGITS)
    assert cfg.train.amp == "off"
    for device in ("cpu", "cuda"):
        assert isinstance(autocast_for(torch_device(device), "off"), contextlib.nullcontext)
        assert isinstance(autocast_for(torch_device(device), "auto"), contextlib.nullcontext)
    assert not isinstance(autocast_for(torch_device("cpu"), "bf16"), contextlib.nullcontext)
    new = cfg.to_dict()
    old = {**new, "train": {**new["train"], "amp": "auto"}}  # as a run started before fp32 became the default
    assert config_differences(old, new) == []


def torch_device(name):
    import torch

    return torch.device(name)


def test_robustlt_budget_equals_its_formula_on_cifar10_lt_counts():
    import math

    import numpy as np

    from robal.train.budgets import EPS_BUDGETS

    counts = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
    eps, alpha = 8 / 255, 0.3
    spread = [math.sqrt(math.log(5000 / n)) for n in counts]
    t = alpha / sum(n / sum(counts) * s for n, s in zip(counts, spread))
    expected = [(1 - alpha) * eps + t * s * eps for s in spread]
    for epoch, ramp in ((0, 0.0), (4, 4 / 16), (15, 15 / 16), (16, 1.0), (19, 1.0)):
        got = EPS_BUDGETS.build("robustlt", {"alpha": alpha, "warmup_epochs": 16}, class_counts=counts, eps=eps,
                                epoch=epoch)
        assert got.tolist() == pytest.approx([ramp * e for e in expected], rel=1e-6)
    full = np.asarray(expected)
    assert float((np.asarray(counts) / sum(counts) * full).sum()) == pytest.approx(eps, rel=1e-9)
    assert full[0] == pytest.approx(0.7 * eps) and full[-1] * 255 == pytest.approx(12.88, abs=0.01)
    assert load_config(ROOT / "configs/cifar10_lt/classwise_eps.yaml", validate_files=False).train.attack.budget \
        == "robustlt"


def test_eval_step_scales_with_eps_unless_given():
    from robal.cli import eval_step_size

    assert eval_step_size(None, None, 2 / 255) == 2 / 255
    assert eval_step_size(4 / 255, None, 2 / 255) == pytest.approx(1 / 255)
    assert eval_step_size(4 / 255, 0.5 / 255, 2 / 255) == 0.5 / 255


def test_the_training_logit_scale_is_measured_on_every_class():
    import numpy as np

    from robal.train.trainer import scale_sample

    labels = np.repeat(np.arange(4), [500, 100, 30, 2])  # class-ordered, as a long-tailed training set
    idx = scale_sample(labels, 256)
    assert np.bincount(labels[idx]).tolist() == [64, 64, 30, 2]
