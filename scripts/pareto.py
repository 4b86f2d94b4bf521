"""Which method should I use? Clean accuracy against AutoAttack accuracy for every study row, and its Pareto front.

For every row NAME with both NAME.eval_full.json (clean on all 10,000 test images) and NAME.eval_aa.json (standard
AutoAttack on the fixed stratified 1,000) in docs/results: clean, standard AA, the tail third's standard AA (the
third of the classes with the fewest training images: 300 of the 1,000 on CIFAR-10-LT), whether the row is on the
clean-vs-AA Pareto front (no other row trained for as many epochs has both higher clean and higher AA accuracy: the
80-epoch rows of the paper's schedule have a front of their own, so that a longer training budget does not pass for
a better method), and its AA gains over PGD-AT (20 epochs) on the same 1,000 images (all of them, and the tail
third's) with two paired standard errors (the noise a claim about the row must beat). Writes a Markdown table and a
two-panel plot (clean vs AA, clean vs tail-third AA).

    python scripts/pareto.py [--results docs/results] [--out docs/results/pareto]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from study_tables import ALL_ROWS, E80

from robal.evaluate.report import paired_gains, tail_third_accuracy, tail_third_gain

BASELINE = "pgd_at"
EPOCHS = {row: 80 for row, _, _ in E80}  # every other row trains the CPU reference setting's 20 epochs


def rows() -> list[tuple[str, str]]:
    """(row, label) of every study row, each once: Table 2, Table 1, the later methods."""
    return [(row, label) for row, label, _ in ALL_ROWS]


def load(results: Path, row: str) -> tuple[dict, dict] | None:
    paths = [results / f"{row}.{kind}.json" for kind in ("eval_full", "eval_aa")]
    return tuple(json.loads(p.read_text()) for p in paths) if all(p.is_file() for p in paths) else None


def points(results: Path) -> list[dict]:
    baseline = load(results, BASELINE)
    out = []
    for row, label in rows():
        loaded = load(results, row)
        if loaded is None:
            continue
        full, aa = loaded
        gain, noise = paired_gains(aa, baseline[1])["aa"] if baseline and row != BASELINE else (None, None)
        tail_gain, tail_noise = tail_third_gain(aa, baseline[1], "aa") if baseline and row != BASELINE else (None, None)
        out.append({"row": row, "label": label, "epochs": EPOCHS.get(row, 20),
                    "clean": full["attacks"]["clean"]["accuracy"], "aa": aa["attacks"]["aa"]["accuracy"],
                    "tail_aa": tail_third_accuracy(aa, "aa"),
                    "gain": gain, "noise": noise, "tail_gain": tail_gain, "tail_noise": tail_noise})
    return out


def pareto_front(pts: list[dict], y: str) -> set[str]:
    """Rows that no other row beats on both clean accuracy and `y` (ties do not dominate)."""
    return {p["row"] for p in pts
            if not any(q["clean"] >= p["clean"] and q[y] >= p[y] and (q["clean"], q[y]) != (p["clean"], p[y])
                       for q in pts)}


def fronts(pts: list[dict], y: str) -> set[str]:
    """The Pareto front of each training budget: rows compete only with rows trained for as many epochs."""
    budgets = {p["epochs"] for p in pts}
    return set().union(*(pareto_front([p for p in pts if p["epochs"] == e], y) for e in budgets))


def table(pts: list[dict]) -> str:
    front, tail_front = fronts(pts, "aa"), fronts(pts, "tail_aa")
    lines = ["| Row | epochs | Clean (10,000) | standard AA (1,000) | tail-third AA (300 of the 1,000) | "
             "vs PGD-AT, paired (two SE): AA / tail-third AA | front: clean-AA | front: clean-tail AA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in sorted(pts, key=lambda p: -p["clean"]):
        gains = "" if p["gain"] is None else (f"{p['gain']:+.2f} ({p['noise']:.2f}) / "
                                              f"{p['tail_gain']:+.2f} ({p['tail_noise']:.2f})")
        lines.append(f"| {p['label']} | {p['epochs']} | {p['clean']:.2f} | {p['aa']:.2f} | {p['tail_aa']:.2f} | "
                     f"{gains} | {'yes' if p['row'] in front else ''} | {'yes' if p['row'] in tail_front else ''} |")
    return "\n".join(lines) + "\n"


MARKERS, LINES = {20: "o", 80: "D"}, {20: "-", 80: "--"}


def plot(pts: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, y, name in zip(fig.subplots(1, 2), ("aa", "tail_aa"), ("standard AA", "tail-third standard AA")):
        front = fronts(pts, y)
        for p in pts:
            on = p["row"] in front
            ax.scatter(p["clean"], p[y], s=40 if on else 18, color="tab:red" if on else "tab:gray",
                       marker=MARKERS[p["epochs"]], zorder=3)
            ax.annotate(p["label"], (p["clean"], p[y]), fontsize=7, xytext=(3, 2), textcoords="offset points")
        for epochs in sorted({p["epochs"] for p in pts}):
            line = sorted((p["clean"], p[y]) for p in pts if p["row"] in front and p["epochs"] == epochs)
            ax.plot(*zip(*line), color="tab:red", lw=1, ls=LINES[epochs], zorder=2)
        ax.set_xlabel("clean accuracy, all 10,000 test images (%)")
        ax.set_ylabel(f"{name}, stratified 1,000 (%)")
        ax.grid(alpha=0.3)
        ax.set_title(f"clean vs {name} (red: Pareto front of each budget)", fontsize=10)
    fig.suptitle("CIFAR-10-LT rho 50 (JPEG-decoded), PreAct-ResNet-18 w16, eps 8/255; "
                 "dots and solid front: 20 epochs, diamonds and dashed front: 80 epochs", fontsize=10)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="docs/results", type=Path)
    p.add_argument("--out", default="docs/results/pareto", help="writes OUT.md and OUT.png")
    args = p.parse_args(argv)
    pts = points(args.results)
    if not pts:
        raise SystemExit(f"no row has both eval_full and eval_aa JSONs in {args.results}")
    text = table(pts)
    print(text, end="")
    Path(f"{args.out}.md").write_text(text)
    plot(pts, Path(f"{args.out}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
