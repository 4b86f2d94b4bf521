"""Tests that pin the science: every attack update, training framework, loss, head and metric against a hand
computation.

Each expected number is computed here, from its formula, with numpy in float64 (or plain arithmetic), never by
calling the code under test. The attacks are checked on a linear model z = W x + b, whose input gradients have
closed forms: CE  W^T (softmax(z) - e_y);  KL(p || softmax(z))  W^T (softmax(z) - p);  CW margin  W_k - W_y
(k the strongest other class). `scripts/mutation_check.py` plants small realistic bugs in src/robal and checks
that these tests (with the older hand-computation tests) catch every one.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robal
from robal.attacks import EVAL_ATTACKS, cw_loss, fgsm, kl_loss, pgd
from robal.config import load_config
from robal.data.longtail import long_tailed_counts
from robal.evaluate.metrics import attack_metrics, class_groups, class_thirds, standard_error, strongest
from robal.evaluate.report import in_tail_third
from robal.losses import LOSSES
from robal.models import build_model
from robal.models.heads import HEADS
from robal.train.frameworks import FRAMEWORKS, TrainingAttack
from robal.train.stages import build_framework
from robal.train.weighting import WEIGHTINGS

CONFIGS = Path(robal.__file__).parent / "configs"
CIFAR10_LT_50 = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]


# ---------------------------------------------------------------- numpy references

def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def log_softmax(z):
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


def ce(z, y):
    return -log_softmax(z)[np.arange(len(y)), y]


def kl(p, log_q):
    """KL(p || q) per row, q given by its logarithm."""
    return (p * (np.log(p) - log_q)).sum(1)


def linear_case(seed=111, n=6, classes=3, shape=(1, 2, 3)):
    """A 3-class linear model on 6-pixel images and 6 images (the seed gives gradients whose signs change along
    the attacks' paths, so the update rules differ in their images; the tests check that they do)."""
    rng = np.random.RandomState(seed)
    d = int(np.prod(shape))
    w = rng.uniform(-1, 1, (classes, d)).astype(np.float32) * 3
    b = rng.uniform(-0.5, 0.5, classes).astype(np.float32)
    x = rng.uniform(0, 1, (n,) + shape).astype(np.float32)
    y = rng.randint(0, classes, n)
    return w, b, x, y


class LinearModel(nn.Module):
    """training_logits: z = W x + b. forward: z + offset (an inference-time term), so a test can tell which of the
    two an attack differentiates."""

    def __init__(self, w, b, offset=None):
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(torch.as_tensor(w))
            self.fc.bias.copy_(torch.as_tensor(b))
        self.register_buffer("offset", torch.zeros(w.shape[0]) if offset is None
                             else torch.as_tensor(offset, dtype=torch.float))

    def training_logits(self, x):
        return self.fc(x.flatten(1))

    def forward(self, x):
        return self.training_logits(x) + self.offset


def logits(w, b, x):
    return x.reshape(len(x), -1).astype(np.float64) @ w.T.astype(np.float64) + b


def hand_pgd(w, b, x, y, eps, step, steps, start=None, loss="ce", momentum=0.0, kappa=50.0, target=None,
             normalise=True):
    """L-inf PGD by hand: x_{t+1} = clip_[0,1](clip_{x +- eps}(x_t + step * sign(g_t))), from x + start.

    g_t: the closed-form input gradient of the loss; with momentum (MIM) g_t is replaced by the running sum
    mu * G_{t-1} + g_t / mean|g_t| (per image). Returns the images and the smallest |component| of the signed
    direction over the path (to check that float32 gives the same signs)."""
    x = x.astype(np.float64)
    n, c = len(x), w.shape[0]
    w64 = w.astype(np.float64)
    onehot = np.eye(c)[y]

    def project(a):
        return np.clip(np.minimum(np.maximum(a, x - eps), x + eps), 0.0, 1.0)

    xa = project(x + (0.0 if start is None else start))
    total, smallest = np.zeros_like(x), np.inf
    for _ in range(steps):
        z = logits(w, b, xa)
        if loss == "ce":
            gz = softmax(z) - onehot
        elif loss == "kl":
            gz = softmax(z) - target
        else:  # CW margin max_{k != y} z_k - z_y, flat (zero gradient) above kappa
            other = np.where(onehot == 1, -np.inf, z)
            k = other.argmax(1)
            below = other.max(1) - z[np.arange(n), y] < kappa
            gz = (np.eye(c)[k] - onehot) * below[:, None]
        g = (gz @ w64).reshape(x.shape)
        if momentum > 0:
            scale = np.abs(g).reshape(n, -1).mean(1).reshape(n, *[1] * (x.ndim - 1)) if normalise else 1.0
            total = momentum * total + g / scale
            g = total
        if loss != "cw":
            smallest = min(smallest, np.abs(g).min())
        xa = project(xa + step * np.sign(g))
    return xa, smallest


def random_start(x, eps, seed):
    """The uniform start robal's pgd draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.empty_like(x).uniform_(-eps, eps).double().numpy()


def normal_start(x, seed):
    """The x + 0.001 N(0, I) start of the TRADES and MART reference code, as robal draws it after
    torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return 0.001 * torch.randn_like(x).double().numpy()


# ---------------------------------------------------------------- attack updates on a linear model

EPS, STEP = 0.25, 0.03   # a ball wide enough (20 steps of 0.03) for the gradient signs to change on the way
EVAL_SETTINGS = {"fgsm": dict(steps=1, random=False),
                 "pgd20": dict(steps=20),
                 "mim": dict(steps=20, momentum=1.0),
                 "cw": dict(steps=20, loss="cw", kappa=50.0)}


@pytest.fixture(scope="module")
def case():
    w, b, x, y = linear_case()
    return w, b, torch.from_numpy(x), torch.from_numpy(y), LinearModel(w, b).eval()


def test_fgsm_is_one_signed_gradient_step_of_eps_without_random_start(case):
    w, b, x, y, model = case
    g = ((softmax(logits(w, b, x.numpy())) - np.eye(3)[y.numpy()]) @ w.astype(np.float64)).reshape(x.shape)
    assert np.abs(g).min() > 1e-3
    expected = np.clip(x.numpy() + EPS * np.sign(g), 0, 1)
    for seed in (0, 1):  # no random start: the seed does not matter
        torch.manual_seed(seed)
        assert np.allclose(fgsm(model, x, y, EPS).numpy(), expected, atol=1e-6)
    torch.manual_seed(2)
    assert np.allclose(EVAL_ATTACKS.get("fgsm")(model, x, y, EPS, STEP).numpy(), expected, atol=1e-6)
    # the [0, 1] box clips some pixels: without it they would leave the image range
    assert (expected == 0).any() and (expected == 1).any()
    assert (x.numpy() + EPS * np.sign(g) < 0).any() and (x.numpy() + EPS * np.sign(g) > 1).any()


@pytest.mark.parametrize("name", list(EVAL_SETTINGS))
def test_named_attack_gives_the_hand_computed_images(name, case):
    w, b, x, y, model = case
    s = EVAL_SETTINGS[name]
    start = random_start(x, EPS, 0) if s.get("random", True) else None
    expected, smallest = hand_pgd(w, b, x.numpy(), y.numpy(), EPS, EPS if name == "fgsm" else STEP, s["steps"],
                                  start, s.get("loss", "ce"), s.get("momentum", 0.0), s.get("kappa", 50.0))
    assert smallest > 1e-3  # no gradient component near zero: float32 takes the same signs as float64
    torch.manual_seed(0)
    got = EVAL_ATTACKS.get(name)(model, x, y, EPS, STEP)
    assert np.allclose(got.numpy(), expected, atol=1e-6), np.abs(got.numpy() - expected).max()
    assert (got - x).abs().max() <= EPS + 1e-6 and got.min() >= 0 and got.max() <= 1


def test_pgd_steps_with_the_sign_of_the_gradient(case):
    w, b, x, y, model = case
    expected, _ = hand_pgd(w, b, x.numpy(), y.numpy(), EPS, STEP, 6)
    got = pgd(model, x, y, EPS, STEP, 6, random_start=False)
    assert np.allclose(got.numpy(), expected, atol=1e-6)
    moved = np.abs(got.numpy() - x.numpy())
    # interior pixels move by whole steps: 6 signed steps never leave a pixel between multiples of the step
    inside = (expected > 1e-6) & (expected < 1 - 1e-6) & (moved < EPS - 1e-6)
    assert inside.any()
    assert np.allclose(moved[inside] / STEP, np.round(moved[inside] / STEP), atol=1e-4)


def test_mim_accumulates_l1_normalised_gradients(case):
    w, b, x, y, model = case
    start = random_start(x, EPS, 0)
    expected, _ = hand_pgd(w, b, x.numpy(), y.numpy(), EPS, STEP, 20, start, momentum=1.0)
    # the test can tell the update rules apart: without the L1 normalisation, with momentum 0.9, or plain PGD
    for other in (dict(momentum=1.0, normalise=False), dict(momentum=0.9), dict()):
        alt, _ = hand_pgd(w, b, x.numpy(), y.numpy(), EPS, STEP, 20, start, **other)
        assert np.abs(alt - expected).max() > 0.01
    torch.manual_seed(0)
    got = pgd(model, x, y, EPS, STEP, 20, momentum=1.0)
    assert np.allclose(got.numpy(), expected, atol=1e-6)


def test_cw_attack_ascends_the_clamped_margin(case):
    w, b, x, y, model = case
    start = random_start(x, EPS, 1)
    expected, _ = hand_pgd(w, b, x.numpy(), y.numpy(), EPS, STEP, 20, start, loss="cw", kappa=50.0)
    # with kappa 0 the attack would stop once an image is misclassified: other images, so kappa is pinned too
    stop_at_zero, _ = hand_pgd(w, b, x.numpy(), y.numpy(), EPS, STEP, 20, start, loss="cw", kappa=0.0)
    assert np.abs(stop_at_zero - expected).max() > 0.01
    torch.manual_seed(1)
    got = EVAL_ATTACKS.get("cw")(model, x, y, EPS, STEP)
    assert np.allclose(got.numpy(), expected, atol=1e-6)


def test_cw_and_kl_losses_by_hand():
    z = np.array([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2], [-3.0, 4.0, 1.0]])
    y = np.array([0, 2, 0])
    margin = np.array([0.5 - 2.0, 0.3 - (-0.2), 4.0 - (-3.0)])  # best other class minus the true class
    zt, yt = torch.tensor(z, dtype=torch.float), torch.tensor(y)
    assert cw_loss(zt, yt, kappa=50.0).tolist() == pytest.approx(margin.tolist(), abs=1e-6)
    assert cw_loss(zt, yt, kappa=1.0).tolist() == pytest.approx(np.minimum(margin, 1.0).tolist(), abs=1e-6)
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    expected = kl(p, log_softmax(z))
    got = kl_loss(zt, torch.tensor(p, dtype=torch.float)).numpy()
    assert np.allclose(got, expected, atol=1e-6)
    assert not np.allclose(expected, kl(softmax(z), np.log(p)), atol=1e-3)  # the direction matters here
    same = kl_loss(zt, torch.softmax(zt, 1)).numpy()
    assert np.allclose(same, 0, atol=1e-6)  # zero at the clean softmax: TRADES' attack needs its random start


