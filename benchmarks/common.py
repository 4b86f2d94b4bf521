"""Shared pieces of bench_train.py and bench_eval.py: data, the reference code, the timing protocol.

Timing protocol (the CPU may be shared): every contender runs once per round, the order rotates from round to
round, the figure is the median images/s over rounds, and every ratio is the median of the per-round ratios
(paired, so a load change between rounds affects both sides of a ratio alike). The 1-minute load average is
read after each round and printed next to the figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10.npz"
EPS, STEP = 8 / 255, 2 / 255
DEFAULT_WIDTH = {"preact_resnet18": 16, "resnet18": 64}


def parse_args(description: str, default_iters: dict[str, int], extra: Callable | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--backbone", default="preact_resnet18", choices=sorted(DEFAULT_WIDTH),
                   help="preact_resnet18 (width 16: the CPU reference backbone) or resnet18 (width 64)")
    p.add_argument("--width", type=int, default=None, help="base width (default: 16 / 64 as above)")
    p.add_argument("--iters", type=int, default=None,
                   help=f"timed rounds per contender (default {default_iters})")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--quick", action="store_true", help="smoke run: one round of few images")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.width is None:
        args.width = DEFAULT_WIDTH[args.backbone]
    if args.iters is None:
        args.iters = 1 if args.quick else default_iters[args.backbone]
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def data_file(tmp: Path) -> tuple[Path, str]:
    """CIFAR-10 when ../shared/data/cifar10.npz exists, else random uint8 images of CIFAR shape."""
    if CIFAR.is_file():
        return CIFAR, f"CIFAR-10 ({CIFAR})"
    rng = np.random.default_rng(0)
    path = tmp / "random_cifar_shaped.npz"
    np.savez(path, x_train=rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
             y_train=np.repeat(np.arange(10), 5000), x_test=rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8),
             y_test=np.repeat(np.arange(10), 1000), class_names=np.array([f"class{i}" for i in range(10)]))
    return path, "random uint8 data of CIFAR shape (../shared/data/cifar10.npz not found)"


def robal_config(name: str, data_path: Path, args, overrides: list[str] = ()):
    """A config of configs/cifar10_lt/ (the CPU reference setting) with this run's backbone and device."""
    from robal.config import load_config

    return load_config(ROOT / "configs" / "cifar10_lt" / name,
                       [f"data.path={data_path}", f"model.backbone={args.backbone}",
                        f"model.backbone_args={{width: {args.width}}}", f"device={args.device}", *overrides])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


# ---------------------------------------------------------------- the reference code


class CIFARDataset(Dataset):
    """What the field's reference code does: a Dataset returning one image at a time, per-sample numpy
    augmentation (zero-padded random crop 4, horizontal flip) and a ToTensor-like conversion."""

    def __init__(self, x_uint8_hwc: np.ndarray, y: np.ndarray, train: bool):
        self.x, self.y, self.train = x_uint8_hwc, y, train

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = self.x[i]
        if self.train:
            img = np.pad(img, ((4, 4), (4, 4), (0, 0)))
            top, left = np.random.randint(0, 9, size=2)
            img = img[top:top + 32, left:left + 32]
            if np.random.rand() < 0.5:
                img = img[:, ::-1]
        img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div(255)
        return img, int(self.y[i])


class Batches:
    """An endless stream of DataLoader batches (a new epoch when one ends)."""

    def __init__(self, loader: DataLoader):
        self.loader, self.it = loader, iter(loader)

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def reference_loader(x, y, train: bool, batch_size: int = 64) -> Batches:
    return Batches(DataLoader(CIFARDataset(x, y, train), batch_size=batch_size, shuffle=train, num_workers=0,
                              drop_last=train))


def reference_pgd_at_step(model, optimizer, x, y, eps=EPS, step=STEP, steps=5):
    """Madry PGD-AT as the reference code writes it: loss.backward() on x_adv (which also computes and
    accumulates every parameter's gradient), parameter gradients zeroed, BatchNorm in eval mode for the attack."""
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        model.zero_grad()
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        x_adv = x_adv.detach() + step * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    return loss


