"""GPU checks (issue 30), marked `gpu`: each runs a piece of robal on DEVICE and holds it against the same
computation on the CPU within the tolerance its docstring states.

DEVICE is ROBAL_GPU_TEST_DEVICE (default cuda); every test is skipped when DEVICE is a CUDA device and this torch
sees none, so `pytest tests` on a CPU machine skips them. scripts/gpu_check.sh runs them on the GPU, and with
`--device cpu --tiny` on the CPU (CPU against CPU: the checks themselves run, the comparisons are then trivial and
the evaluations run once).
Random starts draw from each device's own generator, so attacks with one are compared by accuracy, not image
by image; deterministic computations (a start-free training step, logits, FGSM) are compared value by value.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robal.config import load_config

DEVICE = os.environ.get("ROBAL_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                 reason="no CUDA device (set ROBAL_GPU_TEST_DEVICE=cpu to run these on the CPU)")]
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits_lt/pgd_at.yaml"
N_IMAGES = 100  # test images per attack comparison (10 per class)
TINY = os.environ.get("ROBAL_GPU_TEST_TINY") == "1"  # gpu_check.sh --tiny: fewer images for AA and robal eval
N_AA = 10 if TINY else 50
N_EVAL = 100 if TINY else 200


@pytest.fixture(scope="module")
def images(digits_run, digits_data):
    from robal.evaluate.runner import test_subset, to_images

    idx = test_subset(digits_data.y_test, N_IMAGES)
    return to_images(digits_data.x_test[idx]), torch.as_tensor(digits_data.y_test[idx], dtype=torch.long)


def on(model, device):
    return copy.deepcopy(model).to(device).eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def test_every_gradient_attack_on_the_device_stays_in_the_ball_and_matches_the_cpu(digits_run, images):
    """Each of robal's gradient attacks on DEVICE: images inside the eps-ball and [0, 1] (to 1e-6), accuracy not
    above clean, and within 5 points of the CPU's on 100 images (4 points of slack for different random starts, 1
    for kernels); FGSM, which has no random start, gives the CPU's images to 1e-5 wherever the gradient sign is
    the same, and the CPU's predictions on at least 98 of the 100 images."""
    from robal.attacks import EVAL_ATTACKS

    _, cfg, model = digits_run
    x, y = images
    eps, step = cfg.eval.eps, cfg.eval.step_size
    cpu, dev = on(model, "cpu"), on(model, DEVICE)
    xd, yd = x.to(DEVICE), y.to(DEVICE)
    clean = accuracy(dev, xd, yd)
    assert abs(clean - accuracy(cpu, x, y)) <= 1.0
    for name in EVAL_ATTACKS.names():
        attack = EVAL_ATTACKS.get(name)
        torch.manual_seed(0)
        adv_dev = attack(dev, xd, yd, eps, step)
        torch.manual_seed(0)
        adv_cpu = attack(cpu, x, y, eps, step)
        assert (adv_dev - xd).abs().max().item() <= eps + 1e-6, name
        assert adv_dev.min().item() >= 0 and adv_dev.max().item() <= 1, name
        acc_dev, acc_cpu = accuracy(dev, adv_dev, yd), accuracy(cpu, adv_cpu, y)
        assert acc_dev <= clean and abs(acc_dev - acc_cpu) <= 5.0, (name, acc_dev, acc_cpu)
        if name == "fgsm":
            same = (adv_dev.cpu() - adv_cpu).abs() <= 1e-5
            assert same.float().mean().item() >= 0.99, name
            with torch.no_grad():
                agree = (dev(adv_dev).argmax(1).cpu() == cpu(adv_cpu).argmax(1)).sum().item()
            assert agree >= 98, (name, agree)


