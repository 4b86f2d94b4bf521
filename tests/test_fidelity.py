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


def cdt_model(attack_on=None):
    import torch

    from robal.models import build_model

    head_args = {"tau": 0.3} if attack_on is None else {"tau": 0.3, "attack_on": attack_on}
    spec = {"backbone": "small_cnn", "backbone_args": {"in_channels": 1, "width": 4}, "head": "cdt",
            "head_args": head_args, "class_counts": [500, 120, 30, 6], "class_names": list("abcd"),
            "mean": [0.5], "std": [0.25], "inference": []}
    torch.manual_seed(0)
    return build_model(spec)


def input_gradient(logits_fn, x, y):
    import torch
    import torch.nn.functional as F

    x = x.clone().requires_grad_(True)
    F.cross_entropy(logits_fn(x), y, reduction="sum").backward()
    return x.grad


def test_cdt_training_attack_maximises_ce_on_the_raw_logits_by_default():
    """The reference attacks the raw FC logits and divides by the temperatures in the outer loss only: robal's
    one-step training attack moves each pixel along the sign of CE(z)'s input gradient, not CE(z / a)'s."""
    import torch

    from robal.train.frameworks import TrainingAttack, attack_logits

    torch.manual_seed(1)
    x, y = torch.rand(6, 1, 8, 8) * 0.8 + 0.1, torch.tensor([0, 1, 2, 3, 3, 2])
    eps = 0.05
    one_step = TrainingAttack(eps=eps, step_size=eps, steps=1, random_start=False)
    for attack_on, expected_fn in ((None, "forward"), ("raw", "forward"), ("tempered", "training_logits")):
        model = cdt_model(attack_on).eval()
        g = input_gradient(getattr(model, expected_fn), x, y)
        other = input_gradient(model.training_logits if expected_fn == "forward" else model, x, y)
        assert torch.allclose(input_gradient(attack_logits(model), x, y), g)
        assert not torch.allclose(g, other, atol=1e-6)
        x_adv = one_step(model.train(), x, y)
        expected = (x + eps * g.sign()).clamp(0, 1)
        assert torch.equal(x_adv, expected)
    with pytest.raises(ValueError, match="attack_on"):
        cdt_model("scaled")


def finetune_trainer(tmp_path, *overrides):
    """A dry-run Trainer (nothing written) fine-tuning the head of a small digits model saved in tmp_path."""
    import torch

    from robal.train.checkpoint import atomic_save, model_checkpoint
    from robal.train.trainer import Trainer

    base = ["model.backbone_args.width=8", "train.attack.steps=1", "train.epochs=1", "train.lr_milestones=[]"]
    start = Trainer(load_config(DIGITS, base), None, progress=False)
    atomic_save(model_checkpoint(start.model, {"epoch": 0}), tmp_path / "start.pt")
    cfg = load_config(DIGITS, base + [f"train.init_from={tmp_path / 'start.pt'}", "train.trainable=head",
                                      *overrides])
    trainer = Trainer(cfg, None, progress=False)
    stats = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items() if "running" in k}
    assert stats and all(torch.equal(stats[k], v) for k, v in start.model.backbone.state_dict().items() if k in stats)
    return trainer, stats


def test_finetune_batchnorm_statistics_move_in_reference_mode_and_stay_when_frozen(tmp_path):
    """The reference fine-tunes keep the model in train mode: BatchNorm re-estimates its running statistics on
    the re-sampled adversarial data (frozen_bn false, the default); frozen_bn true keeps them. The backbone's
    weights stay as they were in both."""
    import torch

    for frozen in (False, True):
        trainer, stats = finetune_trainer(tmp_path, f"train.frozen_bn={str(frozen).lower()}")
        weights = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items() if "running" not in k}
        head = trainer.model.head.weight.detach().clone()
        trainer.train_epoch(0)
        after = trainer.model.backbone.state_dict()
        moved = [k for k in stats if k.endswith(("running_mean", "running_var")) and not torch.equal(stats[k], after[k])]
        assert (moved == []) == frozen, (frozen, moved)
        assert all(torch.equal(weights[k], after[k]) for k in weights if "num_batches" not in k)
        assert not torch.equal(head, trainer.model.head.weight)
    with pytest.raises(ValueError, match="train.frozen_bn"):
        load_config(DIGITS, ["train.frozen_bn=true"])


