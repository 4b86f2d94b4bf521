"""Beyond the paper: AT-BSL (strong augmentation), REAT, TAET (stages + equalisation loss), class-wise training
budgets, balanced robustness and the imbalance-ratio sweep. Losses against hand computations, the batch
augmentation's invariants, per-image radii, and a short training run of every new config on digits."""
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import robal
from robal.attacks.gradient import ce_loss, pgd
from robal.config import load_config
from robal.data import long_tailed_counts
from robal.data.augment import (OPS, RANDAUGMENT_OPS, AutoAugment, RandAugment, autocontrast, build_augment,
                                equalize, posterize, rotate, solarize, translate_x)
from robal.data.loader import DeviceLoader
from robal.evaluate.metrics import attack_metrics
from robal.losses import LOSSES
from robal.models import build_model
from robal.registry import ConfigError
from robal.train.budgets import EPS_BUDGETS
from robal.train.checkpoint import load_model
from robal.train.frameworks import (REAT, TrainingAttack, rarest_classes, reat_attack_weights, tail_alignment)
from robal.train.stages import Staged, build_framework
from robal.train.trainer import train

CONFIGS = Path(robal.__file__).parent / "configs"
ROOT = Path(__file__).resolve().parents[1]
NEW = ["at_bsl", "at_bsl_aua", "reat", "taet", "classwise_eps"]

COUNTS = [100, 40, 10, 4]
Z = np.array([[0.9, -0.2, 0.3, 0.1],
              [0.2, 0.5, -0.7, 0.4],
              [-0.3, 0.1, 0.2, 0.8],
              [0.4, 0.0, -0.1, 0.6]])
Y = np.array([0, 3, 2, 3])  # class 1 absent from the batch


def hand_ce(logits, y):
    out = []
    for row, t in zip(logits, y):
        top = max(row)
        out.append(top + math.log(sum(math.exp(v - top) for v in row)) - row[t])
    return np.array(out)


def _spec(counts=COUNTS, channels=1, inference=None):
    return {"backbone": "small_cnn", "backbone_args": {"in_channels": channels, "width": 4}, "head": "linear",
            "head_args": {}, "class_counts": list(counts), "class_names": [str(i) for i in range(len(counts))],
            "mean": [0.5] * channels, "std": [0.25] * channels, "inference": inference or []}


# ---------------------------------------------------------------- losses against hand computations

def test_balanced_softmax_is_ce_with_log_counts():
    """AT-BSL's BSL: CE(z + log n_c); logit_adjust tau 1 adds log pi_c = log n_c - log n (same loss)."""
    expected = hand_ce(Z + np.log(COUNTS), Y).mean()
    got = LOSSES.build("logit_adjust", {"tau": 1.0}, class_counts=COUNTS)(torch.tensor(Z).float(), torch.tensor(Y))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_harl_loss():
    alpha, beta, gamma = 0.1, 0.2, 0.3
    per = hand_ce(Z, Y)
    lc = [float(np.mean(per[Y == c])) if (Y == c).any() else 0.0 for c in range(4)]  # absent class: 0
    mean = sum(lc) / 4
    expected = (alpha * mean + beta * sum((v - mean) ** 2 for v in lc) / 4
                + gamma * sum((v / sum(lc)) ** 2 for v in lc))
    loss = LOSSES.build("harl", {"alpha": alpha, "beta": beta, "gamma": gamma}, class_counts=COUNTS)
    assert loss(torch.tensor(Z).float(), torch.tensor(Y)).item() == pytest.approx(expected, rel=1e-5)
    # equal class losses: no spread, equal shares -> alpha * L + gamma * C * (1/C)^2 (class 1 present here)
    z = torch.zeros(4, 4)
    got = loss(z, torch.arange(4)).item()
    assert got == pytest.approx(alpha * math.log(4) + gamma / 4, rel=1e-5)


def test_reat_attack_weights_formula():
    n, a = [100, 40, 10, 1], [120, 30, 5, 0]
    raw = []
    for nc, ac in zip(n, a):
        beta = (nc - 1) / nc
        e = (1 - beta ** ac) / (1 - beta) if beta > 0 else float(ac > 0)
        raw.append(1 / (e + 1e-5))
    expected = [4 * r / sum(raw) for r in raw]
    assert reat_attack_weights(n, a).tolist() == pytest.approx(expected, rel=1e-4)
    assert rarest_classes(long_tailed_counts(5000, 10, 50)) == [7, 8, 9]
    assert rarest_classes(long_tailed_counts(500, 100, 10)) == list(range(67, 100))


