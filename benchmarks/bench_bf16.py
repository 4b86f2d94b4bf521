"""bf16 autocast against fp32 on a trained model: do attacks and accuracies agree, and what does bf16 save?

For one checkpoint, on its own test set: the input gradient of CE (what every attack steps along) in fp32 and under
bf16 autocast (share of pixels whose sign agrees, cosine of the two gradients); clean, PGD-20 (same seed) and
AA-paper accuracy in each precision on the same stratified images, with the seconds each took. Prints a table
and writes the figures to --json. The evidence issue 27 asks for before bf16 could become a default:

    .venv/bin/python benchmarks/bench_bf16.py --checkpoint docs/results/models/robal_n.pt --device cuda \\
        --n 1000 --n-aa 1000 --json bf16_robal_n.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from robal.config import from_dict, Config
from robal.data import prepare_data
from robal.evaluate.runner import evaluate_model, test_subset, to_images
from robal.train.checkpoint import load_model, read_checkpoint, resolve_model_path


class Autocast(nn.Module):
    """The model under bf16 autocast, returning fp32 logits (what the attacks and metrics expect)."""

    def __init__(self, model, device):
        super().__init__()
        self.model, self.device_type = model, torch.device(device).type

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


def input_gradient(model, x, y, batch_size):
    grads = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].clone().requires_grad_(True)
        F.cross_entropy(model(xb), y[i:i + batch_size], reduction="sum").backward()
        grads.append(xb.grad.detach())
    return torch.cat(grads)


def gradient_agreement(fp32, bf16, x, y, batch_size) -> dict:
    g32, g16 = input_gradient(fp32, x, y, batch_size), input_gradient(bf16, x, y, batch_size)
    cosine = F.cosine_similarity(g32.flatten(1), g16.flatten(1), dim=1)
    return {"sign_agreement": (g32.sign() == g16.sign()).float().mean().item(),
            "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a robal checkpoint, run directory or zoo:NAME")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=1000, help="stratified test images for clean, PGD-20 and gradients")
    p.add_argument("--n-aa", type=int, default=1000, help="stratified test images for AA-paper (0: skip)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--data-path", default=None, help="the dataset file, when not where the checkpoint's config says")
    args = p.parse_args(argv)

    path = resolve_model_path(args.checkpoint)
    cfg = from_dict(Config, read_checkpoint(path)["meta"]["config"])
    if args.data_path:
        cfg.data.path = args.data_path
    data = prepare_data(cfg.data)
    fp32 = load_model(path, args.device)
    models = {"fp32": fp32, "bf16": Autocast(fp32, args.device).eval()}
    idx = test_subset(data.y_test, args.n)
    x = to_images(data.x_test[idx]).to(args.device)
    y = torch.as_tensor(data.y_test[idx], dtype=torch.long, device=args.device)
    figures = {"checkpoint": str(path), "device": str(args.device), "n": args.n, "n_aa": args.n_aa,
               "gradients": gradient_agreement(fp32, models["bf16"], x, y, args.batch_size)}
    common = dict(eps=cfg.eval.eps, step_size=cfg.eval.step_size, class_counts=list(data.class_counts),
                  batch_size=args.batch_size, device=args.device, progress=False)
    for name, model in models.items():
        start = time.perf_counter()
        result = evaluate_model(model, data.x_test, data.y_test, ["clean", "pgd20"], n_test=args.n, **common)
        row = {k: result["attacks"][k]["accuracy"] for k in ("clean", "pgd20")}
        row["seconds"] = {k: result["seconds"][k] for k in ("clean", "pgd20")}
        if args.n_aa:
            aa = evaluate_model(model, data.x_test, data.y_test, ["aa-paper"], n_test=args.n_aa, **common)
            row["aa-paper"] = aa["attacks"]["aa-paper"]["accuracy"]
            row["seconds"]["aa-paper"] = aa["seconds"]["aa-paper"]
        row["seconds"]["total"] = round(time.perf_counter() - start, 2)
        figures[name] = row
    g = figures["gradients"]
    print(f"{path} on {args.device}: input-gradient signs agree on {100 * g['sign_agreement']:.2f}% of pixels, "
          f"cosine mean {g['cosine_mean']:.4f} (min {g['cosine_min']:.4f}), {args.n} images")
    print(f"{'':6} {'clean':>7} {'PGD-20':>7} {'AA-paper':>9}   seconds (clean, PGD-20, AA-paper)")
    for name in models:
        r = figures[name]
        print(f"{name:6} {r['clean']:7.2f} {r['pgd20']:7.2f} {r.get('aa-paper', float('nan')):9.2f}   "
              f"{r['seconds']['clean']}, {r['seconds']['pgd20']}, {r['seconds'].get('aa-paper', '-')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