def test_each_attack_name_runs_its_number_of_steps(case):
    """Gradient evaluations per attack: FGSM 1, PGD-20 / MIM / CW 20 (DESIGN.md), the training attack its steps."""
    w, b, x, y, model = case

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = model, 0

        def forward(self, v):
            self.calls += v.requires_grad
            return self.inner(v)

        def training_logits(self, v):
            return self.forward(v)

    expected = {"fgsm": 1, "pgd20": 20, "mim": 20, "cw": 20}
    assert set(EVAL_ATTACKS.names()) == set(expected)
    for name, steps in expected.items():
        counter = Counting()
        EVAL_ATTACKS.get(name)(counter, x, y, 8 / 255, 2 / 255)
        assert counter.calls == steps, name
    for steps in (1, 5, 10):
        counter = Counting()
        TrainingAttack(8 / 255, 2 / 255, steps)(counter, x, y)
        assert counter.calls == steps


def test_training_attack_differentiates_the_training_logits():
    """PGD-5 with a random start on the training logits W x + b, not on the model's output (here shifted by an
    inference-time term that changes the softmax, and so the images)."""
    w, b, x, y = linear_case()
    model = LinearModel(w, b, offset=[2.0, -1.5, 0.0])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    start = random_start(xt, EPS, 0)
    expected, smallest = hand_pgd(w, b, x, y, EPS, STEP, 5, start)
    assert smallest > 1e-3
    shifted, _ = hand_pgd(w, b + np.array([2.0, -1.5, 0.0], dtype=np.float32), x, y, EPS, STEP, 5, start)
    assert np.abs(shifted - expected).max() > 0.01
    torch.manual_seed(0)
    got = TrainingAttack(EPS, STEP, 5)(model, xt, yt)
    assert np.allclose(got.numpy(), expected, atol=1e-6)