def test_tail_alignment_against_pairwise_sums():
    torch.manual_seed(0)
    f = torch.randn(6, 5)
    y = torch.tensor([0, 3, 3, 1, 2, 3])
    tail = torch.tensor([False, False, True, True])
    w = torch.sqrt(torch.tensor(sum(COUNTS) / np.array(COUNTS), dtype=torch.float))
    p = F.softmax(f, 1).numpy().astype(np.float64)
    total, anchors = 0.0, 0
    for i in range(6):
        if not tail[y[i]]:
            continue
        anchors += 1
        acc = 0.0
        for j in range(6):
            kl = float(np.sum(p[i] * (np.log(p[i]) - np.log(p[j]))))
            sign = -1.0 if y[i] == y[j] else 1.0
            acc += sign * float(w[y[i]] + w[y[j]]) * kl
        total += acc / (6 * 5)
    got = tail_alignment(f, y, tail, w).item()
    assert got == pytest.approx(total / anchors, rel=1e-4)
    assert tail_alignment(f, torch.zeros(6, dtype=torch.long), tail, w).item() == 0.0  # no tail image


def test_reat_reweighting_leaves_sign_pgd_examples_unchanged():
    """Documented finding: a positive per-class factor on each image's loss does not move sign-gradient PGD."""
    torch.manual_seed(0)
    model = build_model(_spec()).eval()
    x, y = torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 3] * 2)
    w = torch.tensor([0.01, 0.3, 2.0, 7.0])
    torch.manual_seed(1)
    plain = pgd(model.training_logits, x, y, 0.1, 0.03, 4)
    torch.manual_seed(1)
    weighted = pgd(model.training_logits, x, y, 0.1, 0.03, 4, loss_fn=lambda z, t: w[t] * ce_loss(z, t))
    assert torch.equal(plain, weighted)


def test_reat_framework_loss_and_epoch_counts():
    torch.manual_seed(0)
    model = build_model(_spec()).eval()  # BatchNorm running statistics fixed: both passes see the same model
    attack = TrainingAttack(0.1, 0.05, 2, class_counts=COUNTS)
    bsl = LOSSES.build("logit_adjust", {"tau": 1.0}, class_counts=COUNTS)
    fw = REAT(bsl, attack, class_counts=COUNTS, lam=0.5)
    assert fw.is_tail.tolist() == [False, False, False, True]  # C = 4: 4 - (2 * 1 + 1) = 1 rarest class
    x, y = torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 3] * 2)
    fw.set_epoch(0)
    torch.manual_seed(3)
    loss, z_clean, z_adv = fw(model, x, y)
    torch.manual_seed(3)
    x_adv = attack(model, x, y)
    f = model.features(x_adv)
    expected = bsl(model.head.training_logits(f), y) + 0.5 * tail_alignment(f, y, fw.is_tail, fw.pair_weight)
    assert z_clean is None and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    predicted = torch.bincount(z_adv.argmax(1), minlength=4).float()
    fw.set_epoch(0)  # same epoch again: nothing rolls over
    assert fw.adv_counts.tolist() == [float(c) for c in COUNTS]
    fw.set_epoch(1)
    assert fw.adv_counts.tolist() == predicted.tolist()
    assert fw.attack_weight.tolist() == pytest.approx(reat_attack_weights(COUNTS, predicted).tolist())


# ---------------------------------------------------------------- class-wise training budgets

def test_power_budget_and_warmup():
    eps = 8 / 255
    got = EPS_BUDGETS.build("power", {"tau": 0.1, "max_scale": 2.0}, class_counts=[5000, 500, 100], eps=eps,
                            epoch=0)
    assert got.tolist() == pytest.approx([eps, eps * 10 ** 0.1, eps * 50 ** 0.1], rel=1e-6)
    capped = EPS_BUDGETS.build("power", {"tau": 1.0, "max_scale": 2.0}, class_counts=[5000, 100], eps=eps, epoch=0)
    assert capped.tolist() == pytest.approx([eps, 2 * eps], rel=1e-6)
    ramp = [EPS_BUDGETS.build("constant", {"warmup_epochs": 4}, class_counts=[3, 1], eps=eps, epoch=e)[0].item()
            for e in range(6)]
    assert ramp == pytest.approx([eps / 4, eps / 2, 3 * eps / 4, eps, eps, eps], rel=1e-6)


