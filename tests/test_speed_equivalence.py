"""The optimised hot path attacks like a plain fp32 NCHW loop (equivalence, not timing).

A trained model (the shared digits run) and a fixed batch; the plain path is PGD written the way the field's
reference code writes it (loss.backward() on x_adv, parameter gradients zeroed). Same seed, same random start:
in NCHW the Trainer's attack gives bit-identical adversarial images. channels_last runs other oneDNN kernels,
whose float rounding differs in the last bits, so an input-gradient component near zero can flip its sign and
move a pixel by a step; there the test compares adversarial predictions and attack success instead (equal up to
1% of the images).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from robal.evaluate.attacks import attack_predictions
from robal.train.frameworks import TrainingAttack


def plain_pgd(model, x, y, eps, step, steps, start):
    """fp32 NCHW PGD, step by step, from the given random start."""
    x_adv = torch.min(torch.max(x + start, x - eps), x + eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        model.zero_grad()
        F.cross_entropy(model(x_adv), y, reduction="sum").backward()
        x_adv = x_adv.detach() + step * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def random_start(x_like, eps, seed):
    """The start robal's pgd draws after torch.manual_seed(seed): uniform, filled in x_like's memory order."""
    torch.manual_seed(seed)
    return torch.empty_like(x_like).uniform_(-eps, eps).contiguous()


def _setup(digits_run, digits_data, n=256):
    _, cfg, model = digits_run
    x = torch.from_numpy(digits_data.x_test[:n]).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(digits_data.y_test[:n])
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    return cfg, x, y, plain, fast


def _predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def test_trainer_attack_is_the_plain_attack(digits_run, digits_data):
    cfg, x, y, plain, fast = _setup(digits_run, digits_data)
    a = cfg.train.attack
    attack = TrainingAttack(a.eps, a.step_size, a.steps, a.loss, a.loss_args, a.random_start)  # as the Trainer builds it
    reference = plain_pgd(plain, x, y, a.eps, a.step_size, a.steps, random_start(x, a.eps, 0))
    ref_pred = _predict(plain, reference)
    assert 0.05 < (ref_pred != y).float().mean() < 0.95  # the attack succeeds on some images, not all

    # NCHW fp32: bit-identical adversarial images
    torch.manual_seed(0)
    assert torch.equal(attack(plain, x, y), reference)

    # channels_last (the Trainer's format): the same start, the same predictions up to rounding
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    x_adv = attack(fast, x_cl, y)
    start_cl = random_start(x_cl, a.eps, 0)
    reference_cl = plain_pgd(plain, x, y, a.eps, a.step_size, a.steps, start_cl)
    assert (x_adv - x).abs().max() <= a.eps + 1e-6
    assert (x_adv == reference_cl).float().mean() > 0.99
    pred = _predict(fast, x_adv)
    assert (pred == _predict(plain, reference_cl)).float().mean() >= 0.99
    assert abs((pred != y).float().mean() - (_predict(plain, reference_cl) != y).float().mean()) <= 0.01


def test_eval_path_is_the_plain_attack(digits_run, digits_data):
    """robal eval's PGD-20 path (large batches, inference_mode predictions) against plain PGD from the same start:
    image for image the predictions of a plain 20-step loop over the same batch (NCHW fp32 is bit-identical), where
    a 10-step loop differs; and within 1% of a plain per-64 loop (other batch sizes: other float rounding)."""
    cfg, x, y, plain, _ = _setup(digits_run, digits_data)
    e = cfg.eval
    preds = attack_predictions("pgd20", plain, x, y, e.eps, e.step_size, batch_size=len(x), device="cpu", seed=0)
    start = random_start(x, e.eps, 0)  # attack_predictions seeds once, then draws the whole batch's start
    twenty = _predict(plain, plain_pgd(plain, x, y, e.eps, e.step_size, 20, start))
    ten = _predict(plain, plain_pgd(plain, x, y, e.eps, e.step_size, 10, start))
    assert 0.05 < (twenty != y).float().mean() < 0.95
    assert torch.equal(preds, twenty)
    assert (ten != twenty).any()  # so the equality above tells 20 steps from 10
    ref = torch.cat([_predict(plain, plain_pgd(plain, x[i:i + 64], y[i:i + 64], e.eps, e.step_size, 20,
                                               start[i:i + 64])) for i in range(0, len(x), 64)])
    assert (preds == ref).float().mean() >= 0.99


@pytest.mark.parametrize("images_channels_last", [True, False])
@pytest.mark.parametrize("model_format", [torch.channels_last, torch.contiguous_format])
def test_autoattack_takes_channels_last_models_and_images(model_format, images_channels_last):
    """robal eval's images are channels_last-strided (to_images permutes an NHWC array) and the Trainer's models
    channels_last; pyautoattack reshapes input gradients with .view, so it must get NCHW ones (AutoAttackAdapter).
    APGD-T alone, on images all classified as labelled, so its gradient check runs."""
    from robal.models import build_model

    torch.manual_seed(0)
    spec = {"backbone": "small_cnn", "backbone_args": {"width": 4, "in_channels": 3}, "head": "linear",
            "head_args": {}, "class_counts": [1] * 4, "class_names": list("abcd"), "mean": [0.5] * 3, "std": [0.25] * 3}
    model = build_model(spec).eval().to(memory_format=model_format)
    x = torch.rand(12, 8, 8, 3).permute(0, 3, 1, 2)
    if not images_channels_last:
        x = x.contiguous()
    assert x.is_contiguous() != images_channels_last
    y = _predict(model, x)
    preds = attack_predictions("aa:apgd-t", model, x, y, 8 / 255, 2 / 255, batch_size=500, device="cpu")
    assert preds.shape == y.shape
