"""Core: long-tail counts and subsets, on-device batching, models, attacks, schedule, trainer, checkpoints, CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import robal
from robal.attacks import EVAL_ATTACKS, fgsm, pgd
from robal.data import long_tailed_counts, matched_balanced_counts, subsample_indices
from robal.data.loader import DeviceLoader, random_crop_flip
from robal.models import build_model
from robal.train.trainer import step_lr


# ---------------------------------------------------------------- long-tailed counts and subsets

def test_cifar10_lt_ratio_50_counts():
    counts = long_tailed_counts(5000, 10, 50)
    assert counts == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
    assert sum(counts) == 13_996


def test_other_published_totals():
    assert sum(long_tailed_counts(5000, 10, 100)) == 12_406
    assert sum(long_tailed_counts(500, 100, 10)) == 19_573


def test_step_profile_and_balanced():
    assert long_tailed_counts(100, 4, 10, "step") == [100, 100, 10, 10]
    assert long_tailed_counts(100, 3, 1) == [100, 100, 100]
    assert matched_balanced_counts(13_996, 10) == [1400] * 10


@pytest.mark.parametrize("ratio", [0.5, 0.02, -3])
def test_ratio_below_one_is_rejected_with_the_accepted_form(ratio):
    with pytest.raises(ValueError, match=r"n_max / n_min >= 1"):
        long_tailed_counts(5000, 10, ratio)


def test_subset_is_seeded_and_per_class():
    labels = np.repeat(np.arange(3), 50)
    a = subsample_indices(labels, [50, 20, 5], seed=0)
    assert np.bincount(labels[a]).tolist() == [50, 20, 5]
    assert np.array_equal(a, subsample_indices(labels, [50, 20, 5], seed=0))
    assert not np.array_equal(a, subsample_indices(labels, [50, 20, 5], seed=1))
    # the usual recipe: one legacy RandomState shuffling each class in turn
    rng = np.random.RandomState(0)
    expected = []
    for c, n in enumerate([50, 20, 5]):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        expected.append(idx[:n])
    assert np.array_equal(a, np.concatenate(expected))


# ---------------------------------------------------------------- batching and augmentation on the device

def test_crop_flip_keeps_shape_and_takes_shifted_windows():
    x = torch.rand(16, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, flip=True, generator=g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):  # every output is some window of the padded image, possibly mirrored
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    assert torch.equal(random_crop_flip(x, 0, False, g), x)


def test_loader_epoch_covers_every_image_once_and_is_seeded():
    x = np.random.RandomState(0).randint(0, 255, (50, 4, 4, 3), dtype=np.uint8)
    y = np.arange(50) % 5
    loader = DeviceLoader(x, y, batch_size=16, seed=3)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(y.tolist())
    assert batches[0][0].shape == (16, 3, 4, 4) and 0 <= batches[0][0].min() and batches[0][0].max() <= 1
    again = list(DeviceLoader(x, y, batch_size=16, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


# ---------------------------------------------------------------- models

def _spec(backbone, args, channels=3):
    return {"backbone": backbone, "backbone_args": {**args, "in_channels": channels}, "head": "linear",
            "head_args": {}, "class_counts": [5, 3, 1], "mean": [0.5] * channels, "std": [0.25] * channels,
            "inference": []}


@pytest.mark.parametrize("backbone,args,size,channels", [
    ("preact_resnet18", {"width": 4}, 32, 3), ("resnet18", {"width": 4}, 32, 3),
    ("wrn34_10", {"depth": 10, "widen": 1}, 32, 3), ("small_cnn", {"width": 4}, 8, 1)])
def test_backbones_map_images_to_logits(backbone, args, size, channels):
    model = build_model(_spec(backbone, args, channels)).eval()
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_model_owns_normalisation():
    model = build_model(_spec("small_cnn", {"width": 4}, 1)).eval()
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(model.features(x), model.backbone((x - 0.5) / 0.25))


# ---------------------------------------------------------------- attacks

def reference_attack(name, model, x, y, eps, step):
    """The evaluation attacks as the field's reference code writes them (fp32, loss.backward() on the images):
    FGSM one eps step from x; PGD-20 with step `step` from a uniform start in the eps-ball (drawn after
    torch.manual_seed(0)); MIM the same with momentum 1.0 on L1-normalised gradients; CW PGD-20 on the margin
    max_{k != y} z_k - z_y clamped at 50."""
    torch.manual_seed(0)
    steps, size = (1, eps) if name == "fgsm" else (20, step)
    x_adv = x.clone() if name == "fgsm" else x + torch.empty_like(x).uniform_(-eps, eps)
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    momentum = torch.zeros_like(x)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        z = model(x_adv)
        if name == "cw":
            true = z.gather(1, y[:, None]).squeeze(1)
            other = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), -1e9).max(1).values
            loss = torch.clamp(other - true, max=50.0).sum()
        else:
            loss = torch.nn.functional.cross_entropy(z, y, reduction="sum")
        loss.backward()
        grad = x_adv.grad
        if name == "mim":
            momentum = momentum + grad / grad.abs().mean((1, 2, 3), keepdim=True)
            grad = momentum
        x_adv = torch.min(torch.max(x_adv.detach() + size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


@pytest.mark.parametrize("name", ["fgsm", "pgd20", "mim", "cw"])
def test_attacks_stay_in_the_ball_and_box_and_match_a_reference_attack(name, digits_run, digits_data):
    """Each named attack gives the reference implementation's images (up to float rounding) on a trained model,
    so it is as strong as the published attack, and it costs the model a good part of its clean accuracy."""
    _, cfg, model = digits_run
    x = torch.from_numpy(digits_data.x_test[:250]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(digits_data.y_test[:250])
    eps = cfg.eval.eps
    torch.manual_seed(0)
    x_adv = EVAL_ATTACKS.get(name)(model, x, y, eps, cfg.eval.step_size)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    reference = reference_attack(name, model, x, y, eps, cfg.eval.step_size)
    assert (x_adv == reference).float().mean() > 0.99
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        pred = model(x_adv).argmax(1)
        assert (pred == model(reference).argmax(1)).float().mean() >= 0.99
    robust = (pred == y).float().mean()
    assert clean > 0.45
    assert robust < clean - 0.08


def test_eps_zero_changes_nothing(digits_run, digits_data):
    model = digits_run[2]
    x = torch.from_numpy(digits_data.x_test[:20]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(digits_data.y_test[:20])
    assert torch.equal(pgd(model, x, y, 0.0, 0.01, 10), x)
    assert torch.equal(fgsm(model, x, y, 0.0), x)


def test_pgd_restarts_keep_the_strongest(digits_run, digits_data):
    from robal.attacks import ce_loss

    model = digits_run[2]
    x = torch.from_numpy(digits_data.x_test[:100]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(digits_data.y_test[:100])
    torch.manual_seed(0)
    one = ce_loss(model(pgd(model, x, y, 0.1, 0.025, 3)), y)
    torch.manual_seed(0)
    three = ce_loss(model(pgd(model, x, y, 0.1, 0.025, 3, restarts=3)), y)
    assert (three >= one - 1e-5).all()  # the first restart is the same draw, and the best is kept


# ---------------------------------------------------------------- schedule

def test_step_schedule_is_exact_not_compounding():
    lrs = [step_lr(0.1, e, [60, 75], 0.1) for e in range(1, 81)]
    assert lrs[:59] == [0.1] * 59
    assert all(abs(lr - 0.01) < 1e-12 for lr in lrs[59:74])
    assert all(abs(lr - 0.001) < 1e-12 for lr in lrs[74:])


# ---------------------------------------------------------------- trainer, checkpoints, CLI

def test_training_logs_and_checkpoint_round_trip(digits_run, digits_data):
    out, cfg, model = digits_run
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, cfg.train.epochs + 1))
    assert {"loss", "clean_acc", "adv_acc", "lr", "seconds"} <= set(log[-1])
    assert log[-1]["loss"] < log[0]["loss"]
    loaded = robal.load_model(out / "model.pt")
    assert not loaded.training
    x = torch.from_numpy(digits_data.x_test[:32]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(robal.load_model(out)(x), loaded(x))  # a run directory works too


def test_trainer_refuses_to_overwrite_a_run(digits_run):
    from robal.train.trainer import prepare_run_dir

    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_run_dir(digits_run[0], digits_run[1].to_dict(), resume=False, overwrite=False)


def test_cli_train_and_eval_end_to_end(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "robal"]
    cfg = "configs/digits_lt/pgd_at.yaml"
    sets = ["--set", "train.epochs=2", "--set", "train.lr_milestones=[]", "--set", "model.backbone_args.width=8"]
    subprocess.run(base + ["train", cfg, *sets, "--out", str(run), "--quiet"], check=True, capture_output=True)
    again = subprocess.run(base + ["train", cfg, *sets, "--out", str(run), "--quiet"], capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr
    out = tmp_path / "eval.json"
    res = subprocess.run(base + ["eval", str(run), "--attacks", "clean,fgsm,pgd20", "--n-test", "100",
                                 "--json", str(out)], check=True, capture_output=True, text=True)
    assert "overall" in res.stdout and "worst class" in res.stdout
    result = json.loads(out.read_text())
    assert set(result["attacks"]) == {"clean", "fgsm", "pgd20"}
    assert result["n_test"] == 100 and len(result["class_counts"]) == 10
    for name, att in result["attacks"].items():
        assert len(att["per_class"]) == 10
        # a balanced test subset: the overall accuracy is the mean of the per-class accuracies
        assert att["accuracy"] == pytest.approx(np.mean(att["per_class"]))
    assert all(c["status"] in ("pass", "warn", "fail") for c in result["checks"])


def test_dry_run_prints_counts():
    res = subprocess.run([sys.executable, "-m", "robal", "train", "configs/digits_lt/pgd_at.yaml", "--dry-run"],
                         check=True, capture_output=True, text=True)
    assert "class counts (486 images): [120, 92, 71, 55, 43, 33, 25, 20, 15, 12]" in res.stdout