# ---------------------------------------------------------------- adversarial training frameworks

class FixedAttack:
    """Stands in for the training attack: returns x + delta (in the box) and records the target it was given."""

    def __init__(self, delta, loss="ce"):
        self.delta, self.loss, self.targets = delta, loss, []

    def __call__(self, model, x, target, y=None, loss_fn=None, start="uniform"):
        self.targets.append(target)
        return (x + self.delta).clamp(0, 1)


@pytest.fixture(scope="module")
def batch():
    """A linear model, a batch and a fixed perturbation; numpy copies for the hand computations."""
    w, b, x, y = linear_case(seed=21, n=5, classes=4)
    delta = (np.random.RandomState(4).choice([-1.0, 1.0], x.shape) * 0.2).astype(np.float32)
    x_adv = np.clip(x + delta, 0, 1)
    return dict(w=w, b=b, x=x, y=y, delta=torch.from_numpy(delta), model=LinearModel(w, b, offset=[1, 0, -1, 2]),
                z_nat=logits(w, b, x), z_adv=logits(w, b, x_adv),
                xt=torch.from_numpy(x), yt=torch.from_numpy(y))


def _ce_loss():
    return LOSSES.build("ce", {}, class_counts=[1, 1, 1, 1])


@pytest.mark.parametrize("beta", [6.0, 2.5])
@pytest.mark.parametrize("outer_on", ["natural", "adversarial"])
def test_trades_loss_is_outer_ce_plus_beta_kl_clean_to_adversarial(batch, beta, outer_on):
    fw = FRAMEWORKS.build("trades", {"beta": beta, "outer_on": outer_on}, loss=_ce_loss(),
                          attack=FixedAttack(batch["delta"], loss="kl"))
    loss, z_nat, z_adv = fw(batch["model"], batch["xt"], batch["yt"])
    zn, za, y = batch["z_nat"], batch["z_adv"], batch["y"]
    kl_clean_adv = kl(softmax(zn), log_softmax(za)).mean()
    outer = ce(zn if outer_on == "natural" else za, y).mean()
    assert loss.item() == pytest.approx(outer + beta * kl_clean_adv, rel=1e-5)
    assert np.allclose(z_nat.detach().numpy(), zn, atol=1e-5) and np.allclose(z_adv.detach().numpy(), za, atol=1e-5)
    # the case tells the pieces apart: KL in the other direction, CE on the other logits
    assert abs(kl(softmax(za), log_softmax(zn)).mean() - kl_clean_adv) > 1e-3
    assert abs(ce(zn, y).mean() - ce(za, y).mean()) > 0.05