def test_classwise_attack_stays_in_each_images_own_ball():
    torch.manual_seed(0)
    model = build_model(_spec()).eval()
    counts = [1000, 100, 10, 1]
    attack = TrainingAttack(0.05, 0.02, 6, budget="power", budget_args={"tau": 0.3, "max_scale": 3.0},
                            class_counts=counts)
    radii = attack.class_eps
    assert radii.tolist() == pytest.approx([0.05 * min(10 ** (0.3 * k), 3.0) for k in range(4)], rel=1e-5)
    x = torch.rand(64, 1, 8, 8)
    y = torch.arange(4).repeat(16)
    x_adv = attack(model, x, y)
    delta = (x_adv - x).abs().flatten(1).amax(1)
    assert (delta <= radii[y] + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    for c in range(4):  # each class reaches (about) its own radius, so the tail really uses the larger ball
        assert delta[y == c].max() > 0.9 * radii[c]
    # a constant budget without warm-up is the scalar path: identical to plain PGD
    plain = TrainingAttack(0.05, 0.02, 3)
    assert plain.class_eps is None
    torch.manual_seed(5)
    a = plain(model, x, y)
    torch.manual_seed(5)
    b = pgd(model.training_logits, x, y, 0.05, 0.02, 3)
    assert torch.equal(a, b)


def test_trades_attack_passes_labels_to_a_classwise_budget():
    cfg = load_config(CONFIGS / "cifar10_lt/trades.yaml",
                      ["train.attack.budget=power", "train.attack.budget_args={tau: 0.5}"], validate_files=False)
    fw = build_framework(cfg.train, COUNTS)
    assert fw.attack.loss == "kl"  # the attack's target is the clean softmax, so the labels must come separately
    torch.manual_seed(0)
    model = build_model(_spec()).train()
    seen = []  # the images the training logits are taken of: the last ones are the adversarial images
    training_logits = model.training_logits
    model.training_logits = lambda v: (seen.append(v.detach().clone()), training_logits(v))[1]
    x, y = torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 3] * 2)
    loss, _, _ = fw(model, x, y)
    assert torch.isfinite(loss)
    radii = fw.attack.class_eps  # eps * min((n_max / n_c)^0.5, 2): 8/255, 12.6/255, 16/255, 16/255
    eps = cfg.train.attack.eps
    assert radii.tolist() == pytest.approx([eps * min((100 / n) ** 0.5, 2.0) for n in COUNTS], rel=1e-5)
    delta = (seen[-1] - x).abs().flatten(1).amax(1)
    assert (delta <= radii[y] + 1e-6).all()
    for c in range(4):  # each image reaches (about) its own class's radius, beyond eps for the rarer classes
        assert delta[y == c].max() > 0.9 * radii[c]


# ---------------------------------------------------------------- stages (TAET)

def test_stages_switch_framework_and_loss_by_epoch():
    cfg = load_config(CONFIGS / "cifar10_lt/taet.yaml", validate_files=False)
    fw = build_framework(cfg.train, long_tailed_counts(5000, 10, 50))
    assert isinstance(fw, Staged)
    kinds = []
    for epoch in range(cfg.train.epochs):
        fw.set_epoch(epoch)
        kinds.append((type(fw.active).__name__, type(fw.loss).__name__))
    assert kinds[:8] == [("Plain", "MarginCrossEntropy")] * 8  # epochs 1..8 (until_epoch 8, 1-based)
    assert kinds[8:] == [("PGDAT", "EqualisationLoss")] * 12


def test_stage_validation_names_the_key():
    base = CONFIGS / "cifar10_lt/taet.yaml"
    with pytest.raises(ConfigError, match=r"train.stages\[1\].until_epoch"):
        load_config(base, ["train.stages=[{until_epoch: 8, framework: plain}, {until_epoch: 4, loss: ce}]"],
                    validate_files=False)
    with pytest.raises(ConfigError, match=r"train.stages\[0\].lr"):
        load_config(base, ["train.stages=[{until_epoch: 3, lr: 0.1}]"], validate_files=False)
    with pytest.raises(ConfigError, match=r"train.stages\[0\].loss_args.alpha"):
        load_config(base, ["train.stages=[{until_epoch: 3, loss: ce, loss_args: {alpha: 1}}]"], validate_files=False)
    # a stage naming its loss does not inherit the main loss's arguments (harl's alpha would not fit ce)
    load_config(base, ["train.stages=[{until_epoch: 3, loss: ce}]"], validate_files=False)