def test_trades_and_mart_start_at_x_plus_small_gaussian_noise_pgd_at_and_robal_uniform():
    """The TRADES and MART reference attacks start at x + 0.001 N(0, I); PGD-AT and RoBal (the reference's
    add_reg training) at a uniform point of the eps-ball; train.attack.start overrides the method's start."""
    import torch

    from robal.attacks.gradient import START_POINTS
    from robal.losses import LOSSES
    from robal.train.frameworks import FRAMEWORKS, TrainingAttack

    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8) * 0.5 + 0.25
    eps = 0.1
    starts = {}

    def spy(forward, x_, target, eps_, step, steps, loss_fn, start):
        starts[name] = start
        return START_POINTS.get(start)(x_, eps_)

    import robal.train.frameworks as fw
    real = fw.pgd
    fw.pgd = spy
    try:
        for name, args, attack_loss, override in (("trades", {}, "kl", "auto"), ("trades", {"outer_on": "adversarial"},
                                                 "ce", "auto"), ("mart", {}, "ce", "auto"), ("pgd_at", {}, "ce", "auto"),
                                                ("trades", {}, "kl", "uniform"), ("pgd_at", {}, "ce", "normal")):
            attack = TrainingAttack(eps=eps, step_size=eps / 4, steps=1, loss=attack_loss, start=override)
            framework = FRAMEWORKS.build(name, args, loss=LOSSES.build("ce", {}, class_counts=[5, 3, 2, 1]),
                                         attack=attack, class_counts=[5, 3, 2, 1])
            model = cdt_model().eval()
            framework(model, x, torch.tensor([0, 1, 2, 3]))
            expected = {"auto": "normal" if name in ("trades", "mart") and not args else "uniform"}.get(override, override)
            assert starts[name] == expected, (name, args, override)
    finally:
        fw.pgd = real
    torch.manual_seed(1)
    d = START_POINTS.get("normal")(torch.zeros(200000), eps)
    assert abs(d.std().item() - 0.001) < 2e-5 and abs(d.mean().item()) < 2e-5
    d = START_POINTS.get("uniform")(torch.zeros(200000), eps)
    assert d.abs().max().item() <= eps and d.abs().mean().item() > 0.045
    with pytest.raises(ValueError, match="train.attack.start"):
        load_config(DIGITS, ["train.attack.start=gaussian"])


def test_focal_prior_bias_is_the_log_odds_of_each_class_prior():
    import math

    from robal.models.heads import HEADS

    counts = [500, 120, 30, 6]
    head = HEADS.build("linear", {"bias_init": "prior"}, in_features=5, num_classes=4, class_counts=counts)
    n = sum(counts)
    for c, b in zip(counts, head.bias.tolist()):
        assert math.isclose(b, math.log((c / n) / (1 - c / n)), rel_tol=1e-6)
        assert math.isclose(1 / (1 + math.exp(-b)), c / n, rel_tol=1e-6)  # sigmoid(b_c) = pi_c
    plain = HEADS.build("linear", {}, in_features=5, num_classes=4, class_counts=counts)
    assert plain.bias.abs().max().item() <= 1 / math.sqrt(5)  # PyTorch's default uniform(-1/sqrt(d), 1/sqrt(d))
    with pytest.raises(ValueError, match="bias_init"):
        HEADS.build("linear", {"bias_init": "focal"}, in_features=5, num_classes=4, class_counts=counts)