def test_trades_attacks_the_kl_to_the_clean_softmax(batch):
    """With `train.attack.loss: kl` the attack's target is softmax of the clean training logits (no inference
    term); with CE (RoBal) it is the labels."""
    attack = FixedAttack(batch["delta"], loss="kl")
    FRAMEWORKS.build("trades", {}, loss=_ce_loss(), attack=attack)(batch["model"], batch["xt"], batch["yt"])
    target = attack.targets[0]
    assert target.shape == (5, 4)
    assert np.allclose(target.numpy(), softmax(batch["z_nat"]), atol=1e-6)
    attack = FixedAttack(batch["delta"], loss="ce")
    FRAMEWORKS.build("trades", {}, loss=_ce_loss(), attack=attack)(batch["model"], batch["xt"], batch["yt"])
    assert torch.equal(attack.targets[0], batch["yt"])


def test_trades_kl_attack_images_by_hand():
    """TRADES' own attack end to end: PGD on KL(p_clean || softmax(W x' + b)), gradient W^T (softmax(z') - p_clean),
    from the reference's x + 0.001 N(0, I) start; the returned adversarial logits are those of the hand-computed
    images."""
    w, b, x, y = linear_case(seed=111)
    model = LinearModel(w, b, offset=[1.0, 0.0, -1.0])
    eps, step = 0.25, 0.03
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    start = normal_start(xt, 13)
    p_clean = softmax(logits(w, b, x))
    x_adv, smallest = hand_pgd(w, b, x, y, eps, step, 10, start, loss="kl", target=p_clean)
    # so near x the first KL gradient is small (p' - p_clean ~ 1e-4), yet far above float32's error on it
    assert smallest > 1e-6
    fw = FRAMEWORKS.build("trades", {"beta": 6.0}, loss=LOSSES.build("ce", {}, class_counts=[1, 1, 1]),
                          attack=TrainingAttack(eps, step, 10, loss="kl"))
    torch.manual_seed(13)
    loss, _, z_adv = fw(model, xt, yt)
    za = logits(w, b, x_adv)
    assert np.allclose(z_adv.detach().numpy(), za, atol=1e-5)
    zn = logits(w, b, x)
    assert loss.item() == pytest.approx(ce(zn, y).mean() + 6.0 * kl(p_clean, log_softmax(za)).mean(), rel=1e-5)


