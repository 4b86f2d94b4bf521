"""Images/second of one PGD-5 AT step and one TRADES step: robal's Trainer, a reference loop, the kernel bound.

  robal         the real `Trainer.train_epoch` (DeviceLoader sampling/crop/flip on the device, the framework,
                the training attack, optimiser step, batch statistics) on the CPU reference setting's config
                (configs/cifar10_lt/pgd_at.yaml, trades.yaml: batch 128, channels_last, amp auto = fp32 on CPU,
                bf16 on CUDA); one epoch, cut to iters + 1 batches, timed batch by batch with the other
                contenders run between robal's batches (see timed_epoch); the first round is a warm-up
  reference     what the field's reference code does: DataLoader over a Dataset with per-sample numpy crop/flip,
                num_workers=0, fp32 NCHW, batch 64, the attack written step by step (Madry: loss.backward() on
                x_adv; TRADES: the authors' trades_loss)
  kernel-bound  the passes alone on pre-made tensors in robal's format and batch: PGD-5 AT = 5 input-gradient
                forward/backward passes in eval mode + 1 training forward/backward + the optimiser step
                (TRADES adds the clean eval forward for the KL target and the second training forward)

Usage:  python benchmarks/bench_train.py [--backbone preact_resnet18|resnet18] [--iters N] [--device cpu|cuda]
                                         [--quick] [--threads N] [--frameworks pgd_at,trades]
                                         [--set train.amp=bf16 --set train.channels_last=false ...]
Each round times one robal batch (128 images), the same number of images of the reference (two batches of 64)
and one kernel-bound batch; figures are medians over rounds, ratios medians of per-round ratios.
The last line reads `robal/reference = R.RR, robal/kernel-bound = K.KK` for the PGD-5 AT step of the backbone
(default: the CPU reference backbone, PreAct-ResNet-18 width 16); kernel-bound = kernel-only time / robal time.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_WIDTH, Clock, Figures, data_file, machine, parse_args, reference_loader,  # noqa: E402
                    reference_model, reference_pgd_at_step, reference_trades_step, report, robal_config, tmpdir)


def robal_trainer(config_name: str, data_path: Path, args, out: Path):
    from robal.train.trainer import Trainer

    return Trainer(robal_config(config_name, data_path, args, args.set), out, overwrite=True, progress=False)


def timed_epoch(trainer, batches: int, rounds: int, others: dict, device) -> tuple[dict, list[float]]:
    """Times robal inside one real `Trainer.train_epoch` (so its step counter, batch statistics every
    train.stats_every batches and loader state run as in training): the epoch is cut to (rounds + 1) chunks of
    `batches` batches, and after each chunk the other contenders run once (rotating order), outside robal's
    timing. The first chunk is a warm-up for everyone."""
    inner = trainer.loader
    full_order = inner.epoch_order
    inner.epoch_order = lambda: full_order()[:(rounds + 1) * batches * inner.batch_size]
    names = list(others)
    figures = Figures(["robal", *names])

    class Chunked:
        def __getattr__(self, attr):
            return getattr(inner, attr)

        def __len__(self):
            return len(inner)

        def __iter__(self):
            it = iter(inner)
            for r in range(-1, rounds):
                images = 0
                with Clock(device) as robal:
                    for _ in range(batches):
                        x, y = next(it)
                        images += len(y)
                        yield x, y  # the trainer's step on this batch runs before the generator resumes
                order = names[r % len(names):] + names[:r % len(names)] if r >= 0 else names
                for name in order:
                    with Clock(device) as clock:
                        n = others[name]()
                    if r >= 0:
                        figures.add(name, clock, n)
                if r >= 0:
                    figures.add("robal", robal, images)
                    figures.loads.append(os.getloadavg()[0])

    from robal.train.trainer import TrainingDiverged

    trainer.loader = Chunked()
    try:
        trainer.train_epoch(0)
    except TrainingDiverged as err:  # checked after the timed batches; the timings do not depend on the values
        print(f"  note: {str(err).split(';')[0]} (a few steps at lr {trainer.cfg.train.lr} from a fresh model)")
    finally:
        trainer.loader, inner.epoch_order = inner, full_order
    return figures


def reference_contender(trainer, framework: str, images: int, device, batch_size: int = 64):
    model = reference_model(trainer.model, device)
    t = trainer.cfg.train
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    batches = reference_loader(trainer.data.x_train, trainer.data.y_train, train=True, batch_size=batch_size)
    step = reference_pgd_at_step if framework == "pgd_at" else reference_trades_step
    n = max(1, images // batch_size)

    def run() -> int:
        for _ in range(n):
            x, y = batches.next()
            x, y = x.to(device), y.to(device)
            step(model, optimizer, x, y).item()  # the reference loops log the loss every batch
        return n * batch_size

    return run


def kernel_contender(trainer, framework: str, batches: int, device):
    """The forward/backward passes and the optimiser step alone, in robal's memory format, batch and precision."""
    from robal.train.frameworks import frozen_parameters
    from robal.train.trainer import autocast_for

    from robal.models import build_model

    t = trainer.cfg.train
    model = build_model(trainer.model.spec)  # robal's network and weights, built as the Trainer builds it
    model.load_state_dict(trainer.model.state_dict())
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    if getattr(t, "compile", False):
        model.backbone.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    bs = trainer.loader.batch_size
    x = torch.rand(bs, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    x_adv = torch.rand(bs, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    x_leaf = x.clone().requires_grad_(True)
    y = torch.randint(10, (bs,), device=device)
    steps = t.attack.steps

    def pgd_at():
        with autocast_for(trainer.device, t.amp):
            model.eval()
            with frozen_parameters(model):  # input gradient only, as robal's attack
                for _ in range(steps):
                    torch.autograd.grad(F.cross_entropy(model.training_logits(x_leaf).float(), y), x_leaf)
            model.train()
            loss = F.cross_entropy(model.training_logits(x_adv).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def trades():
        with autocast_for(trainer.device, t.amp):
            model.eval()
            with torch.no_grad():
                p_nat = F.softmax(model.training_logits(x).float(), 1)
            with frozen_parameters(model):
                for _ in range(steps):
                    z = model.training_logits(x_leaf).float()
                    torch.autograd.grad(F.kl_div(F.log_softmax(z, 1), p_nat, reduction="sum"), x_leaf)
            model.train()
            z_nat, z_adv = model.training_logits(x).float(), model.training_logits(x_adv).float()
            loss = F.cross_entropy(z_nat, y) + 6.0 * F.kl_div(F.log_softmax(z_adv, 1), F.softmax(z_nat, 1),
                                                               reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    one = pgd_at if framework == "pgd_at" else trades

    def run() -> int:
        for _ in range(batches):
            one()
        return batches * bs

    return run


def main():
    def extra(p):
        p.add_argument("--frameworks", default="pgd_at,trades", help="which steps to time (default: pgd_at,trades)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override robal's config (e.g. train.amp=bf16, train.channels_last=false); "
                            "the kernel bound follows it")

    args = parse_args(__doc__.split("\n")[0], default_iters={"preact_resnet18": 15, "resnet18": 2}, extra=extra)
    batches = 1
    print(f"machine: {machine(args.device)}; 1-min load avg at start {os.getloadavg()[0]:.2f}")
    results = {}
    with tmpdir() as tmp:
        tmp = Path(tmp)
        data_path, data_desc = data_file(tmp)
        print(f"data: {data_desc}, CIFAR-10-LT rho 50" + (f"; robal overrides: {args.set}" if args.set else ""))
        for framework in args.frameworks.split(","):
            config = f"{framework}.yaml"
            trainer = robal_trainer(config, data_path, args, tmp / f"run_{framework}")
            images = batches * trainer.loader.batch_size
            others = {"reference": reference_contender(trainer, framework, images, args.device),
                      "kernel-bound": kernel_contender(trainer, framework, batches, args.device)}
            t = trainer.cfg.train
            n_params = sum(p.numel() for p in trainer.model.parameters())
            title = (f"{framework} step ({'PGD' if framework == 'pgd_at' else 'KL'}-{t.attack.steps} attack, eps 8/255, "
                     f"step 2/255), {args.backbone} width {args.width} ({n_params / 1e6:.2f}M params), "
                     f"{args.device.type}; robal: batch {t.batch_size}, channels_last={t.channels_last}, "
                     f"amp={t.amp}; reference: batch 64, fp32 NCHW; {images} images per round")
            figures = timed_epoch(trainer, batches, args.iters, others, args.device)
            results[framework] = report(title, figures)
    if "pgd_at" not in results:
        return
    r_ref, r_ker = results["pgd_at"]
    if args.backbone != "preact_resnet18" or args.width != DEFAULT_WIDTH["preact_resnet18"] or args.set:
        print(f"(the line below is for {args.backbone} width {args.width}"
              + (f" with {args.set}" if args.set else "") + ", not the CPU reference setting)")
    print(f"robal/reference = {r_ref:.2f}, robal/kernel-bound = {r_ker:.2f}")


if __name__ == "__main__":
    main()
