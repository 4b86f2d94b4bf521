"""RoBal: scale-invariant cosine head, margin-engineered loss, boundary adjustment, self-contained checkpoints."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import robal
from robal.losses import LOSSES, robal_margins
from robal.models.adjust import ADJUSTMENTS
from robal.models.heads import CosineHead

COUNTS = [100, 10, 1]


def test_robal_loss_equals_hand_computation():
    m0, tau_m, tau_b, s = 0.1, 0.3, 1.5, 10.0
    loss = LOSSES.build("robal", {"m0": m0, "tau_m": tau_m, "tau_b": tau_b, "s": s}, class_counts=COUNTS)
    z = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.5, 0.1], [0.0, -0.4, 0.6]])
    y = torch.tensor([0, 1, 2])
    pi = np.array(COUNTS) / sum(COUNTS)
    expected = []
    for row, target in zip(z.tolist(), y.tolist()):
        margin = m0 + (tau_m / s) * math.log(COUNTS[target] / min(COUNTS))
        logits = [s * (v - (margin if c == target else 0.0)) + tau_b * math.log(pi[c]) for c, v in enumerate(row)]
        expected.append(-logits[target] + math.log(sum(math.exp(v) for v in logits)))
    assert loss(z, y).item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_robal_margins_grow_with_class_size_only_through_tau_m():
    assert robal_margins(COUNTS, 0.1, 0.0, 10.0).tolist() == pytest.approx([0.1, 0.1, 0.1])
    m = robal_margins(COUNTS, 0.1, 0.3, 10.0)
    assert m.tolist() == pytest.approx([0.1 + 0.03 * math.log(100), 0.1 + 0.03 * math.log(10), 0.1])


def test_cosine_head_is_scale_invariant_up_to_gamma():
    torch.manual_seed(0)
    head = CosineHead(8, 3, gamma=1 / 32)
    f = torch.randn(5, 8)
    z = head(f)
    assert torch.allclose(head(7.0 * f), z, atol=1e-6)  # features: exactly invariant
    w = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.mul_(100.0)  # weights: invariant but for gamma's share of the norm
    unit_f = f / f.norm(dim=1, keepdim=True)
    expected = unit_f @ (100 * w / (100 * w.norm(dim=1, keepdim=True) + 1 / 32)).t()
    assert torch.allclose(head(f), expected, atol=1e-6)
    plain = CosineHead(8, 3, gamma=0.0)
    before = plain(f)
    with torch.no_grad():
        plain.weight.mul_(100.0)
    assert torch.allclose(plain(f), before, atol=1e-6)


def test_boundary_adjustment_moves_predictions_to_tail_classes():
    scale = ADJUSTMENTS.build("scale", {"s": 10.0}, class_counts=COUNTS)
    adjust = ADJUSTMENTS.build("logit_adjust", {"tau": 1.0}, class_counts=COUNTS)
    z = torch.tensor([[0.30, 0.25, 0.20]])  # head class wins by a small cosine margin
    logits = adjust(scale(z, None, None), None, None)
    pi = torch.tensor(COUNTS, dtype=torch.float) / sum(COUNTS)
    assert torch.allclose(logits, 10 * z - torch.log(pi))
    assert z.argmax().item() == 0 and logits.argmax().item() == 2
    small = ADJUSTMENTS.build("logit_adjust", {"tau": 0.01}, class_counts=COUNTS)
    assert small(scale(z, None, None), None, None).argmax().item() == 0


@pytest.fixture(scope="module")
def robal_run(tmp_path_factory):
    from robal.config import load_config
    from robal.demo import builtin_config
    from robal.train.trainer import train

    out = tmp_path_factory.mktemp("robal") / "run"
    cfg = load_config(builtin_config("digits_lt/robal_n.yaml"),
                      ["train.epochs=3", "train.lr_milestones=[]", "model.backbone_args.width=8",
                       "data.val_per_class=4"])
    model = train(cfg, out, progress=False)
    return out, cfg, model.eval()


def test_checkpoint_carries_the_boundary_adjustment(robal_run):
    out, cfg, model = robal_run
    loaded = robal.load_model(out / "model.pt")
    assert loaded.spec["inference"] == [{"name": "scale", "s": 10.0}, {"name": "logit_adjust", "tau": 0.1}]
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        z = loaded.head(loaded.features(x))
        pi = torch.tensor(loaded.spec["class_counts"], dtype=torch.float)
        pi = pi / pi.sum()
        assert torch.allclose(loaded(x), 10 * z - 0.1 * torch.log(pi), atol=1e-5)


def test_eval_tau_p_override_is_recorded(robal_run, tmp_path):
    import json

    out = tmp_path / "e.json"
    subprocess.run([sys.executable, "-m", "robal", "eval", str(robal_run[0]), "--attacks", "clean",
                    "--tau-p", "0.7", "--json", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["inference"][-1] == {"name": "logit_adjust", "tau": 0.7}
    assert result["inference_overridden"] is True


def test_tune_tau_uses_the_held_out_split_only(robal_run):
    from robal.data import prepare_data
    from robal.evaluate.tune import tune_tau

    out, cfg, model = robal_run
    data = prepare_data(cfg.data)
    assert len(data.y_val) == 40 and sum(data.class_counts) + 40 == 486
    # the validation images are not among the training images
    train_rows = {row.tobytes() for row in data.x_train}
    assert sum(row.tobytes() in train_rows for row in data.x_val) <= 2  # digits has a few exact duplicates
    result = tune_tau(model, data.x_val, data.y_val, [0.0, 0.5, 3.0], "fgsm", cfg.eval.eps, cfg.eval.step_size)
    assert result["n_val"] == 40 and [r["tau_p"] for r in result["candidates"]] == [0.0, 0.5, 3.0]
    best = max(result["candidates"], key=lambda r: (r["clean"] + r["fgsm"]) / 2)
    assert result["best_tau_p"] == best["tau_p"]
    assert model.spec["inference"][-1]["tau"] == 0.1  # restored afterwards


def test_tune_tau_refuses_a_run_without_a_validation_split(digits_run, digits_data):
    from robal.evaluate.tune import tune_tau

    with pytest.raises(ValueError, match="val_per_class"):
        tune_tau(digits_run[2], digits_data.x_val, digits_data.y_val, [0.1], "fgsm", 0.1, 0.025)


def test_demo_compares_pgd_at_and_robal_per_class(tmp_path, capsys):
    from robal.demo import run_demo

    results = run_demo(str(tmp_path), epochs=2)
    out = capsys.readouterr().out
    assert set(results) == {"PGD-AT", "RoBal-N"}
    assert "PGD-20 gain" in out and "eps 0.1" in out
    for label in results:
        assert len(results[label]["attacks"]["pgd20"]["per_class"]) == 10
    assert (tmp_path / "robal_n" / "model.pt").is_file() and (tmp_path / "pgd_at" / "model.pt").is_file()
