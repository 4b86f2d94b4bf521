"""Does the streaming loader keep the PGD-5 AT step fed? Images/second of robal's training step with its
batches from the streaming loader (data.loader: streaming, JPEGs decoded by data.workers processes) and from the
in-memory loader (the same images decoded once, held on the device), on a generated folder of 64x64 JPEGs.

  in-memory   Trainer built from the config with data.loader: memory; one step = the loader's next batch (crop
              and flip on the device) + the PGD-5 AT step (attack, training forward/backward, optimiser step)
  streaming   the same config with data.loader: streaming: the next batch comes from worker processes that
              decode its JPEGs while the previous steps run (prefetch), then the same crop, flip and step

Both train the same model from the same seed (the streaming loader yields the in-memory loader's batches), so
the work per step is the same and the ratio is the loader's cost. Timing protocol as bench_train.py: one batch
of each per round in a rotating order (the first round a warm-up), medians over rounds, the ratio the median
of per-round ratios; the 1-minute load average is printed beside the figures. The decode cost per image is
Pillow's decode + RGB conversion of the generated JPEGs in this process.

Usage:  python benchmarks/bench_data.py [--images 4096] [--classes 16] [--workers 1] [--batch 128] [--iters 6]
                                        [--width 16] [--device cpu|cuda|auto] [--threads N] [--quick]
The last line reads `streaming/in-memory = R` (goal: at least 0.9 on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Clock, Figures, machine, paired_ratio, tmpdir  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4096, help="JPEGs to generate (64x64)")
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="data.workers of the streaming loader")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=6, help="timed rounds (after one warm-up round)")
    p.add_argument("--width", type=int, default=16, help="PreAct-ResNet-18 base width (16: the CPU reference)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 images, batch 32, width 8, one round")
    args = p.parse_args()
    if args.quick:
        args.images, args.batch, args.width, args.iters = 512, 32, 8, 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def write_jpegs(root: Path, images: int, classes: int) -> Path:
    """train/classK/NNNNN.jpg (64x64, quality 90: smooth colour fields with noise, about 2-3 KB each) and one test
    image per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for i in range(images + classes):
        split, c = ("train", i % classes) if i < images else ("test", i - images)
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = 127 + 100 * np.sin(6 * xx[..., None] + 4 * yy[..., None] + phase)
        image = (base + rng.normal(0, 12, (64, 64, 3))).clip(0, 255).astype(np.uint8)
        folder = root / split / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def decode_cost(root: Path, n: int = 512) -> tuple[float, float]:
    """Milliseconds per image (Pillow decode + RGB conversion, this process) and mean file size in KB."""
    from robal.data.folder import decode_image

    files = sorted((root / "train").rglob("*.jpg"))[:n]
    for f in files[:16]:
        decode_image(f)
    start = time.perf_counter()
    for f in files:
        decode_image(f)
    ms = 1000 * (time.perf_counter() - start) / len(files)
    return ms, statistics.mean(f.stat().st_size for f in files) / 1024


def trainer_for(root: Path, loader: str, args):
    from robal.config import load_config
    from robal.train.trainer import Trainer

    cfg = load_config(None, [
        "data.source=folder", f"data.root={root}", "data.subset=full", "data.image_size=64", "data.crop_padding=4",
        f"data.loader={loader}", f"data.workers={args.workers if loader == 'streaming' else 0}",
        "model.backbone=preact_resnet18", f"model.backbone_args={{width: {args.width}}}", f"device={args.device}",
        "train.framework=pgd_at", "train.attack={eps: 8/255, step_size: 2/255, steps: 5}",
        f"train.batch_size={args.batch}", "train.epochs=1", "train.lr_milestones=[]"])
    return Trainer(cfg, None, progress=False)  # built as for training; no run directory


class Steps:
    """One PGD-5 AT training step at a time on a trainer's own loader (a new epoch when one ends)."""

    def __init__(self, trainer):
        from robal.train.trainer import autocast_for

        self.t, self.it = trainer, iter(trainer.loader)
        self.autocast = lambda: autocast_for(trainer.device, trainer.cfg.train.amp)
        trainer.model.train()

    def __call__(self) -> int:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.it = iter(self.t.loader)
            x, y = next(self.it)
        with self.autocast():
            loss, _, _ = self.t.framework(self.t.model, x, y, None)
        self.t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.t.optimizer.step()
        return len(y)


def main() -> int:
    args = parse()
    device = torch.device(args.device)
    with tmpdir() as tmp:
        root = write_jpegs(Path(tmp) / "jpegs", args.images, args.classes)
        ms, kb = decode_cost(root)
        steps = {name: Steps(trainer_for(root, loader, args))
                 for name, loader in (("in-memory", "memory"), ("streaming", "streaming"))}
        names = list(steps)
        figures = Figures(names)
        for r in range(args.iters + 1):  # round 0: warm-up (workers start, first batches decoded)
            for name in names[r % 2:] + names[:r % 2]:
                with Clock(device) as clock:
                    images = steps[name]()
                if r > 0:
                    figures.add(name, clock, images)
            if r > 0:
                figures.loads.append(os.getloadavg()[0])
    print(f"machine: {machine(device)}")
    print(f"data: {args.images} generated 64x64 JPEGs ({kb:.1f} KB each) in {args.classes} classes; PGD-5 AT step, "
          f"PreAct-ResNet-18 width {args.width}, batch {args.batch}; streaming with data.workers={args.workers}")
    print(f"decode cost: {ms:.3f} ms per image (Pillow decode + RGB, one process) = "
          f"{1000 / ms:.0f} images/s per decoding process")
    for name in names:
        print(f"{name:>10}: {statistics.median(figures.wall[name]):8.1f} images/s (median of {args.iters} rounds)")
    print(f"load average per round: {', '.join(f'{x:.1f}' for x in figures.loads)}")
    ratio = paired_ratio(figures.wall["streaming"], figures.wall["in-memory"])
    print(f"streaming/in-memory = {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