def test_mart_loss_by_hand(batch):
    """MART: CE(z_adv) - log(1 - max_{k != y} p_adv,k) + beta * mean(KL(p_nat || p_adv) (1 - p_nat,y)), the
    0.0001 of the reference code inside the log; with class weights on the outer loss; the attack gets labels."""
    weights = np.array([0.5, 1.0, 2.0, 3.0])
    attack = FixedAttack(batch["delta"])
    fw = FRAMEWORKS.build("mart", {"beta": 5.0}, loss=_ce_loss(), attack=attack)
    loss, _, _ = fw(batch["model"], batch["xt"], batch["yt"], torch.tensor(weights, dtype=torch.float))
    zn, za, y = batch["z_nat"], batch["z_adv"], batch["y"]
    p_nat, p_adv = softmax(zn), softmax(za)
    rows = np.arange(len(y))
    wrong = np.where(np.eye(4)[y] == 1, 0.0, p_adv).max(1)
    boosted = (weights[y] * ce(za, y)).mean() - np.log(1.0001 - wrong).mean()
    expected = boosted + 5.0 * (kl(p_nat, log_softmax(za)) * (1 - p_nat[rows, y])).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(attack.targets[0], batch["yt"])
    # the pieces differ enough here for a swapped KL, an unweighted KL or the largest probability with the true
    # class to change the loss
    assert abs(kl(p_adv, np.log(p_nat)).mean() - kl(p_nat, np.log(p_adv)).mean()) > 1e-3
    assert np.abs(p_adv.max(1) - wrong).max() > 0.05


def test_pgd_at_and_plain_losses_with_class_weights(batch):
    weights = np.array([0.5, 1.0, 2.0, 3.0])
    wt = torch.tensor(weights, dtype=torch.float)
    zn, za, y = batch["z_nat"], batch["z_adv"], batch["y"]
    at = FRAMEWORKS.build("pgd_at", {}, loss=_ce_loss(), attack=FixedAttack(batch["delta"]))
    loss, z_clean, _ = at(batch["model"], batch["xt"], batch["yt"], wt)
    assert z_clean is None and loss.item() == pytest.approx((weights[y] * ce(za, y)).mean(), rel=1e-5)
    plain = FRAMEWORKS.build("plain", {}, loss=_ce_loss(), attack=FixedAttack(batch["delta"]))
    loss, _, z_adv = plain(batch["model"], batch["xt"], batch["yt"], wt)
    assert z_adv is None and loss.item() == pytest.approx((weights[y] * ce(zn, y)).mean(), rel=1e-5)