def test_new_keys_are_validated():
    base = CONFIGS / "cifar10_lt/pgd_at.yaml"
    with pytest.raises(ConfigError, match="data.augment: unknown augment 'randaugmnet'.*randaugment"):
        load_config(base, ["data.augment=randaugmnet"], validate_files=False)
    with pytest.raises(ConfigError, match="data.augment_args"):
        load_config(base, ["data.augment=randaugment", "data.augment_args={magnitude: 40}"], validate_files=False)
    with pytest.raises(ConfigError, match="data.augment_args.nops"):
        load_config(base, ["data.augment=randaugment", "data.augment_args={nops: 2}"], validate_files=False)
    with pytest.raises(ConfigError, match="train.attack.budget: unknown"):
        load_config(base, ["train.attack.budget=classwise"], validate_files=False)
    with pytest.raises(ConfigError, match="train.attack.budget_args"):
        load_config(base, ["train.attack.budget=power", "train.attack.budget_args={tau: -1}"], validate_files=False)


# ---------------------------------------------------------------- augmentation

def _images(n=32, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g).float() / 255


@pytest.mark.parametrize("name,args", [("randaugment", {"num_ops": 2, "magnitude": 8}),
                                       ("randaugment", {"num_ops": 3, "magnitude": 30, "ops": list(OPS)}),
                                       ("autoaugment", {})])
@pytest.mark.parametrize("channels", [1, 3])
def test_augment_keeps_shape_range_and_is_seeded(name, args, channels):
    aug = build_augment(name, args)
    x = _images(c=channels)
    out = aug(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(2)))
    assert not torch.equal(out, x)


def test_magnitude_zero_is_the_identity_for_blends_and_warps():
    ops = ["identity", "brightness", "color", "contrast", "sharpness", "shear_x", "shear_y", "translate_x",
           "translate_y", "rotate"]
    x = _images()
    assert torch.equal(RandAugment(3, 0, ops=ops)(x, torch.Generator().manual_seed(0)), x)


def test_ops_against_hand_computations():
    x = _images(4, 3, 8)
    q = torch.round(x * 255)
    assert torch.equal(posterize(x, torch.full((4,), 3.0)) * 255, torch.floor(q / 32) * 32)
    assert torch.allclose(solarize(x, torch.full((4,), 0.5)), torch.where(x >= 0.5, 1 - x, x))
    assert torch.allclose(rotate(x, torch.full((4,), 90.0)), torch.rot90(x, 1, (2, 3)))  # counter-clockwise
    shifted = translate_x(x, torch.full((4,), 3.0))
    assert torch.equal(shifted[..., 3:], x[..., :-3]) and (shifted[..., :3] == 0).all()
    low = x * 0.5 + 0.25
    stretched = autocontrast(low)
    assert torch.allclose(stretched.amin((2, 3)), torch.zeros(4, 3)) and torch.allclose(
        stretched.amax((2, 3)), torch.ones(4, 3))


def test_equalize_matches_pil():
    pil = pytest.importorskip("PIL.ImageOps")
    from PIL import Image

    x = (_images(6, 3, 16) ** 2 * 200).round() / 255  # skewed histograms
    ours = (equalize(x) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(len(x)):
        arr = (x[i].permute(1, 2, 0) * 255).round().byte().numpy()
        assert np.array_equal(np.asarray(pil.equalize(Image.fromarray(arr))), ours[i])


def test_loader_augmentation_keeps_labels_and_default_draws():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    plain = list(DeviceLoader(x, y, 16, crop_padding=2, flip=True, seed=3))
    default = list(DeviceLoader(x, y, 16, crop_padding=2, flip=True, seed=3, augment="crop_flip"))
    strong = list(DeviceLoader(x, y, 16, crop_padding=2, flip=True, seed=3, augment="randaugment",
                               augment_args={"num_ops": 2, "magnitude": 8}))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, default))
    assert [b[1].tolist() for b in strong] == [b[1].tolist() for b in plain]  # same images, same labels
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(plain, strong))
    again = list(DeviceLoader(x, y, 16, crop_padding=2, flip=True, seed=3, augment="randaugment",
                              augment_args={"num_ops": 2, "magnitude": 8}))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(strong, again))
    assert set(RANDAUGMENT_OPS) <= set(OPS) and isinstance(build_augment("autoaugment"), AutoAugment)


