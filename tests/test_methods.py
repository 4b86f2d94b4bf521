"""Long-tailed methods: losses, margins and weights against hand computations, samplers, every config, a
two-batch training run of every training-time method config, and the inference-time adjustments."""
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import robal
from robal.attacks import ce_loss
from robal.cli import main as cli_main
from robal.config import Config, load_config
from robal.data.loader import SAMPLERS
from robal.losses import LOSSES, ldam_margins
from robal.models import build_model
from robal.models.backbones import BACKBONES
from robal.registry import ConfigError
from robal.train.checkpoint import atomic_save, load_model, model_checkpoint, read_checkpoint
from robal.train.frameworks import TrainingAttack
from robal.train.trainer import train
from robal.train.weighting import WEIGHTINGS, effective_number_weights

CONFIGS = Path(robal.__file__).parent / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
POSTHOC = sorted((CONFIGS / "cifar10_lt/posthoc").glob("*.yaml"))
# every CPU training config of CIFAR-10-LT (full/ ones differ only in backbone and schedule)
TRAINING = sorted(p for p in (CONFIGS / "cifar10_lt").glob("*.yaml"))
FINETUNE = [p for p in TRAINING if p.stem.startswith("finetune_")]
# the training-time rows of the paper's Table 1 (fc is pgd_at.yaml) and Table 2
METHODS = ["pgd_at", "trades", "robal_n", "robal_r", "cos", "ldam", "ldam_drw", "cos_margin", "cdt",
           "logit_adjust", "focal", "resampling", "cb_reweight", "tde", "finetune_rs", "finetune_rw",
           "finetune_lws", "finetune_crt"]

COUNTS = [100, 40, 10, 4]
Z = np.array([[0.9, -0.2, 0.3, 0.1],
              [0.2, 0.5, -0.7, 0.4],
              [-0.3, 0.1, 0.2, 0.8]])
Y = np.array([0, 3, 2])


# ---------------------------------------------------------------- hand computations (numpy / math only)