def test_autoattack_on_the_device_matches_the_cpu(digits_run, digits_data):
    """AA-paper (APGD-CE + APGD-T) and standard AutoAttack through robal's evaluation on DEVICE: robust accuracy
    within 4 points of the CPU's on 50 images (each version seeded alike; kernels and random draws differ by
    device), never above clean accuracy. (--tiny: 10 images.)"""
    from robal.evaluate.runner import evaluate_model

    run, cfg, model = digits_run
    kw = dict(attacks=["aa-paper", "aa"], eps=cfg.eval.eps, step_size=cfg.eval.step_size,
              class_counts=list(digits_data.class_counts), n_test=N_AA, progress=False)
    dev = evaluate_model(on(model, DEVICE), digits_data.x_test, digits_data.y_test, device=DEVICE, **kw)
    cpu = dev if DEVICE == "cpu" else evaluate_model(on(model, "cpu"), digits_data.x_test, digits_data.y_test,
                                                     device="cpu", **kw)  # on the CPU it would be the same run
    for name in ("aa-paper", "aa"):
        a, b = dev["attacks"][name]["accuracy"], cpu["attacks"][name]["accuracy"]
        assert a <= dev["attacks"]["clean"]["accuracy"] and abs(a - b) <= 4.0, (name, a, b)


def framework_step(name, model, x, y, device):
    """Loss and parameter gradients of one training step of framework `name` on `device`, without a random start."""
    from robal.losses import LOSSES
    from robal.train.frameworks import FRAMEWORKS, TrainingAttack

    counts = [120, 60, 30, 20, 16, 14, 13, 12, 12, 12]
    model = copy.deepcopy(model).to(device).train()
    attack = TrainingAttack(eps=0.1, step_size=0.025, steps=3, loss="kl" if name == "trades" else "ce",
                            start="none", class_counts=counts)
    framework = FRAMEWORKS.build(name, {}, loss=LOSSES.build("ce", {}, class_counts=counts).to(device),
                                 attack=attack, class_counts=counts)
    framework.set_epoch(0)
    loss, _, _ = framework(model, x.to(device), y.to(device))
    loss.backward()
    grads = torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads


def test_one_training_step_of_every_framework_matches_the_cpu(digits_run, images):
    """One step of each training framework (plain, PGD-AT, FGSM-AT, TRADES, MART, REAT) from the same weights on
    the same 100 images, the attack without a random start: loss within 1e-4 (relative) of the CPU's, parameter
    gradients within 1e-3 of the gradient's largest entry."""
    from robal.train.frameworks import FRAMEWORKS

    _, _, model = digits_run
    x, y = images
    for name in FRAMEWORKS.names():
        loss_dev, g_dev = framework_step(name, model, x, y, DEVICE)
        loss_cpu, g_cpu = framework_step(name, model, x, y, "cpu")
        assert loss_dev == pytest.approx(loss_cpu, rel=1e-4), name
        assert (g_dev - g_cpu).abs().max().item() <= 1e-3 * g_cpu.abs().max().item(), name


def test_cosine_head_and_robal_loss_match_the_cpu():
    """RoBal's scale-invariant cosine head (gamma 1/32) and its loss on DEVICE: cosines within 1e-5 of the CPU's,
    every cosine in [-1, 1]; the RoBal loss within 1e-5 (relative)."""
    from robal.losses import LOSSES
    from robal.models.heads import HEADS

    torch.manual_seed(0)
    counts = [500, 200, 80, 30, 10]
    head = HEADS.build("cosine", {"gamma": 1 / 32}, in_features=64, num_classes=5, class_counts=counts)
    f, y = torch.randn(256, 64) * 3, torch.randint(0, 5, (256,))
    loss = LOSSES.build("robal", {"m0": 0.1, "tau_b": 1.2, "s": 10.0}, class_counts=counts)
    with torch.no_grad():
        z_cpu, z_dev = head(f), copy.deepcopy(head).to(DEVICE)(f.to(DEVICE)).cpu()
        l_cpu = loss(z_cpu, y).item()
        l_dev = copy.deepcopy(loss).to(DEVICE)(z_dev.to(DEVICE), y.to(DEVICE)).item()
    assert (z_dev - z_cpu).abs().max().item() <= 1e-5 and z_dev.abs().max().item() <= 1.0
    assert l_dev == pytest.approx(l_cpu, rel=1e-5)


def tiny_config(device, *extra):
    return load_config(DIGITS, ["model.backbone_args.width=8", "train.epochs=3", "train.lr_milestones=[]",
                                "train.checkpoint_every=1", "train.keep_last=3", f"device={device}", *extra])