# ---------------------------------------------------------------- balanced robustness

def test_balanced_robustness_is_the_mean_per_class_recall():
    labels = np.array([0] * 6 + [1] * 2 + [2] * 2)        # an imbalanced test set
    correct = np.array([True] * 6 + [False, True] + [False, False])
    m = attack_metrics(correct, correct, labels, [10, 5, 1])
    assert m["accuracy"] == pytest.approx(70.0)
    assert m["balanced_robustness"] == pytest.approx((100 + 50 + 0) / 3)


# ---------------------------------------------------------------- a short run of every new config on digits

DIGITS = [
    "device=cpu", "data.source=digits", "data.path=null", "data.crop_padding=0", "data.flip=false",
    "data.n_max=20", "data.imbalance_ratio=10",
    "model.backbone=small_cnn", "model.backbone_args={in_channels: 1, width: 8}",
    "train.epochs=2", "train.batch_size=64", "train.lr_milestones=[]", "train.channels_last=false",
    "train.attack.steps=1", "train.attack.eps=0.1", "train.attack.step_size=0.1", "train.checkpoint_every=2",
]
EXTRA = {"taet": ["train.stages=[{until_epoch: 1, framework: plain, loss: ce}]"],
         "classwise_eps": ["train.attack.budget_args={alpha: 0.3, warmup_epochs: 1}"]}


@pytest.mark.parametrize("stem", NEW)
def test_new_config_trains_on_digits(stem, tmp_path):
    cfg = load_config(CONFIGS / "cifar10_lt" / f"{stem}.yaml", DIGITS + EXTRA.get(stem, []))
    model = train(cfg, tmp_path / "run", progress=False)
    log = (tmp_path / "run/log.jsonl").read_text().splitlines()
    assert len(log) == 2 and "NaN" not in "".join(log)
    loaded = load_model(tmp_path / "run")
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-5)
    if stem == "taet":  # stage 1 is clean training: no adversarial accuracy logged; stage 2 logs it
        assert "adv_acc" not in log[0] and "adv_acc" in log[1]


@pytest.mark.parametrize("stem", NEW)
def test_new_config_has_a_full_scale_twin(stem):
    cfg = load_config(CONFIGS / "cifar10_lt/full" / f"{stem}.yaml", validate_files=False)
    cpu = load_config(CONFIGS / "cifar10_lt" / f"{stem}.yaml", validate_files=False)
    assert cfg.model.backbone == "wrn34_10" and cfg.train.batch_size == 64 and cfg.train.epochs == 80
    assert (cfg.train.loss, cfg.train.framework, cfg.data.augment) == (cpu.train.loss, cpu.train.framework,
                                                                       cpu.data.augment)
    for stage_full, stage_cpu in zip(cfg.train.stages, cpu.train.stages):  # 40% of the run, as TAET's 40/100
        assert stage_full["until_epoch"] / 80 == stage_cpu["until_epoch"] / 20 == 0.4


# ---------------------------------------------------------------- imbalance-ratio sweep

SWEEP = sorted((CONFIGS / "cifar10_lt/ratio_sweep").glob("*.yaml"))


def test_ratio_sweep_configs_differ_from_their_base_only_in_ratio_and_name():
    """Ratio 50 is the study's own pgd_at and robal_n rows; the sweep adds 10, 20 and 100."""
    assert sorted(p.stem for p in SWEEP) == sorted(f"{m}_r{r}" for m in ("pgd_at", "robal_n")
                                                   for r in (10, 20, 100))
    for path in SWEEP:
        method, ratio = path.stem.rsplit("_r", 1)
        cfg = load_config(path, validate_files=False).to_dict()
        base = load_config(CONFIGS / "cifar10_lt" / f"{method}.yaml", validate_files=False).to_dict()
        assert cfg["data"].pop("imbalance_ratio") == float(ratio)
        base["data"].pop("imbalance_ratio")
        cfg.pop("name"), base.pop("name")
        assert cfg == base
    assert sum(long_tailed_counts(5000, 10, 100)) == 12406 and sum(long_tailed_counts(5000, 10, 50)) == 13996