def hand_ce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[y] per row, with explicit exp/log."""
    out = []
    for row, target in zip(logits, y):
        top = max(row)
        log_sum = top + math.log(sum(math.exp(v - top) for v in row))
        out.append(log_sum - row[target])
    return np.array(out)


def with_target_margin(z, y, margins):
    z = z.copy()
    for i, target in enumerate(y):
        z[i, target] -= margins[target]
    return z


def loss_value(name, args, weight=None):
    loss = LOSSES.build(name, args, class_counts=COUNTS)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float)
    return loss(torch.tensor(Z, dtype=torch.float), torch.tensor(Y), w).item()


LOG_PI = np.log(np.array(COUNTS) / sum(COUNTS))


# ---------------------------------------------------------------- losses

def test_ce_scales_the_logits():
    assert loss_value("ce", {}) == pytest.approx(hand_ce(Z, Y).mean(), rel=1e-5)
    assert loss_value("ce", {"s": 16.0}) == pytest.approx(hand_ce(16 * Z, Y).mean(), rel=1e-5)


def test_ldam_loss():
    m = [0.5 * (4 / n) ** 0.25 for n in COUNTS]  # largest margin 0.5 at the rarest class
    expected = hand_ce(10 * with_target_margin(Z, Y, m), Y).mean()
    assert loss_value("ldam", {"max_m": 0.5, "s": 10.0}) == pytest.approx(expected, rel=1e-5)


def test_cos_margin_loss():
    expected = hand_ce(10 * with_target_margin(Z, Y, [0.2] * 4), Y).mean()
    assert loss_value("cos_margin", {"m": 0.2, "s": 10.0}) == pytest.approx(expected, rel=1e-5)


def test_logit_adjust_loss():
    expected = hand_ce(Z + 1.0 * LOG_PI, Y).mean()
    assert loss_value("logit_adjust", {"tau": 1.0}) == pytest.approx(expected, rel=1e-5)
    expected = hand_ce(2 * Z + 0.5 * LOG_PI, Y).mean()
    assert loss_value("logit_adjust", {"tau": 0.5, "s": 2.0}) == pytest.approx(expected, rel=1e-5)


def test_robal_loss():
    m0, tau_m, tau_b, s = 0.1, 0.3, 1.5, 10.0
    m = [m0 + tau_m / s * math.log(n / 4) for n in COUNTS]
    expected = hand_ce(s * with_target_margin(Z, Y, m) + tau_b * LOG_PI, Y).mean()
    got = loss_value("robal", {"m0": m0, "tau_m": tau_m, "tau_b": tau_b, "s": s})
    assert got == pytest.approx(expected, rel=1e-5)


def test_focal_softmax():
    p = np.exp(-hand_ce(Z, Y))
    expected = np.mean(-(1 - p) ** 2 * np.log(p))
    assert loss_value("focal", {"gamma": 2.0, "form": "softmax"}) == pytest.approx(expected, rel=1e-5)
    assert loss_value("focal", {"gamma": 0.0}) == pytest.approx(hand_ce(Z, Y).mean(), rel=1e-5)


def test_focal_sigmoid_and_class_weights():
    sig = 1 / (1 + np.exp(-Z))
    onehot = np.eye(4)[Y]
    p_t = np.where(onehot == 1, sig, 1 - sig)
    per_sample = (-(1 - p_t) ** 2 * np.log(p_t)).sum(1)
    assert loss_value("focal", {"gamma": 2.0, "form": "sigmoid"}) == pytest.approx(per_sample.mean(), rel=1e-5)
    w = [0.2, 0.5, 1.3, 2.0]  # class-balanced loss: w_y times the sample's loss, mean over the batch
    expected = np.mean([w[t] * v for t, v in zip(Y, per_sample)])
    assert loss_value("focal", {"gamma": 2.0, "form": "sigmoid"}, w) == pytest.approx(expected, rel=1e-5)
    expected = np.mean([w[t] * v for t, v in zip(Y, hand_ce(Z, Y))])
    assert loss_value("ce", {}, w) == pytest.approx(expected, rel=1e-5)


def test_attack_ce_takes_a_scale():
    z, y = torch.tensor(Z, dtype=torch.float), torch.tensor(Y)
    assert np.allclose(ce_loss(z, y).numpy(), hand_ce(Z, Y), rtol=1e-5)
    assert np.allclose(ce_loss(z, y, s=16.0).numpy(), hand_ce(16 * Z, Y), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- margins and weights

def test_ldam_margins_formula():
    m = ldam_margins([5000, 500, 50], max_m=0.5).tolist()
    # m_c = C * n_c^(-1/4), C chosen so the largest (rarest class) is 0.5
    assert m == pytest.approx([0.5 * (50 / 5000) ** 0.25, 0.5 * (50 / 500) ** 0.25, 0.5], rel=1e-6)
    assert m[0] == pytest.approx(0.158114, rel=1e-5)


def test_effective_number_weights_formula():
    counts, beta = [5000, 3237, 100], 0.9999
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    expected = [3 * r / sum(raw) for r in raw]
    assert effective_number_weights(counts, beta).tolist() == pytest.approx(expected, rel=1e-5)
    assert sum(expected) == pytest.approx(3)


def test_drw_starts_with_the_lr_decay_epoch():
    """start_epoch is numbered like train.lr_milestones: [15, 18] decays in (1-based) epoch 15, the trainer's
    0-based epoch 14, and DRW with start_epoch 15 weights from that same epoch on."""
    def weights(epoch, start):
        return WEIGHTINGS.build("effective_number", {"beta": 0.9999, "start_epoch": start},
                                class_counts=COUNTS, epoch=epoch)
    assert weights(13, 15) is None
    assert weights(14, 15) is not None
    assert weights(0, 1) is not None  # whole run
    assert WEIGHTINGS.build("none", {}, class_counts=COUNTS, epoch=3) is None


# ---------------------------------------------------------------- samplers

SKEWED = torch.tensor([0] * 1000 + [1] * 100 + [2] * 10 + [3] * 1)


def test_class_balanced_sampler_draws_classes_uniformly():
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([SAMPLERS.get("class_balanced")(SKEWED, g) for _ in range(5)])
    assert len(idx) == 5 * len(SKEWED)
    observed = torch.bincount(SKEWED[idx], minlength=4).double()
    expected = len(idx) / 4
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (observed.tolist(), chi2)  # chi-square, 3 degrees of freedom, p = 0.001
    # the random order would have given about 1000:100:10:1
    within_0 = torch.bincount(idx[SKEWED[idx] == 0], minlength=1000)
    assert (within_0 > 0).sum() > 700  # images of a class drawn uniformly too (about 1 - e^-1.4 of them seen)


def test_class_aware_sampler_visits_every_class_each_round():
    g = torch.Generator().manual_seed(1)
    idx = SAMPLERS.get("class_aware")(SKEWED, g)
    assert len(idx) == 1000 * 4  # max_c n_c * C
    rounds = SKEWED[idx].view(1000, 4)
    assert (rounds.sort(1).values == torch.arange(4)).all()
    assert (torch.bincount(idx[SKEWED[idx] == 0], minlength=1000) == 1).all()  # the largest class once each
    per_image_1 = torch.bincount(idx[SKEWED[idx] == 1] - 1000, minlength=100)
    assert (per_image_1 == 10).all()  # a class of 100 cycles through its images 10 times


def test_random_sampler_is_a_permutation():
    g = torch.Generator().manual_seed(0)
    idx = SAMPLERS.get("random")(SKEWED, g)
    assert sorted(idx.tolist()) == list(range(len(SKEWED)))


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads_and_validates(path):
    cfg = load_config(path, validate_files=False)
    assert isinstance(cfg, Config)


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


COSINE = [p for p in ALL_CONFIGS if load_config(p, validate_files=False).model.head in ("cosine", "tde")]


def test_the_cosine_head_configs_are_the_expected_rows():
    """The scale test below runs on every config with a cosine head (none silently passed over)."""
    assert {p.stem for p in COSINE} >= {"cos", "cos_margin", "ldam", "ldam_drw", "robal_n", "robal_r", "tde"}
    assert {str(p.relative_to(CONFIGS)) for p in COSINE} >= {"cifar10_lt/full/robal_n.yaml", "cifar100_lt/robal_r.yaml",
                                                             "digits_lt/robal_n.yaml"}


@pytest.mark.parametrize("path", COSINE, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_cosine_heads_predict_with_the_training_scale(path):
    """A cosine head trains on s * cos: the saved model must predict with the same s, and its training attack
    sees the cosines either unscaled (s 1, RoBal's choice) or scaled by the same s."""
    cfg = load_config(path, validate_files=False)
    t = cfg.train
    s = t.loss_args.get("s", _default(LOSSES.get(t.loss), "s"))
    assert s > 1
    scales = [step["s"] for step in cfg.inference if step["name"] == "scale"]
    assert scales == [s], f"{path.name}: inference scale {scales} vs loss s {s}"
    attack_s = t.attack.loss_args.get("s", 1.0) if t.attack.loss == "ce" else 1.0
    assert attack_s in (1.0, s)


def test_posthoc_files_hold_only_an_inference_list():
    assert {p.stem for p in POSTHOC} == {"cdt_post", "tau_norm", "posthoc_la", "posthoc_la_e80"}
    for path in POSTHOC:
        import yaml

        data = yaml.safe_load(path.read_text())
        assert list(data) == ["inference"] and isinstance(data["inference"], list)


def test_every_training_config_has_a_full_scale_twin():
    for stem in METHODS:
        assert (CONFIGS / "cifar10_lt" / f"{stem}.yaml").is_file()
        cfg = load_config(CONFIGS / "cifar10_lt/full" / f"{stem}.yaml", validate_files=False)
        assert cfg.model.backbone == "wrn34_10" and cfg.train.batch_size == 64
        assert cfg.train.epochs == (1 if stem.startswith("finetune_") else 80)


def test_resnet18_gpu_rows_differ_from_the_wrn_rows_only_in_backbone():
    folder = CONFIGS / "cifar10_lt/full/resnet18"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == ["pgd_at", "robal_n", "robal_r", "trades"]
    for path in folder.glob("*.yaml"):
        cfg = load_config(path, validate_files=False).to_dict()
        wrn = load_config(CONFIGS / "cifar10_lt/full" / path.name, validate_files=False).to_dict()
        assert (cfg["model"].pop("backbone"), cfg["model"].pop("backbone_args")) == ("resnet18", {})
        wrn_backbone = (wrn["model"].pop("backbone"), wrn["model"].pop("backbone_args"))
        assert wrn_backbone == ("wrn34_10", {"depth": 34, "widen": 10})
        assert cfg.pop("name") == f"cifar10_lt_{path.stem}_resnet18" and wrn.pop("name").endswith("_wrn34_10")
        assert cfg == wrn


def test_gpu_backbones_have_the_parameter_counts_the_docs_give():
    """docs/results.md and the resnet18 configs' comments: ResNet-18 11M, WRN-34-10 46M parameters."""
    counts = {name: sum(p.numel() for p in BACKBONES.get(name)(**args).parameters()) / 1e6
              for name, args in (("resnet18", {}), ("wrn34_10", {"depth": 34, "widen": 10}))}
    assert round(counts["resnet18"]) == 11 and round(counts["wrn34_10"]) == 46


# ---------------------------------------------------------------- two-batch training runs on digits

DIGITS = [
    "device=cpu", "data.source=digits", "data.path=null", "data.crop_padding=0", "data.flip=false",
    "data.n_max=20", "data.imbalance_ratio=10",  # 20 down to 2 per class, 88 images: two batches of 64
    "model.backbone=small_cnn", "model.backbone_args={in_channels: 1, width: 8}",
    "train.epochs=1", "train.batch_size=64", "train.lr_milestones=[]", "train.channels_last=false",
    "train.attack.steps=1", "train.attack.eps=0.1", "train.attack.step_size=0.1", "train.checkpoint_every=1",
]


@pytest.fixture(scope="module")
def tiny_pgd_at(tmp_path_factory):
    """The checkpoint the fine-tune configs start from: pgd_at.yaml on the digits overrides."""
    out = tmp_path_factory.mktemp("methods") / "pgd_at"
    train(load_config(CONFIGS / "cifar10_lt/pgd_at.yaml", DIGITS), out, progress=False)
    return out / "model.pt"


def _state(path):
    return read_checkpoint(path)["state_dict"]


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.stem)
def test_two_batch_training_run(path, tiny_pgd_at, tmp_path):
    overrides = DIGITS + ([f"train.init_from={tiny_pgd_at}"] if path in FINETUNE else [])
    cfg = load_config(path, overrides)
    model = train(cfg, tmp_path / "run", progress=False)
    log = (tmp_path / "run/log.jsonl").read_text().splitlines()
    assert len(log) == 1 and '"loss": NaN' not in log[0]
    loaded = load_model(tmp_path / "run")
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        logits = loaded(x)
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    assert torch.allclose(logits, model.eval()(x), atol=1e-5)
    if path in FINETUNE:
        before, after = _state(tiny_pgd_at), _state(tmp_path / "run/model.pt")
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        for name, p in model.named_parameters():
            if name.startswith("backbone."):
                assert torch.equal(before[name], after[name]), f"{name} changed with the backbone frozen"
        expected = {"head.class_scale"} if cfg.train.trainable == "class_scale" else {"head.weight", "head.bias"}
        assert trained == expected
        assert any(not torch.equal(after[n], before.get(n, torch.ones_like(after[n]))) for n in expected)


