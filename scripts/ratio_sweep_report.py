"""The imbalance-ratio sweep (paper Table 4): PGD-AT and RoBal-N against the imbalance ratio, table and plot.

For each ratio and method, reads the row's NAME.eval_full.json (clean and PGD-20 on all 10,000 test images) and
NAME.eval_1000.json (AA-paper on the stratified 1,000): ratio 50 is the study's own row (docs/results/pgd_at.*,
docs/results/robal_n.*), the other ratios docs/results/ratio_sweep/{pgd_at,robal_n}_rRATIO.* (`scripts/ratio_sweep.sh`).
Writes a Markdown table (accuracy ± standard error, the tail third's AA-paper, and RoBal-N minus PGD-AT on the same
images with two paired standard errors) and a three-panel plot (clean, AA-paper and the tail third's AA-paper against
the ratio). Rows not run yet are listed as such.

    python scripts/ratio_sweep_report.py [--results docs/results] [--out docs/results/ratio_sweep]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robal.evaluate.metrics import standard_error
from robal.evaluate.report import in_tail_third, paired_gains, tail_third_accuracy, tail_third_gain

RATIOS = (10, 20, 50, 100)
METHODS = (("pgd_at", "PGD-AT"), ("robal_n", "RoBal-N"))
STUDY_RATIO = 50  # the study's own rows
# (column, evaluation kind, attack); the tail third's AA-paper is computed from the 1,000's per-image predictions
COLUMNS = (("Clean (10,000)", "eval_full", "clean"), ("PGD-20 (10,000)", "eval_full", "pgd20"),
           ("AA-paper (1,000)", "eval_1000", "aa-paper"))


def row_path(results: Path, method: str, ratio: int, kind: str) -> Path:
    name = f"{method}.{kind}.json" if ratio == STUDY_RATIO else f"ratio_sweep/{method}_r{ratio}.{kind}.json"
    return results / name


def load(results: Path, method: str, ratio: int) -> dict[str, dict] | None:
    """The row's evaluations by kind, or None until both were run."""
    paths = {kind: row_path(results, method, ratio, kind) for kind in ("eval_full", "eval_1000")}
    if not all(p.is_file() for p in paths.values()):
        return None
    return {kind: json.loads(p.read_text()) for kind, p in paths.items()}


def points(results: Path) -> dict[tuple[str, int], dict]:
    """(method, ratio) -> accuracies with standard errors, training images, and RoBal-N's paired gains."""
    loaded = {(m, r): load(results, m, r) for m, _ in METHODS for r in RATIOS}
    out = {}
    for (method, ratio), evals in loaded.items():
        if evals is None:
            continue
        point = {"train_images": sum(evals["eval_full"]["class_counts"])}
        for _, kind, attack in COLUMNS:
            a = evals[kind]["attacks"][attack]
            point[attack] = (a["accuracy"], a["std_error"])
        tail = tail_third_accuracy(evals["eval_1000"], "aa-paper")
        point["tail"] = (tail, standard_error(tail, int(in_tail_third(evals["eval_1000"]).sum())))
        base = loaded[(METHODS[0][0], ratio)]
        if method != METHODS[0][0] and base is not None:
            point["gains"] = [paired_gains(evals[kind], base[kind])[attack] for _, kind, attack in COLUMNS]
            point["gains"].append(tail_third_gain(evals["eval_1000"], base["eval_1000"], "aa-paper"))
        out[(method, ratio)] = point
    return out


def table(pts: dict) -> str:
    header = ["Ratio", "Method", "training images", *(c for c, _, _ in COLUMNS), "tail-third AA-paper (300 of the 1,000)",
              "RoBal-N - PGD-AT, paired (two SE): clean / PGD-20 / AA-paper / tail-third AA-paper"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for ratio in RATIOS:
        for method, label in METHODS:
            p = pts.get((method, ratio))
            if p is None:
                lines.append(f"| {ratio} | {label} | not run yet |" + " |" * (len(header) - 3))
                continue
            acc = [f"{a:.2f} ± {se:.2f}" for a, se in (p[attack] for _, _, attack in COLUMNS)]
            gains = " / ".join(f"{g:+.2f} ({n:.2f})" for g, n in p["gains"]) if "gains" in p else ""
            lines.append(f"| {ratio} | {label} | {p['train_images']:,} | " + " | ".join(acc)
                         + f" | {p['tail'][0]:.2f} ± {p['tail'][1]:.2f} | {gains} |")
    return "\n".join(lines) + "\n"


def plot(pts: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (("clean", "clean, all 10,000 test images"), ("aa-paper", "AA-paper, stratified 1,000"),
              ("tail", "tail third's AA-paper (300 of the 1,000)"))
    for ax, (key, name) in zip(fig.subplots(1, 3), panels):
        for method, label in METHODS:
            ratios = [r for r in RATIOS if (method, r) in pts]
            values = [pts[(method, r)][key] for r in ratios]
            ax.errorbar(ratios, [v for v, _ in values], yerr=[se for _, se in values], marker="o", capsize=3,
                        label=label)
        ax.set_xscale("log")
        ax.set_xticks(RATIOS, [str(r) for r in RATIOS])
        ax.set_xlabel("imbalance ratio n_max / n_min")
        ax.set_ylabel(f"{name} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("CIFAR-10-LT (JPEG-decoded), PreAct-ResNet-18 w16, 20 epochs, eps 8/255, seed 0; error bars: one "
                 "standard error", fontsize=10)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="docs/results", type=Path)
    p.add_argument("--out", default="docs/results/ratio_sweep", help="writes OUT.md and OUT.png")
    args = p.parse_args(argv)
    pts = points(args.results)
    text = table(pts)
    print(text, end="")
    Path(f"{args.out}.md").write_text(text)
    plot(pts, Path(f"{args.out}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