def test_sweep_and_study_scripts_list_their_runs(tmp_path):
    """Dry runs in a tree without committed results, so every row is listed however far the study has got."""
    for script in ("ratio_sweep.sh", "study.sh"):
        (tmp_path / "scripts").mkdir(exist_ok=True)
        shutil.copy(ROOT / "scripts" / script, tmp_path / "scripts" / script)
        subprocess.run(["bash", "-n", str(tmp_path / "scripts" / script)], check=True)
    shutil.copytree(CONFIGS, tmp_path / "configs")
    env = {**os.environ, "ROBAL": "robal"}
    out = subprocess.run(["bash", "scripts/ratio_sweep.sh", "--dry-run"], cwd=tmp_path, check=True,
                         capture_output=True, text=True, env=env).stdout
    for path in SWEEP:
        assert f"train configs/cifar10_lt/ratio_sweep/{path.stem}.yaml --out runs/cifar10_lt/ratio_sweep/{path.stem}" in out
        assert f"cp runs/cifar10_lt/ratio_sweep/{path.stem}/model.pt docs/results/ratio_sweep/models/{path.stem}.pt" in out
        assert (f"eval runs/cifar10_lt/ratio_sweep/{path.stem} --attacks clean,pgd20,aa-paper --n-test 1000 --checks none"
                in out)
    assert "scripts/ratio_sweep_report.py" in out and "pgd_at_r50" not in out
    study = subprocess.run(["bash", "scripts/study.sh", "--dry-run"], cwd=tmp_path, check=True,
                           capture_output=True, text=True, env=env).stdout
    for stem in NEW:
        assert f"runs/cifar10_lt/{stem}" in study


def test_study_reuses_committed_weights(tmp_path):
    """A row whose weights are committed under docs/results/models/ is copied, not retrained."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/study.sh", tmp_path / "scripts/study.sh")
    (tmp_path / "configs/cifar10_lt").mkdir(parents=True)
    for name in ("kept", "fresh"):
        (tmp_path / f"configs/cifar10_lt/{name}.yaml").write_text("base: pgd_at.yaml\n")
    (tmp_path / "docs/results/models").mkdir(parents=True)
    (tmp_path / "docs/results/models/kept.pt").write_bytes(b"weights")
    out = subprocess.run(["bash", str(tmp_path / "scripts/study.sh"), "--dry-run", "kept", "fresh"],
                         check=True, capture_output=True, text=True, env={**os.environ, "ROBAL": "robal"}).stdout
    assert "+ cp docs/results/models/kept.pt runs/cifar10_lt/kept/model.pt" in out
    assert "train configs/cifar10_lt/kept.yaml" not in out
    assert "+ robal train configs/cifar10_lt/fresh.yaml --out runs/cifar10_lt/fresh" in out


def test_study_keeps_an_unfinished_training_for_the_next_checkout(tmp_path):
    """--save-progress copies the newest epoch checkpoint with config and log to docs/results/progress/NAME
    (replacing the older one there), and an unfinished evaluation's state; a checkout without runs/ copies them
    back before `robal train --resume auto` or `robal eval`; the end of either removes what it no longer needs."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/study.sh", tmp_path / "scripts/study.sh")
    (tmp_path / "configs/cifar10_lt").mkdir(parents=True)
    (tmp_path / "configs/cifar10_lt/long.yaml").write_text("base: pgd_at.yaml\n")
    run = tmp_path / "runs/cifar10_lt/long"
    run.mkdir(parents=True)
    for name in ("config.yaml", "log.jsonl", "epoch_009.pt", "epoch_010.pt"):
        (run / name).write_text(name)
    keep = tmp_path / "docs/results/progress/long"
    keep.mkdir(parents=True)
    (keep / "epoch_004.pt").write_text("older")

    def study(*args):
        return subprocess.run(["bash", str(tmp_path / "scripts/study.sh"), *args], check=True, capture_output=True,
                              text=True, env={**os.environ, "ROBAL": "robal"}).stdout

    study("--save-progress", "long")
    assert sorted(p.name for p in keep.iterdir()) == ["config.yaml", "epoch_010.pt", "log.jsonl"]
    assert (keep / "epoch_010.pt").read_text() == "epoch_010.pt"
    shutil.rmtree(tmp_path / "runs")   # the next sitting's fresh checkout
    out = study("--dry-run", "long")
    restore = (f"+ cp docs/results/progress/long/config.yaml docs/results/progress/long/log.jsonl "
               f"docs/results/progress/long/epoch_010.pt runs/cifar10_lt/long/")
    assert restore in out
    assert out.index(restore) < out.index("+ robal train configs/cifar10_lt/long.yaml --out runs/cifar10_lt/long "
                                          "--resume auto")
    assert "+ rm -r docs/results/progress/long" in out
    assert "= nothing unfinished in runs/cifar10_lt/long" in study("--save-progress", "long")

    # a trained row whose AutoAttack evaluation stopped part-way: its batch-by-batch state travels the same way
    unit = run / "eval_aa.json.partial/units/aa/000003.json"
    unit.parent.mkdir(parents=True)
    (run / "model.pt").write_text("weights")
    unit.write_text("{}")
    study("--save-progress", "long")
    assert (keep / "eval_aa.json.partial/units/aa/000003.json").is_file()
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "docs/results/models").mkdir()
    (tmp_path / "docs/results/models/long.pt").write_text("weights")
    (tmp_path / "docs/results/long.eval_full.json").write_text("{}")
    out = study("--dry-run", "long")
    restore = "+ cp -r docs/results/progress/long/eval_aa.json.partial runs/cifar10_lt/long/"
    assert restore in out and "train" not in out
    assert out.index(restore) < out.index("+ robal eval runs/cifar10_lt/long --attacks aa-paper,aa")
    assert out.index("+ robal eval runs/cifar10_lt/long --attacks aa-paper,aa") < out.index(
        "+ rm -r docs/results/progress/long/eval_aa.json.partial")