@pytest.mark.parametrize("config, overrides, reestimated", [("finetune_rs", [], True), ("finetune_crt", [], True),
                                                             ("finetune_crt", ["train.frozen_bn=true"], False)])
def test_finetune_backbone_batchnorm_statistics(tiny_pgd_at, tmp_path, config, overrides, reestimated):
    """The committed fine-tunes re-estimate the frozen backbone's BatchNorm statistics, as the reference;
    `train.frozen_bn: true` holds them. The backbone's weights never change."""
    cfg = load_config(CONFIGS / f"cifar10_lt/{config}.yaml", DIGITS + [f"train.init_from={tiny_pgd_at}"] + overrides)
    assert cfg.train.frozen_bn is not reestimated
    train(cfg, tmp_path / "run", progress=False)
    before, after = _state(tiny_pgd_at), _state(tmp_path / "run/model.pt")
    changed = {k for k in before if k.startswith("backbone.") and not torch.equal(before[k], after[k])}
    statistics = {k for k in before if k.startswith("backbone.") and ("running_" in k or "num_batches" in k)}
    assert changed == (statistics if reestimated else set())


def test_attack_leaves_a_frozen_backbone_in_eval_mode():
    model = build_model(_spec("linear"))
    model.train()
    model.backbone.eval()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    TrainingAttack(0.1, 0.05, 2)(model, x, y)
    assert model.head.training and not any(m.training for m in model.backbone.modules())


