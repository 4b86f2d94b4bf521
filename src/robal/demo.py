"""`robal demo`: PGD-AT vs RoBal-N on long-tailed digits, per-class clean and PGD-20 accuracy."""
from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

from .config import load_config
from .data import prepare_data
from .evaluate.runner import evaluate_model
from .rundir import RunDirError, check_replaceable, contents
from .train.trainer import train

DEMO_CONFIGS = {"PGD-AT": "digits_lt/pgd_at.yaml", "RoBal-N": "digits_lt/robal_n.yaml"}


def builtin_config(name: str) -> Path:
    return Path(str(resources.files("robal") / "configs" / name))


def check_demo_dirs(root: Path, overwrite: bool) -> None:
    """Before any training: the demo's run directories under `root` are free, or robal runs to replace."""
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--out {root} is a file, not a directory")
    for name in DEMO_CONFIGS.values():
        run = root / Path(name).stem
        if run.exists() and (not run.is_dir() or contents(run)):
            if not overwrite:
                raise RunDirError(f"{run} already exists; pass --overwrite to replace the demo's runs in {root}, "
                                  f"or choose another --out")
            check_replaceable(run)


def run_demo(out: str | None = None, epochs: int | None = None, overwrite: bool = False) -> dict:
    overrides = [f"train.epochs={epochs}", "train.lr_milestones=[]"] if epochs else []
    results = {}
    if out:
        check_demo_dirs(Path(out), overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out) if out else Path(tmp)
        for label, name in DEMO_CONFIGS.items():
            cfg = load_config(builtin_config(name), overrides)
            print(f"== training {label} ({name}, {cfg.train.epochs} epochs, eps {cfg.train.attack.eps}) ==")
            model = train(cfg, root / Path(name).stem, overwrite=overwrite, progress=False)
            data = prepare_data(cfg.data)
            results[label] = evaluate_model(model, data.x_test, data.y_test, ["pgd20"], cfg.eval.eps,
                                            cfg.eval.step_size, data.class_counts, progress=False)
    counts = data.class_counts
    print(f"\nLong-tailed digits: {sum(counts)} training images ({counts[0]} down to {counts[-1]} per class), "
          f"balanced test set of {results['PGD-AT']['n_test']}; L-inf eps {cfg.eval.eps} on [0, 1] pixels, "
          f"PGD-20 step {cfg.eval.step_size}.")
    print(f"{'class':>5} {'n':>5} | {'PGD-AT clean':>12} {'PGD-20':>7} | {'RoBal-N clean':>13} {'PGD-20':>7} | "
          f"{'PGD-20 gain':>11}")
    for c, n in enumerate(counts):
        a, r = (results[k]["attacks"] for k in ("PGD-AT", "RoBal-N"))
        print(f"{c:>5} {n:>5} | {a['clean']['per_class'][c]:>12.1f} {a['pgd20']['per_class'][c]:>7.1f} | "
              f"{r['clean']['per_class'][c]:>13.1f} {r['pgd20']['per_class'][c]:>7.1f} | "
              f"{r['pgd20']['per_class'][c] - a['pgd20']['per_class'][c]:>+11.1f}")
    for label in DEMO_CONFIGS:
        att = results[label]["attacks"]
        print(f"{label:>8}: clean {att['clean']['accuracy']:.1f}%, PGD-20 {att['pgd20']['accuracy']:.1f}%, "
              f"PGD-20 on the 5 tail classes {sum(att['pgd20']['per_class'][5:]) / 5:.1f}%")
    return results
