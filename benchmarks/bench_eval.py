"""Images/second of a PGD-20 evaluation and of AutoAttack (aa-paper: APGD-CE + APGD-T): robal, reference, bound.

  robal         the evaluate path `robal eval` takes (robal.evaluate.attacks.attack_predictions: batches of
                eval.batch_size (500) moved to the device, the attack, predictions under inference_mode),
                on the model as `robal.load_model` returns it, images as `robal eval` holds them
  reference     PGD-20: a DataLoader over the test set (per-sample ToTensor, num_workers=0, batch 64), fp32 NCHW,
                the TRADES repository's _pgd_whitebox (loss.backward on X_pgd, parameter gradients computed);
                AutoAttack: the official package called on the fp32 NCHW model with the same settings
                (APGD-CE 1 restart, APGD-T 9 target classes), batch 64
  kernel-bound  PGD-20: 20 input-gradient forward/backward passes + 1 forward per batch, pre-made tensors;
                AutoAttack: every forward (and input-gradient backward) robal's run made, replayed on pre-made
                tensors of the same batch sizes (AutoAttack attacks only the points still robust, so the work
                depends on the model: pass --checkpoint for a trained one)

Usage:  python benchmarks/bench_eval.py [--backbone preact_resnet18|resnet18] [--iters N] [--device cpu|cuda]
                                        [--quick] [--checkpoint RUN_DIR_OR_PT] [--n-pgd N] [--n-aa N] [--aa-iters N]
                                        [--skip-aa] [--eval-batch N] [--nchw]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (EPS, STEP, data_file, interleaved, machine, parse_args, reference_loader,  # noqa: E402
                    reference_model, reference_pgd_whitebox, report, robal_config, tmpdir)


def extra_args(p):
    p.add_argument("--checkpoint", default=None, help="a robal checkpoint or run directory (default: a fresh "
                                                       "model, BatchNorm statistics set on training images)")
    p.add_argument("--n-pgd", type=int, default=None, help="test images per PGD-20 round (default: eval batch 500)")
    p.add_argument("--n-aa", type=int, default=100, help="test images for AutoAttack (default 100)")
    p.add_argument("--aa-iters", type=int, default=1, help="timed AutoAttack rounds (default 1)")
    p.add_argument("--skip-aa", action="store_true")
    p.add_argument("--eval-batch", type=int, default=None, help="robal's eval batch (default: eval.batch_size, 500)")
    p.add_argument("--nchw", action="store_true", help="give robal NCHW-contiguous images (ablation: robal "
                                                      "eval's are channels_last-strided)")


def load_or_build(args, cfg, data, device):
    from robal import load_model
    from robal.models import build_model
    from robal.train.trainer import model_spec

    if args.checkpoint:
        return load_model(args.checkpoint, device), f"checkpoint {args.checkpoint}"
    torch.manual_seed(0)
    model = build_model(model_spec(cfg, data)).to(device)
    x = torch.from_numpy(data.x_train[:2048]).permute(0, 3, 1, 2).float().div(255).to(device)
    model.train()
    with torch.no_grad():  # untrained, but with BatchNorm statistics of real images so predictions vary
        for i in range(0, len(x), 256):
            model(x[i:i + 256])
    return model.eval(), "a fresh model (untrained; BatchNorm statistics from 2048 training images)"


def pgd_kernel(model, n, batch_size, device, fmt, steps=20):
    xs = [torch.rand(min(batch_size, n - i), 3, 32, 32, device=device).contiguous(memory_format=fmt)
          for i in range(0, n, batch_size)]
    leaves = [x.clone().requires_grad_(True) for x in xs]
    ys = [torch.randint(model.num_classes, (len(x),), device=device) for x in xs]

    def run() -> int:
        for x, leaf, y in zip(xs, leaves, ys):
            for _ in range(steps):
                torch.autograd.grad(F.cross_entropy(model(leaf), y), leaf)
            with torch.inference_mode():
                model(x).argmax(1)
        return n

    return run


class CallRecorder:
    """Records (batch size, input needs grad) of every forward of a model, for the kernel-bound replay."""

    def __init__(self, model):
        self.calls, self.on = [], False
        model.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if self.on:
            x = inputs[0]
            self.calls.append((x.shape[0], torch.is_grad_enabled() and x.requires_grad))


def replay_kernel(model, calls, device, n, fmt):
    sizes = sorted({b for b, _ in calls})
    xs = {b: torch.rand(b, 3, 32, 32, device=device).contiguous(memory_format=fmt) for b in sizes}
    leaves = {b: x.clone().requires_grad_(True) for b, x in xs.items()}
    ys = {b: torch.randint(model.num_classes, (b,), device=device) for b in sizes}

    def run() -> int:
        for b, grad in calls:
            if grad:
                torch.autograd.grad(F.cross_entropy(model(leaves[b]), ys[b]), leaves[b])
            else:
                with torch.no_grad():
                    model(xs[b])
        return n

    return run


def main():
    from robal.data import prepare_data
    from robal.evaluate.attacks import attack_predictions
    from robal.evaluate.runner import test_subset, to_images

    args = parse_args(__doc__.split("\n")[0], default_iters={"preact_resnet18": 3, "resnet18": 1}, extra=extra_args)
    device = args.device
    print(f"machine: {machine(device)}; 1-min load avg at start {os.getloadavg()[0]:.2f}")
    with tmpdir() as tmp:
        data_path, data_desc = data_file(Path(tmp))
        cfg = robal_config("pgd_at.yaml", data_path, args)
        data = prepare_data(cfg.data)
        print(f"data: {data_desc}, test split")
        model, model_desc = load_or_build(args, cfg, data, device)
        ref = reference_model(model, device).eval()
        # robal eval's images (to_images: a permuted NHWC array) are channels_last-strided, so its convolutions
        # run channels_last; the kernel bound gets the same layout
        fmt = torch.contiguous_format if args.nchw else torch.channels_last
        batch = args.eval_batch or cfg.eval.batch_size
        n_pgd = args.n_pgd or (64 if args.quick else batch)
        n_aa = 20 if args.quick else args.n_aa
        print(f"model: {model.spec['backbone']} {model.spec['backbone_args']} ({model_desc}); robal evaluates it "
              f"on {'channels_last-strided' if fmt == torch.channels_last else 'NCHW'} images, eval batch {batch}")

        # PGD-20 on a fixed stratified subset
        idx = test_subset(data.y_test, n_pgd - n_pgd % 10 or 10)
        x, y = to_images(data.x_test[idx]), torch.as_tensor(data.y_test[idx], dtype=torch.long)
        x = x.contiguous(memory_format=fmt)
        n = len(y)
        ref_batches = reference_loader(data.x_test[idx], data.y_test[idx], train=False, batch_size=64)
        n_ref_batches = -(-n // 64)

        def robal_pgd() -> int:
            attack_predictions("pgd20", model, x, y, EPS, STEP, batch, device, seed=0)
            return n

        def reference_pgd() -> int:
            seen = 0
            for _ in range(n_ref_batches):
                xb, yb = ref_batches.next()
                xb, yb = xb.to(device), yb.to(device)
                (reference_pgd_whitebox(ref, xb, yb) == yb).float().sum().item()
                seen += len(yb)
            return seen

        contenders = {"robal": robal_pgd, "reference": reference_pgd,
                      "kernel-bound": pgd_kernel(model, n, batch, device, fmt)}
        for run in contenders.values():
            run()
        figures = interleaved(contenders, args.iters, device)
        robust = (attack_predictions("pgd20", model, x, y, EPS, STEP, batch, device) == y).float().mean().item()
        clean = (attack_predictions("clean", model, x, y, EPS, STEP, batch, device) == y).float().mean().item()
        report(f"PGD-20 evaluation, {n} test images (clean {100 * clean:.1f}%, PGD-20 {100 * robust:.1f}%), "
               f"{device.type}; reference: batch 64, NCHW", figures)

        if args.skip_aa:
            return
        from pyautoattack import AutoAttack

        idx = test_subset(data.y_test, max(10, n_aa - n_aa % 10))
        x, y = to_images(data.x_test[idx]), torch.as_tensor(data.y_test[idx], dtype=torch.long)
        x_nchw = x.contiguous()  # the reference's images (ToTensor: contiguous NCHW)
        recorder = CallRecorder(model)
        recorder.on = True
        preds = attack_predictions("aa-paper", model, x, y, EPS, STEP, batch, device, seed=0)  # warm-up + record
        recorder.on = False

        def robal_aa() -> int:
            attack_predictions("aa-paper", model, x, y, EPS, STEP, batch, device, seed=0)
            return len(y)

        def reference_aa() -> int:
            adversary = AutoAttack(ref, eps=EPS, norm="Linf", version="custom", attacks=["apgd-ce", "apgd-t"],
                                   device=device, seed=0)
            adversary.apgd.n_restarts = 1
            adversary.apgd_targeted.n_target_classes = 9
            adversary.logger.setLevel(50)
            adversary.run_standard_evaluation(x_nchw.to(device), y.to(device), batch_size=64)
            return len(y)

        contenders = {"robal": robal_aa, "reference": reference_aa,
                      "kernel-bound": replay_kernel(model, recorder.calls, device, len(y), fmt)}
        reference_aa()
        figures = interleaved(contenders, args.aa_iters, device)
        grads = sum(g for _, g in recorder.calls)
        report(f"AutoAttack aa-paper (APGD-CE + APGD-T), {len(y)} test images (AA accuracy "
               f"{100 * (preds == y).float().mean():.1f}%; {grads} gradient and {len(recorder.calls) - grads} "
               f"forward-only calls), {device.type}; reference: batch 64, NCHW", figures)


if __name__ == "__main__":
    main()