# ---------------------------------------------------------------- inference-time adjustments on a fixed model

def _spec(head, head_args=None, inference=None):
    return {"backbone": "small_cnn", "backbone_args": {"in_channels": 1, "width": 4}, "head": head,
            "head_args": head_args or {}, "class_counts": COUNTS, "class_names": list("abcd"),
            "mean": [0.5], "std": [0.25], "inference": inference or []}


@pytest.fixture(scope="module")
def fixed():
    torch.manual_seed(0)
    model = build_model(_spec("linear")).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.3, -0.1, 0.2, -0.4]))
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        f = model.features(x)
    return model, x, f.double().numpy(), model.head.weight.detach().double().numpy(), \
        model.head.bias.detach().double().numpy()


def _predict(model, x, inference):
    model.set_inference(inference)
    with torch.no_grad():
        out = model(x).double().numpy()
    model.set_inference([])
    return out


def test_posthoc_logit_adjustment(fixed):
    model, x, f, w, b = fixed
    z = f @ w.T + b
    assert np.allclose(_predict(model, x, [{"name": "logit_adjust", "tau": 1.0}]), z - LOG_PI, atol=1e-5)
    rarest = int(np.argmin(COUNTS))
    tail_votes = [int((_predict(model, x, [{"name": "logit_adjust", "tau": t}]).argmax(1) == rarest).sum())
                  for t in (0.0, 0.5, 1.0, 2.0, 5.0, 100.0)]
    assert tail_votes == sorted(tail_votes) and tail_votes[-1] == len(x) > tail_votes[0]