@pytest.mark.parametrize("stem", ["robal_n", "robal_r", "trades"])
def test_configured_trades_objectives(batch, stem):
    """The configs as built for training: RoBal-N/R put the RoBal loss on the adversarial logits, attack with CE
    and add 6 KL(p_nat || p_adv); TRADES puts CE on the clean logits and attacks the KL."""
    counts = [400, 100, 20, 5]
    cfg = load_config(CONFIGS / f"cifar10_lt/{stem}.yaml", validate_files=False)
    fw = build_framework(cfg.train, counts)
    a = fw.attack
    assert (a.eps, a.step_size, a.steps, a.random_start) == pytest.approx((8 / 255, 2 / 255, 5, True))
    assert a.loss == ("kl" if stem == "trades" else "ce") and (a.loss_args or {}).get("s", 1.0) == 1.0
    fw.attack = FixedAttack(batch["delta"], loss=a.loss)
    loss, _, _ = fw(batch["model"], batch["xt"], batch["yt"])
    zn, za, y = batch["z_nat"], batch["z_adv"], batch["y"]
    n = np.array(counts, dtype=float)
    if stem == "trades":
        outer = ce(zn, y).mean()
    else:
        args = {"robal_n": (0.1, 0.0, 1.2), "robal_r": (0.1, 0.3, 1.5)}[stem]
        m0, tau_m, tau_b = args
        margins = m0 + tau_m / 10.0 * np.log(n / n.min())
        z = za - np.eye(4)[y] * margins[y][:, None]
        outer = ce(10.0 * z + tau_b * np.log(n / n.sum()), y).mean()
    expected = outer + 6.0 * kl(softmax(zn), log_softmax(za)).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- heads and losses not pinned elsewhere

HEAD_COUNTS = [500, 120, 30, 6]


def _set_linear(head, w, b):
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w))
        head.bias.copy_(torch.as_tensor(b))


def test_cdt_head_divides_training_logits_by_class_temperatures():
    """CDT (Ye et al.): training logits z_c / (n_max / n_c)^tau, so rare classes get smaller training logits;
    the model predicts with the plain z."""
    rng = np.random.RandomState(0)
    w, b = rng.randn(4, 5).astype(np.float32), rng.randn(4).astype(np.float32)
    f = rng.randn(3, 5).astype(np.float32)
    n = np.array(HEAD_COUNTS, dtype=float)
    z = f.astype(np.float64) @ w.T + b
    for tau in (0.1, 0.3):
        head = HEADS.build("cdt", {"tau": tau}, in_features=5, num_classes=4, class_counts=HEAD_COUNTS)
        _set_linear(head, w, b)
        a = (n.max() / n) ** tau
        assert a[0] == 1 and a[-1] > 1.5 ** tau
        assert np.allclose(head.training_logits(torch.from_numpy(f)).detach().numpy(), z / a, atol=1e-5)
        assert np.allclose(head(torch.from_numpy(f)).detach().numpy(), z, atol=1e-5)


def test_cdt_model_trains_on_tempered_logits_and_predicts_with_plain_ones():
    spec = {"backbone": "small_cnn", "backbone_args": {"in_channels": 1, "width": 4}, "head": "cdt",
            "head_args": {"tau": 0.3}, "class_counts": HEAD_COUNTS, "class_names": list("abcd"),
            "mean": [0.5], "std": [0.25], "inference": []}
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        f = model.features(x).double().numpy()
        train_z, z = model.training_logits(x).double().numpy(), model(x).double().numpy()
    w, b = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    n = np.array(HEAD_COUNTS, dtype=float)
    assert np.allclose(z, f @ w.T + b, atol=1e-5)
    assert np.allclose(train_z, (f @ w.T + b) / (n.max() / n) ** 0.3, atol=1e-5)


def test_lws_head_scales_each_class():
    rng = np.random.RandomState(1)
    w, b = rng.randn(4, 5).astype(np.float32), rng.randn(4).astype(np.float32)
    f = rng.randn(3, 5).astype(np.float32)
    scale = np.array([0.5, 1.0, 1.5, 3.0], dtype=np.float32)
    for bias, expected in ((False, (f.astype(np.float64) @ w.T) * scale),
                           (True, (f.astype(np.float64) @ w.T + b) * scale)):
        head = HEADS.build("lws", {"bias": bias}, in_features=5, num_classes=4, class_counts=HEAD_COUNTS)
        _set_linear(head, w, b)
        with torch.no_grad():
            head.class_scale.copy_(torch.from_numpy(scale))
        assert np.allclose(head(torch.from_numpy(f)).detach().numpy(), expected, atol=1e-5)
        assert np.allclose(head.training_logits(torch.from_numpy(f)).detach().numpy(), expected, atol=1e-5)


