"""Per-class clean and PGD-20 accuracy of several runs, side by side (the cost-of-imbalance figure, RoBal vs PGD-AT).

    python scripts/compare_per_class.py --out docs/results/cost_of_imbalance \
        "Plain, balanced=docs/results/plain_balanced.eval_300.json" \
        "Plain, long-tailed=docs/results/plain.eval_300.json" ...

Each argument is LABEL=EVAL_JSON (written by `robal eval`). Classes are ordered by the training counts of the
first long-tailed run given (a run whose class counts differ), head to tail. Writes OUT.png (one panel per
attack of --attacks, default clean and PGD-20) and OUT.md (overall, head-three and tail-three accuracy of every
run under each).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from robal.evaluate.plots import new_figure
from robal.evaluate.report import md_table

TITLES = {"clean": "clean", "pgd20": "PGD-20", "aa": "AA", "aa-paper": "AA-paper"}
GROUP = 3


def load_runs(pairs: list[str], attacks: list[str] = ("clean", "pgd20")) -> list[tuple[str, dict]]:
    runs = []
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep:
            raise SystemExit(f"compare_per_class: expected LABEL=EVAL_JSON, got {pair!r}")
        result = json.loads(Path(path).read_text())
        missing = [a for a in attacks if a not in result["attacks"]]
        if missing:
            raise SystemExit(f"compare_per_class: {path} has no {missing} results "
                             f"(run robal eval --attacks {','.join(attacks)}, or choose --attacks)")
        runs.append((label, result))
    return runs


def class_order(runs: list[tuple[str, dict]]) -> tuple[np.ndarray, list[int]]:
    """Classes from most to fewest training images of the first long-tailed run, and those counts."""
    counts = next((r["class_counts"] for _, r in runs if len(set(r["class_counts"])) > 1), runs[0][1]["class_counts"])
    return np.argsort(counts, kind="stable")[::-1], counts


def per_class(result: dict, attack: str, order: np.ndarray) -> np.ndarray:
    return np.asarray(result["attacks"][attack]["per_class"])[order]


def write_plot(runs, order, counts, path: Path, attacks=("clean", "pgd20")) -> Path:
    fig, axes = new_figure(5.5 * len(attacks), 4.0, ncols=len(attacks))
    axes = np.atleast_1d(axes)
    names = runs[0][1].get("class_names") or [str(c) for c in range(len(order))]
    ticks = [f"{names[c][:8]}\n{counts[c]}" for c in order]
    for ax, attack in zip(axes, attacks):
        for label, result in runs:
            ax.plot(np.arange(len(order)), per_class(result, attack, order), marker="o", label=label)
        ax.set_xticks(np.arange(len(order)), ticks, fontsize=7)
        ax.set_ylim(-2, 102)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{TITLES.get(attack, attack)} accuracy per class (n_test {runs[0][1]['n_test']})")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("class, long-tailed training count (head to tail)")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def table(runs, order, attacks=("clean", "pgd20")) -> str:
    header = ["run", "n_test"]
    for attack in attacks:
        title = TITLES.get(attack, attack)
        header += [f"{title} overall", f"{title} head-{GROUP}", f"{title} tail-{GROUP}"]
    rows = []
    for label, result in runs:
        row = [label, result["n_test"]]
        for attack in attacks:
            acc = per_class(result, attack, order)
            row += [f"{result['attacks'][attack]['accuracy']:.2f}", f"{acc[:GROUP].mean():.2f}",
                    f"{acc[-GROUP:].mean():.2f}"]
        rows.append(row)
    return md_table(header, rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=EVAL_JSON")
    p.add_argument("--out", required=True, help="writes OUT.png and OUT.md")
    p.add_argument("--attacks", default="clean,pgd20", help="one panel and three table columns each (default clean,pgd20)")
    args = p.parse_args()
    attacks = args.attacks.split(",")
    runs = load_runs(args.runs, attacks)
    order, counts = class_order(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_plot(runs, order, counts, out.with_suffix(".png"), attacks)
    text = table(runs, order, attacks)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