def test_tau_norm(fixed):
    model, x, f, w, b = fixed
    norms = np.sqrt((w ** 2).sum(1))
    for tau in (0.5, 1.0):
        expected = f @ (w / norms[:, None] ** tau).T
        assert np.allclose(_predict(model, x, [{"name": "tau_norm", "tau": tau}]), expected, atol=1e-5)
    expected = f @ (w / norms[:, None]).T + b
    assert np.allclose(_predict(model, x, [{"name": "tau_norm", "tau": 1.0, "keep_bias": True}]), expected,
                       atol=1e-5)
    assert np.allclose(_predict(model, x, [{"name": "tau_norm", "tau": 0.0, "keep_bias": True}]), f @ w.T + b,
                       atol=1e-5)


def test_cdt_post_and_scale(fixed):
    model, x, f, w, b = fixed
    z = f @ w.T + b
    n = np.array(COUNTS, dtype=float)
    assert np.allclose(_predict(model, x, [{"name": "cdt_post", "tau": 0.3}]), z / n ** 0.3, atol=1e-5)
    assert np.allclose(_predict(model, x, [{"name": "scale", "s": 16.0}]), 16 * z, atol=1e-4)
    both = [{"name": "cdt_post", "tau": 0.3}, {"name": "logit_adjust", "tau": 0.5}]
    assert np.allclose(_predict(model, x, both), z / n ** 0.3 - 0.5 * LOG_PI, atol=1e-5)


