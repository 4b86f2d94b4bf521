"""framework: fgsm_at (Wong et al. 2020) and the catastrophic-overfitting guard (train.overfit_guard)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robal.cli import main
from robal.config import load_config
from robal.registry import ConfigError
from robal.train.checkpoint import atomic_save, model_checkpoint, read_checkpoint
from robal.train.frameworks import FRAMEWORKS, TrainingAttack
from robal.train.guard import GuardSettings, OverfitGuard
from robal.train.trainer import TrainingDiverged

CONFIGS = Path(__file__).resolve().parents[1] / "src/robal/configs"
DIGITS = CONFIGS / "digits_lt/pgd_at.yaml"
TINY = ["model.backbone_args.width=8", "train.lr_milestones=[]"]


class Ramp(nn.Module):
    """Logits [s * w.x + a, -(s * w.x + a)] with w > 0: for label 0 the loss grows as pixels decrease, so the
    sign of the input gradient is -1 everywhere."""

    def __init__(self, s=1.0, a=0.0):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s)))
        self.a = a
        self.spec = {}

    def forward(self, x):
        z = self.s * x.flatten(1).mean(1) * 50 + self.a
        return torch.stack([z, -z], 1)

    training_logits = forward


def fgsm(step=1.25, beta=0.0, eps=8 / 255, loss=None):
    attack = TrainingAttack(eps=eps, step_size=2 / 255, steps=5)  # steps and step_size: not used by fgsm_at
    return FRAMEWORKS.get("fgsm_at")(loss or (lambda z, y, w=None: F.cross_entropy(z, y)), attack, step=step,
                                     beta=beta)


def test_fgsm_at_takes_one_step_of_1_25_eps_from_a_uniform_start():
    eps = 8 / 255
    x, y = torch.full((4, 3, 8, 8), 0.5), torch.zeros(4, dtype=torch.long)
    model = Ramp()
    seen = {}
    framework = fgsm(loss=lambda z, y, w=None: seen.setdefault("z", z).sum())
    torch.manual_seed(0)
    framework(model, x, y)
    torch.manual_seed(0)
    start = torch.empty_like(x).uniform_(-eps, eps)  # the same draw as the framework's random start
    expected = x + torch.clamp(start - 1.25 * eps, min=-eps)  # one step down (gradient sign -1), projected
    assert torch.allclose(seen["z"], model(expected), atol=1e-5)  # the loss is taken on that point
    moved = start - 1.25 * eps
    inside = moved > -eps
    assert 0.3 < inside.float().mean() < 0.45  # start > eps/4: 3/8 of the pixels end inside the ball


def test_fgsm_at_step_and_beta():
    eps = 8 / 255
    x, y = torch.full((2, 3, 4, 4), 0.5), torch.zeros(2, dtype=torch.long)
    model = Ramp(s=0.1)  # unsaturated probabilities: a KL term that shows
    torch.manual_seed(1)
    start = torch.empty_like(x).uniform_(-eps, eps)
    torch.manual_seed(1)
    loss, z_nat, z_adv = fgsm(step=0.5)(model, x, y)
    assert z_nat is None and torch.allclose(z_adv, model(x + torch.clamp(start - 0.5 * eps, min=-eps)), atol=1e-5)
    torch.manual_seed(1)
    loss_kl, z_nat, z_adv = fgsm(step=0.5, beta=6.0)(model, x, y)
    kl = F.kl_div(F.log_softmax(z_adv, 1), F.softmax(z_nat, 1), reduction="none").sum(1).mean()
    assert torch.allclose(loss_kl, loss + 6.0 * kl) and kl > 0
    with pytest.raises(ValueError, match=r"train.framework_args.step must be > 0"):
        fgsm(step=0.0)


@pytest.mark.parametrize("config, overrides", [
    ("digits_lt/pgd_at.yaml", ["train.loss=ce"]),
    ("digits_lt/pgd_at.yaml", ["train.loss=focal"]),
    ("digits_lt/pgd_at.yaml", ["train.loss=logit_adjust"]),
    ("digits_lt/robal_n.yaml", ["train.framework_args={beta: 6.0}"]),  # RoBal's loss, cosine head and KL term
], ids=["ce", "focal", "logit_adjust", "robal"])
def test_fgsm_at_composes_with_losses_and_robal(config, overrides, capsys):
    args = ["train", str(CONFIGS / config), "--dry-run", "--set", "train.framework=fgsm_at"]
    for o in TINY + overrides:
        args += ["--set", o]
    assert main(args) == 0, capsys.readouterr().err


def test_an_fgsm_at_run_logs_the_guard_every_epoch(tmp_path):
    from robal.train.trainer import train

    cfg = load_config(DIGITS, TINY + ["train.framework=fgsm_at", "train.epochs=4", "train.checkpoint_every=1",
                                      "train.overfit_guard={action: stop}"])
    train(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert all(0 <= r["guard_pgd_acc"] <= 100 and "guard_collapse" not in r for r in records)
    assert records[-1]["guard_pgd_acc"] > records[0]["guard_pgd_acc"] and records[-1]["adv_acc"] > 30
    assert (tmp_path / "run/model.pt").is_file()


# ---------------------------------------------------------------- the guard on a collapse made by construction

def guard_for(tmp_path, action, drop=20.0):
    x = np.full((8, 4, 4, 3), 128, np.uint8)
    return OverfitGuard(GuardSettings(action=action, drop=drop, steps=3), x, np.zeros(8, np.int64), 0.1, "cpu",
                        tmp_path, main=True)


def robust():
    return Ramp(s=0.0, a=1.0)  # logits do not depend on the input: PGD cannot move them


def fragile():
    return Ramp(s=1.0, a=-24.5)  # logit 0.6 on the grey batch: a step of 0.1 down makes it -4.4, class 1


def checkpoint(model, tmp_path, epoch):
    atomic_save(model_checkpoint(model, {"epoch": epoch}), tmp_path / f"epoch_{epoch:03d}.pt")


def test_the_guard_logs_a_collapse_and_training_goes_on(tmp_path, capsys):
    guard, records = guard_for(tmp_path, "log"), [{}, {}, {}]
    rng = torch.get_rng_state()
    assert guard.after_epoch(robust(), 0, records[0]) is False and records[0]["guard_pgd_acc"] == 100.0
    assert torch.equal(torch.get_rng_state(), rng)  # its own random start: training's stream untouched
    assert guard.after_epoch(fragile(), 1, records[1]) is False
    assert records[1] == {"guard_pgd_acc": 0.0, "guard_collapse": True}
    assert "catastrophic overfitting at epoch 2: PGD-3 accuracy on the held-out batch (8 images, eps 0.1) fell to " \
           "0.0% from 100.0% at epoch 1" in capsys.readouterr().err
    assert not (tmp_path / "log.jsonl").exists()  # the trainer logs the record itself


def test_the_guard_stops_the_run_keeping_the_checkpoints(tmp_path):
    guard = guard_for(tmp_path, "stop")
    guard.after_epoch(robust(), 0, {})
    checkpoint(robust(), tmp_path, 1)
    with pytest.raises(TrainingDiverged, match=r"epoch 2: .* the run stops \(train.overfit_guard.action: stop\); "
                                               r"the last good checkpoint, .*epoch_001.pt, is kept"):
        guard.after_epoch(fragile(), 1, {"epoch": 2})
    assert json.loads((tmp_path / "log.jsonl").read_text())["guard_collapse"] is True


def test_the_guard_restores_the_last_good_checkpoint(tmp_path):
    guard, model = guard_for(tmp_path, "restore"), robust()
    guard.after_epoch(model, 0, {"epoch": 1})
    checkpoint(model, tmp_path, 1)
    with torch.no_grad():
        model.s.fill_(1.0)
        model.a = -24.5  # (not a parameter: the offset that makes it fragile)
    record = {"epoch": 2}
    assert guard.after_epoch(model, 1, record) is True  # the run ends here
    assert model.s.item() == 0.0 and record["guard_restored"] == 1
    assert json.loads((tmp_path / "log.jsonl").read_text())["guard_restored"] == 1


def test_a_resumed_guard_takes_the_best_from_the_log(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 1, "guard_pgd_acc": 100.0}) + "\n")
    guard, record = guard_for(tmp_path, "log"), {}
    guard.after_epoch(fragile(), 1, record)
    assert record["guard_collapse"] is True


@pytest.mark.parametrize("value, message", [
    ("{action: halt}", r"train.overfit_guard.action: must be one of off, log, stop, restore"),
    ("{action: stop, drop: 0}", r"train.overfit_guard.drop: must be accuracy points in \(0, 100\]"),
    ("{action: stop, steps: 0}", r"train.overfit_guard.steps: must be an integer >= 1"),
    ("{action: stop, imgs: 5}", r"train.overfit_guard.imgs: unknown key \(did you mean 'images'\?\)"),
])
def test_guard_settings_are_validated_by_name(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, [f"train.overfit_guard={value}"])


def test_the_guard_fires_in_a_run_made_to_lose_its_robustness(tmp_path):
    """Three epochs of fgsm_at, then plain training: PGD accuracy on the held-out batch falls; with `restore`
    the run ends at the collapse with the last good checkpoint's weights as model.pt."""
    from robal.train.trainer import train

    cfg = load_config(DIGITS, TINY + ["train.framework=plain", "train.stages=[{until_epoch: 3, framework: fgsm_at}]",
                                      "train.epochs=12", "train.checkpoint_every=1",
                                      "train.overfit_guard={action: restore, drop: 15}"])
    train(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last.get("guard_collapse") is True and last["epoch"] < 12, [r.get("guard_pgd_acc") for r in records]
    assert last["epoch"] > 3  # during plain training
    assert last["guard_pgd_acc"] < max(r["guard_pgd_acc"] for r in records[:-1]) - 15
    restored = tmp_path / f"run/epoch_{last['guard_restored']:03d}.pt"
    assert last["guard_restored"] == last["epoch"] - 1 and restored.is_file()
    final, good = read_checkpoint(tmp_path / "run/model.pt"), read_checkpoint(restored)
    assert all(torch.equal(final["state_dict"][k], good["state_dict"][k]) for k in good["state_dict"])
    assert not (tmp_path / f"run/epoch_{last['epoch']:03d}.pt").exists()  # the collapsed epoch is not saved