@pytest.mark.parametrize("row", ["focal", "cb_reweight"])
def test_focal_rows_start_the_bias_at_the_prior_and_their_weights_were_trained_so(row):
    import torch

    cfg = load_config(ROOT / f"configs/cifar10_lt/{row}.yaml", validate_files=False)
    base = load_config(ROOT / "configs/cifar10_lt/pgd_at.yaml", validate_files=False)
    assert cfg.model.head_args == {"bias_init": "prior"} and base.model.head_args == {}
    committed = torch.load(ROOT / f"docs/results/models/{row}.pt", map_location="cpu", weights_only=False)
    assert committed["spec"]["head_args"] == {"bias_init": "prior"}  # the weights behind docs/results.md's row


def test_lws_scales_the_fc_logits_without_the_bias_and_older_checkpoints_keep_theirs():
    import numpy as np
    import torch

    from robal.models import build_model
    from robal.train.trainer import model_spec

    spec = {"backbone": "small_cnn", "backbone_args": {"in_channels": 1, "width": 4}, "head": "lws",
            "class_counts": [500, 120, 30, 6], "class_names": list("abcd"), "mean": [0.5], "std": [0.25],
            "inference": []}
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    scale = torch.tensor([0.5, 1.0, 1.5, 3.0])
    outputs = {}
    for name, head_args in (("reference", {"bias": False}), ("with_bias", {"bias": True}), ("old_spec", None)):
        model = build_model({**spec, **({"head_args": head_args} if head_args is not None else {})}).eval()
        with torch.no_grad():
            model.head.bias.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
            model.head.class_scale.copy_(scale)
            f = model.features(x).double()
            w, b = model.head.weight.double(), model.head.bias.double()
            outputs[name] = (model(x).double(), f @ w.t(), b)
    z, fw, b = outputs["reference"]
    assert np.allclose(z.numpy(), (fw * scale.double()).numpy(), atol=1e-5)
    for name in ("with_bias", "old_spec"):  # a spec written before issue 27 names no bias: the old z = a (Wf + b)
        z, fw, b = outputs[name]
        assert np.allclose(z.numpy(), ((fw + b) * scale.double()).numpy(), atol=1e-5)
    cfg = load_config(ROOT / "configs/cifar10_lt/finetune_lws.yaml", validate_files=False)
    assert cfg.model.head_args == {}  # the committed row, rerun in session 15, uses the reference's bias-free LWS

    class Data:
        class_counts, class_names, mean, std = [5, 3], ["a", "b"], [0.5], [0.25]

    lws_cfg = load_config(DIGITS, ["model.head=lws"])
    assert model_spec(lws_cfg, Data)["head_args"] == {"bias": False}
    assert model_spec(load_config(DIGITS), Data)["head_args"] == {}


@pytest.mark.parametrize("native", [True, False])
def test_bf16_without_bf16_hardware_warns(monkeypatch, capsys, native):
    """train.amp: bf16 on a device that only emulates bf16 says so before training (13x slower than fp32 on an
    AVX2 CPU); on hardware with bf16, and in fp32, nothing is said."""
    from robal.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: native)
    tiny = ["model.backbone_args.width=8", "train.attack.steps=1", "train.epochs=1", "train.lr_milestones=[]"]
    trainer_module.Trainer(load_config(DIGITS, tiny + ["train.amp=bf16"]), None, progress=False)
    warned = capsys.readouterr().out
    assert ("without bf16 support" in warned) is not native
    if not native:
        assert "train.amp: bf16" in warned and "train.amp: off" in warned
    trainer_module.Trainer(load_config(DIGITS, tiny), None, progress=False)
    assert "bf16" not in capsys.readouterr().out


def test_native_bf16_reads_the_cpu():
    """bf16 hardware (avx512_bf16, AMX) counts as native, a CPU without AVX-512 (bf16 emulated) does not; oneDNN's
    check decides in between."""
    import torch

    from robal.train.trainer import native_bf16

    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert native_bf16(torch.device("cpu"))
    elif "avx512bw" not in flags:
        assert not native_bf16(torch.device("cpu"))
    else:
        pytest.skip("AVX-512 without bf16 instructions: oneDNN's own check decides")