def reference_trades_step(model, optimizer, x, y, beta=6.0, eps=EPS, step=STEP, steps=5):
    """TRADES as in the authors' trades.py: 0.001 * randn start, the KL attack re-computes model(x_natural)
    at every step, autograd.grad on x_adv; then CE(natural) + beta * KL(sum) / batch."""
    kl = torch.nn.KLDivLoss(reduction="sum")
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss_kl = kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    model.train()
    x_adv = x_adv.detach()
    optimizer.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, y) + beta * (1.0 / len(x)) * kl(F.log_softmax(model(x_adv), dim=1),
                                                                   F.softmax(logits, dim=1))
    loss.backward()
    optimizer.step()
    return loss


def reference_pgd_whitebox(model, x, y, eps=EPS, step=STEP, steps=20):
    """PGD-20 evaluation as in the TRADES repository's _pgd_whitebox: an SGD optimiser over X_pgd only to zero
    its gradient, loss.backward() (parameter gradients are computed too), predictions of the final X_pgd."""
    x_pgd = (x + torch.empty_like(x).uniform_(-eps, eps)).requires_grad_(True)
    for _ in range(steps):
        opt = torch.optim.SGD([x_pgd], lr=1e-3)
        opt.zero_grad()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_pgd), y)
        loss.backward()
        x_pgd = x_pgd.detach() + step * x_pgd.grad.sign()
        x_pgd = (x + torch.clamp(x_pgd - x, -eps, eps)).clamp(0, 1.0).requires_grad_(True)
    return model(x_pgd).max(1)[1]


def reference_model(robal_model, device):
    """The same network (robal's RobustClassifier class, same initial weights) in fp32 NCHW."""
    from robal.models import build_model

    model = build_model(robal_model.spec)
    model.load_state_dict({k: v.detach().cpu().contiguous() for k, v in robal_model.state_dict().items()})
    return model.to(device)


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall-clock and process CPU time of one timed call; images/s on both."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, images: int) -> tuple[float, float]:
        return images / self.wall, images / max(self.cpu, 1e-9)


class Figures:
    """Per-round images/s (wall clock) and images per CPU-second of each contender, and the load per round."""

    def __init__(self, names):
        self.wall = {n: [] for n in names}
        self.cpu = {n: [] for n in names}
        self.loads = []

    def add(self, name, clock: Clock, images: int):
        wall, cpu = clock.rates(images)
        self.wall[name].append(wall)
        self.cpu[name].append(cpu)


def interleaved(contenders: dict[str, Callable[[], int]], rounds: int, device) -> Figures:
    """Each contender once per round, in a rotating order; a call returns the images it processed."""
    names = list(contenders)
    figures = Figures(names)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            with Clock(device) as clock:
                images = contenders[n]()
            figures.add(n, clock, images)
        figures.loads.append(os.getloadavg()[0])
    return figures


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def report(title: str, figures: Figures, robal="robal", reference="reference",
           kernel="kernel-bound") -> tuple[float, float]:
    """Print one block of figures; returns (robal/reference, robal/kernel-bound), wall clock, paired medians.

    Images per CPU-second (all threads of this process) are printed beside: on a shared machine they move far
    less with the load than wall-clock figures, so their ratios are the cross-check."""
    loads = figures.loads
    print(f"\n{title}\n  {len(loads)} round(s); 1-min load avg during them {min(loads):.2f}-{max(loads):.2f}")
    print(f"  {'':<24} {'images/s':>9} {'img/CPU-s':>10}   images/s per round")
    for name, values in figures.wall.items():
        print(f"  {name:<24} {statistics.median(values):9.1f} {statistics.median(figures.cpu[name]):10.1f}   "
              + " ".join(f"{v:.1f}" for v in values))
    out = []
    for label, series in (("wall clock", figures.wall), ("CPU time", figures.cpu)):
        r_ref = paired_ratio(series[robal], series[reference]) if reference in series else float("nan")
        r_ker = paired_ratio(series[robal], series[kernel]) if kernel in series else float("nan")
        print(f"  {label + ':':<12} robal / reference = {r_ref:.2f}x, robal share of the kernel bound = {r_ker:.2f}")
        out.append((r_ref, r_ker))
    return out[0]


def tmpdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="robal-bench-")