Z = np.array([[0.9, -0.2, 0.3, 0.1], [0.2, 0.5, -0.7, 0.4], [-0.3, 0.1, 0.2, 0.8], [0.4, 0.0, -0.1, 0.6]])
Y = np.array([0, 3, 2, 3])


def _loss(name, args, weight=None):
    loss = LOSSES.build(name, args, class_counts=HEAD_COUNTS)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float)
    return loss(torch.tensor(Z, dtype=torch.float), torch.tensor(Y), w).item()


def test_focal_loss_scale_in_both_forms():
    s, gamma = 3.0, 2.0
    p = np.exp(-ce(s * Z, Y))
    assert _loss("focal", {"gamma": gamma, "s": s}) == pytest.approx(np.mean(-(1 - p) ** gamma * np.log(p)), rel=1e-5)
    sig = 1 / (1 + np.exp(-s * Z))
    p_t = np.where(np.eye(4)[Y] == 1, sig, 1 - sig)
    expected = (-(1 - p_t) ** gamma * np.log(p_t)).sum(1).mean()
    assert _loss("focal", {"gamma": gamma, "form": "sigmoid", "s": s}) == pytest.approx(expected, rel=1e-5)


def test_cb_focal_loss_on_cifar10_lt_counts():
    """CB re-weighting as cb_reweight.yaml sets it up: sigmoid focal (gamma 2) times w_y, w_c = (1 - beta) /
    (1 - beta^n_c) normalised to sum to C, beta 0.9999, on CIFAR-10-LT ratio-50 counts."""
    beta = 0.9999
    raw = np.array([(1 - beta) / (1 - beta ** n) for n in CIFAR10_LT_50])
    w = raw / raw.sum() * 10
    got = WEIGHTINGS.build("effective_number", {"beta": beta, "start_epoch": 1}, class_counts=CIFAR10_LT_50, epoch=0)
    assert got.tolist() == pytest.approx(w.tolist(), rel=1e-5)
    assert w[9] / w[0] == pytest.approx((1 - beta ** 5000) / (1 - beta ** 100), rel=1e-9)  # about 39.8
    z = np.random.RandomState(2).randn(6, 10)
    y = np.array([0, 9, 5, 9, 1, 7])
    sig = 1 / (1 + np.exp(-z))
    p_t = np.where(np.eye(10)[y] == 1, sig, 1 - sig)
    expected = (w[y] * (-(1 - p_t) ** 2 * np.log(p_t)).sum(1)).mean()
    loss = LOSSES.build("focal", {"gamma": 2.0, "form": "sigmoid"}, class_counts=CIFAR10_LT_50)
    assert loss(torch.tensor(z, dtype=torch.float), torch.tensor(y), got).item() == pytest.approx(expected, rel=1e-5)


def test_harl_with_scale_and_class_weights():
    """TAET's equalisation loss on s * z with per-class weights on each image's CE (class 1 absent: L_1 = 0)."""
    alpha, beta, gamma, s = 0.3, 0.2, 0.5, 2.0
    weights = np.array([0.5, 1.0, 2.0, 4.0])
    per = weights[Y] * ce(s * Z, Y)
    lc = np.array([per[Y == c].mean() if (Y == c).any() else 0.0 for c in range(4)])
    expected = alpha * lc.mean() + beta * ((lc - lc.mean()) ** 2).mean() + gamma * ((lc / lc.sum()) ** 2).sum()
    got = _loss("harl", {"alpha": alpha, "beta": beta, "gamma": gamma, "s": s}, weights)
    assert got == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- groups and metrics

def test_class_groups_on_cifar10_lt_ratio_50():
    groups, rule = class_groups(CIFAR10_LT_50)
    assert groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6, 7], "few": [8, 9]}
    assert rule.startswith("bands")


def test_class_group_edges():
    """many: n > 1000; medium: 200 <= n <= 1000; few: n < 200."""
    groups, rule = class_groups([1001, 1000, 200, 199, 5000, 1])
    assert groups == {"many": [0, 4], "medium": [1, 2], "few": [3, 5]}
    assert rule.startswith("bands")