def test_study_seed_rows_and_cpu_protocol(tmp_path):
    """NAME_seedN trains NAME.yaml with that seed; --cpu-protocol runs the two cheap evaluations, --subset-1000
    the AA-paper one on the 1,000 images; a row whose JSON is already in docs/results is neither retrained nor
    re-evaluated; post-hoc rows bring PGD-AT first (NAME_e80: the 80-epoch PGD-AT)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/study.sh", tmp_path / "scripts/study.sh")
    (tmp_path / "configs/cifar10_lt/posthoc").mkdir(parents=True)
    for name in ("pgd_at", "pgd_at_e80", "robal_n", "done"):
        (tmp_path / f"configs/cifar10_lt/{name}.yaml").write_text("base: pgd_at.yaml\n")
    (tmp_path / "configs/cifar10_lt/posthoc/la.yaml").write_text("inference: []\n")
    (tmp_path / "configs/cifar10_lt/posthoc/la_e80.yaml").write_text("inference: []\n")
    (tmp_path / "docs/results").mkdir(parents=True)
    for kind in ("eval_clean_10k", "eval_300"):
        (tmp_path / f"docs/results/done.{kind}.json").write_text("{}")
    out = subprocess.run(["bash", str(tmp_path / "scripts/study.sh"), "--dry-run", "--cpu-protocol",
                          "robal_n_seed2", "done", "la"],
                         check=True, capture_output=True, text=True, env={**os.environ, "ROBAL": "robal"}).stdout
    seed_run = "runs/cifar10_lt/robal_n_seed2"
    assert f"+ robal train configs/cifar10_lt/robal_n.yaml --set seed=2 --out {seed_run}" in out
    assert (f"+ robal eval {seed_run} --attacks clean --checks none "
            f"--json {seed_run}/eval_clean_10k.json") in out
    assert f"+ robal eval {seed_run} --attacks clean,pgd20,aa-paper --n-test 300 --json {seed_run}/eval_300.json" in out
    assert "eval_full" not in out and "aa-paper,aa" not in out
    assert "configs/cifar10_lt/done.yaml" not in out and "runs/cifar10_lt/done " not in out
    assert "= docs/results/done.eval_300.json exists" in out
    la = out[out.index("== la"):]
    assert la.index("train configs/cifar10_lt/pgd_at.yaml") < la.index("+ robal adjust runs/cifar10_lt/pgd_at")
    la_e80 = subprocess.run(["bash", str(tmp_path / "scripts/study.sh"), "--dry-run", "la_e80"], check=True,
                            capture_output=True, text=True, env={**os.environ, "ROBAL": "robal"}).stdout
    assert la_e80.index("train configs/cifar10_lt/pgd_at_e80.yaml") < la_e80.index(
        "+ robal adjust runs/cifar10_lt/pgd_at_e80 --inference-file configs/cifar10_lt/posthoc/la_e80.yaml")
    full = subprocess.run(["bash", str(tmp_path / "scripts/study.sh"), "--dry-run", "robal_n_seed2"],
                          check=True, capture_output=True, text=True, env={**os.environ, "ROBAL": "robal"}).stdout
    assert f"--attacks clean,pgd20 --json {seed_run}/eval_full.json" in full
    assert f"--attacks aa-paper,aa --n-test 1000 --json {seed_run}/eval_aa.json" in full
    subset = subprocess.run(["bash", str(tmp_path / "scripts/study.sh"), "--dry-run", "--subset-1000", "robal_n_seed2"],
                            check=True, capture_output=True, text=True, env={**os.environ, "ROBAL": "robal"}).stdout
    assert (f"+ robal eval {seed_run} --attacks clean,pgd20,aa-paper --n-test 1000 --checks none "
            f"--json {seed_run}/eval_1000.json") in subset
    assert "eval_full" not in subset and "eval_300" not in subset and "aa-paper,aa " not in subset


def test_study_configs_folder_keeps_its_runs_and_results_apart(tmp_path):
    """--configs configs/cifar10_lt/full/resnet18 trains that folder's rows into runs/cifar10_lt/full/resnet18 and
    skips rows whose JSONs are in docs/results/full/resnet18, not the CPU rows' docs/results; a folder outside
    configs/cifar10_lt is refused by name."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/study.sh", tmp_path / "scripts/study.sh")
    gpu = tmp_path / "configs/cifar10_lt/full/resnet18"
    gpu.mkdir(parents=True)
    for name in ("pgd_at", "robal_n"):
        (tmp_path / f"configs/cifar10_lt/{name}.yaml").write_text("name: cpu\n")
        (gpu / f"{name}.yaml").write_text("base: ../../pgd_at.yaml\n")
    (tmp_path / "docs/results/full/resnet18").mkdir(parents=True)
    for kind in ("eval_full", "eval_aa"):
        (tmp_path / f"docs/results/pgd_at.{kind}.json").write_text("{}")   # a CPU row's results only
        (tmp_path / f"docs/results/full/resnet18/robal_n.{kind}.json").write_text("{}")

    def study(*args):
        return subprocess.run(["bash", str(tmp_path / "scripts/study.sh"), "--dry-run", *args], capture_output=True,
                              text=True, env={**os.environ, "ROBAL": "robal"})

    out = study("--configs", "configs/cifar10_lt/full/resnet18/", "pgd_at", "robal_n")
    assert out.returncode == 0, out.stderr
    run = "runs/cifar10_lt/full/resnet18/pgd_at"
    assert f"+ robal train configs/cifar10_lt/full/resnet18/pgd_at.yaml --out {run} --resume auto" in out.stdout
    assert f"+ robal eval {run} --attacks aa-paper,aa --n-test 1000 --json {run}/eval_aa.json" in out.stdout
    assert "= docs/results/full/resnet18/robal_n.eval_aa.json exists" in out.stdout
    assert "robal_n.yaml" not in out.stdout
    cpu = study("pgd_at").stdout
    assert "= docs/results/pgd_at.eval_aa.json exists" in cpu and "train" not in cpu
    for folder, why in (("configs/cifar100_lt", "expected configs/cifar10_lt or a folder below it"),
                        ("configs/cifar10_lt/gpu", "no such folder")):
        refused = study("--configs", folder, "pgd_at")
        assert refused.returncode == 2 and f"--configs {folder}: {why}" in refused.stderr


def test_e80_rows_differ_from_their_20_epoch_rows_only_in_the_schedule():
    """Issue 28 item 4: the paper's 80 epochs (lr x0.1 at 60 and 75) at CPU width, nothing else changed."""
    for method in ("pgd_at", "robal_n"):
        cfg = load_config(CONFIGS / f"cifar10_lt/{method}_e80.yaml", validate_files=False).to_dict()
        base = load_config(CONFIGS / f"cifar10_lt/{method}.yaml", validate_files=False).to_dict()
        assert (cfg["train"].pop("epochs"), cfg["train"].pop("lr_milestones")) == (80, [60, 75])
        assert (base["train"].pop("epochs"), base["train"].pop("lr_milestones")) == (20, [15, 18])
        assert cfg.pop("name") == f"cifar10_lt_{method}_e80"
        base.pop("name")
        assert cfg == base