def test_tde_removal_and_moving_average():
    torch.manual_seed(1)
    gamma, alpha, s = 1 / 32, 1.0, 16.0
    model = build_model(_spec("tde", {"gamma": gamma, "momentum": 0.9}))
    x = torch.rand(32, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        f = model.features(x)
    model.head.train()
    model.head.training_logits(f)  # one moving-average update from zero: 0.1 * mean feature
    model.head.eval()
    f = f.double().numpy()
    m = model.head.mean_feature.double().numpy()
    assert np.allclose(m, 0.1 * f.mean(0), atol=1e-6)
    w = model.head.weight.detach().double().numpy()
    u = f / np.sqrt((f ** 2).sum(1, keepdims=True))
    d = m / np.sqrt((m ** 2).sum())
    wn = w / (np.sqrt((w ** 2).sum(1, keepdims=True)) + gamma)
    expected = s * (u - alpha * (u @ d)[:, None] * d[None, :]) @ wn.T
    got = _predict(model, x, [{"name": "tde", "alpha": alpha}, {"name": "scale", "s": s}])
    assert np.allclose(got, expected, atol=1e-4)
    assert np.allclose(_predict(model, x, [{"name": "tde", "alpha": 0.0}]), u @ wn.T, atol=1e-5)


def test_adjustments_refuse_heads_they_do_not_fit(fixed):
    cosine = build_model(_spec("cosine")).eval()
    cosine.set_inference([{"name": "tau_norm", "tau": 1.0}])
    with pytest.raises(ConfigError, match="tau_norm needs a linear head"):
        cosine(torch.rand(2, 1, 8, 8))
    model, x, *_ = fixed
    model.set_inference([{"name": "tde", "alpha": 1.0}])
    with pytest.raises(ConfigError, match="tde"):
        model(x)
    model.set_inference([])


# ---------------------------------------------------------------- robal adjust

@pytest.mark.parametrize("path", POSTHOC, ids=lambda p: p.stem)
def test_cli_adjust_writes_a_self_contained_checkpoint(path, fixed, tmp_path):
    model, x, *_ = fixed
    src = tmp_path / "model.pt"
    atomic_save(model_checkpoint(model, {"epoch": 1, "config": Config().to_dict(), "logit_scale": 2.0}), src)
    out = tmp_path / "adjusted/model.pt"
    assert cli_main(["adjust", str(src), "--inference-file", str(path), "--out", str(out)]) == 0
    import yaml

    inference = yaml.safe_load(path.read_text())["inference"]
    ckpt = read_checkpoint(out)
    assert ckpt["spec"]["inference"] == inference == ckpt["meta"]["config"]["inference"]
    assert ckpt["meta"]["adjusted_from"] == str(src) and ckpt["meta"]["logit_scale"] == 2.0
    with torch.no_grad():
        got = load_model(out)(x)
    assert torch.allclose(got, torch.as_tensor(_predict(model, x, inference), dtype=torch.float), atol=1e-5)


def test_cli_adjust_rejects_a_bad_file(fixed, tmp_path):
    model, *_ = fixed
    src = tmp_path / "model.pt"
    atomic_save(model_checkpoint(model, {"epoch": 1, "config": Config().to_dict()}), src)
    bad = tmp_path / "bad.yaml"
    bad.write_text("inference: [{name: tau_nrom}]\n")
    assert cli_main(["adjust", str(src), "--inference-file", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()