def test_groups_fall_back_to_thirds_by_training_count():
    counts = [50, 400, 30, 20, 90, 10, 70, 60, 5, 40]  # no class above 1000: thirds instead
    groups, rule = class_groups(counts)
    order = sorted(range(10), key=lambda c: -counts[c])  # 400 90 70 60 50 40 30 20 10 5
    assert groups == {"many": sorted(order[:3]), "medium": sorted(order[3:7]), "few": sorted(order[7:])}
    assert rule.startswith("thirds")


def test_tail_third_is_three_classes_whatever_the_bands():
    """The tail third (Pareto plot, ratio sweep) is the three rarest of ten classes at every imbalance ratio, where
    the `few` band holds two classes at rho 50 and none at rho 10."""
    assert class_thirds(CIFAR10_LT_50) == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    rho10 = long_tailed_counts(5000, 10, 10)
    assert min(rho10) == 500 and class_groups(rho10)[1].startswith("thirds")
    assert class_thirds(rho10)[2] == [7, 8, 9]
    result = {"labels": [9, 8, 7, 6, 0, 9], "class_counts": [5, 3, 4, 9, 8, 7, 6, 1, 2, 0]}  # rarest: 9, 7, 8
    assert in_tail_third(result).tolist() == [True, True, True, False, False, True]


def test_metrics_by_hand_on_cifar10_lt_groups():
    """Ten classes, two test images each (an imbalanced pick would do too): per-class accuracy, the group means,
    natural error, boundary error (right when clean, wrong under attack: an image the attack happens to fix
    counts in neither), balanced robustness, worst class and the standard error."""
    labels = np.repeat(np.arange(10), 2)
    clean = np.array([1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0], dtype=bool)
    adv = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    m = attack_metrics(adv, clean, labels, CIFAR10_LT_50)
    per_class = [100 * adv[labels == c].mean() for c in range(10)]  # 50 100 0 50 50 50 0 50 0 0
    assert m["per_class"] == pytest.approx(per_class)
    assert m["accuracy"] == pytest.approx(100 * 7 / 20)
    assert m["groups"] == pytest.approx({"many": np.mean(per_class[:4]), "medium": np.mean(per_class[4:8]),
                                         "few": np.mean(per_class[8:])})
    assert m["groups"]["few"] == 0 and m["groups"]["many"] == pytest.approx(50.0)
    boundary = clean & ~adv                    # image 11 (class 5): wrong clean, right under attack: not counted
    assert boundary.sum() == 7 and (~clean & adv).sum() == 1
    assert m["natural_error"] == pytest.approx(100 * 7 / 20)
    assert m["boundary_error"] == pytest.approx(100 * 7 / 20)
    assert m["per_class_boundary_error"] == pytest.approx([100 * boundary[labels == c].mean() for c in range(10)])
    assert m["balanced_robustness"] == pytest.approx(np.mean(per_class)) and m["balanced_robustness"] == 35.0
    assert m["worst_class"] == {"class": 2, "accuracy": 0.0}
    assert m["std_error"] == pytest.approx(100 * math.sqrt(0.35 * 0.65 / 20))


def test_balanced_robustness_differs_from_accuracy_on_an_imbalanced_test_set():
    labels = np.array([0] * 8 + [1, 2])
    adv = np.array([1] * 8 + [0, 0], dtype=bool)
    clean = np.ones(10, dtype=bool)
    m = attack_metrics(adv, clean, labels, [5000, 500, 50])
    assert m["accuracy"] == pytest.approx(80.0) and m["balanced_robustness"] == pytest.approx(100 / 3)
    assert m["boundary_error"] == pytest.approx(20.0) and m["natural_error"] == 0.0


def test_standard_error_and_strongest_attack():
    assert standard_error(80.0, 400) == pytest.approx(100 * math.sqrt(0.8 * 0.2 / 400))  # 2.0 points
    assert standard_error(100.0, 50) == 0.0
    attacks = {"fgsm": {"accuracy": 40.0}, "pgd20": {"accuracy": 33.0}, "cw": {"accuracy": 34.0}}
    assert strongest(attacks, ("fgsm", "pgd20", "mim", "cw")) == "pgd20"
    assert strongest(attacks, ("mim",)) is None