def test_checkpoint_and_resume_on_the_device(tmp_path):
    """Three epochs on DEVICE, and the same run resumed from its first epoch's checkpoint: final weights within
    1e-5 of each other (GPU kernels may differ in the last bits from run to run; on the CPU they are equal);
    the checkpoint loads on the CPU and predicts as on DEVICE (logits within 1e-4)."""
    from robal.train.checkpoint import load_model, read_checkpoint
    from robal.train.trainer import train

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_config(DEVICE), full, progress=False)
    resumed.mkdir()
    for name in ("config.yaml", "epoch_001.pt", "log.jsonl"):
        shutil.copy(full / name, resumed / name)
    train(tiny_config(DEVICE), resumed, resume=True, progress=False)
    a, b = (read_checkpoint(r / "model.pt")["state_dict"] for r in (full, resumed))
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff <= 1e-5, diff
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        z_cpu = load_model(full / "model.pt", "cpu")(x)
        z_dev = load_model(full / "model.pt", DEVICE)(x.to(DEVICE)).cpu()
    assert (z_cpu - z_dev).abs().max().item() <= 1e-4


def test_eval_json_on_the_device_matches_the_cpu(digits_run, tmp_path):
    """`robal eval --device DEVICE` writes the JSON the CPU writes: the same images and labels, clean accuracy
    within 1 point (borderline images may flip with the kernels), PGD-20 within 5, the reliability checks giving
    the CPU's verdicts and none failing; 200 images (--tiny: 100)."""
    run = digits_run[0]
    results = {}
    for device in dict.fromkeys((DEVICE, "cpu")):  # one run when DEVICE is the CPU
        out = tmp_path / f"eval_{device.replace(':', '_')}.json"
        subprocess.run([sys.executable, "-m", "robal", "eval", str(run), "--attacks", "clean,pgd20", "--n-test",
                        str(N_EVAL), "--device", device, "--json", str(out)], check=True, capture_output=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        results[device] = json.loads(out.read_text())
    dev, cpu = results[DEVICE], results["cpu"]  # the same JSON when DEVICE is the CPU
    assert dev["labels"] == cpu["labels"] and dev["n_test"] == cpu["n_test"] == N_EVAL
    for name, tolerance in (("clean", 1.0), ("pgd20", 5.0)):
        assert abs(dev["attacks"][name]["accuracy"] - cpu["attacks"][name]["accuracy"]) <= tolerance, name
    verdicts = [[(c["name"], c["status"]) for c in result["checks"]] for result in (dev, cpu)]
    assert verdicts[0] == verdicts[1] and all(status != "fail" for _, status in verdicts[0]), verdicts


def test_bf16_autocast_keeps_attack_gradients_and_accuracy_close(digits_run, images):
    """bf16 autocast against fp32 on DEVICE for a trained model: the signs of the input gradient (what PGD steps
    along) agree on at least 90% of the pixels, and clean and PGD-20 accuracy (no random start) within 5 points
    on 100 images. bench_bf16.py measures the same on the CIFAR-10-LT models."""
    from robal.attacks.gradient import pgd

    _, cfg, model = digits_run
    x, y = (t.to(DEVICE) for t in images)
    dev = on(model, DEVICE)

    def run(dtype):
        ctx = torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16) if dtype else torch.autocast(
            torch.device(DEVICE).type, enabled=False)
        with ctx:
            xg = x.clone().requires_grad_(True)
            torch.nn.functional.cross_entropy(dev(xg).float(), y).backward()
            adv = pgd(dev, x, y, cfg.eval.eps, cfg.eval.step_size, 20, random_start=False)
            with torch.no_grad():
                return xg.grad.sign(), accuracy(dev, x, y), accuracy(dev, adv, y)

    s32, clean32, pgd32 = run(None)
    s16, clean16, pgd16 = run(torch.bfloat16)
    assert (s32 == s16).float().mean().item() >= 0.90
    assert abs(clean16 - clean32) <= 5.0 and abs(pgd16 - pgd32) <= 5.0
