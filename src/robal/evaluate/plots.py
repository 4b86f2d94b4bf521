"""PNG plots of an evaluation (per-class bars, accuracy vs PGD steps, confusion under attack) and of a report.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so no window opens and a caller's own
backend is left alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .attacks import is_autoattack
from .metrics import GRADIENT_ATTACKS, head_to_tail, strongest


def new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: the CLI starts a second sooner without it
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def class_labels(result: dict) -> list[str]:
    c = num_classes(result)
    names = result.get("class_names") or [str(k) for k in range(c)]
    counts = result["class_counts"] or ["?"] * c
    return [f"{name[:10]}\nn={n}" for name, n in zip(names, counts)]


def num_classes(result: dict) -> int:
    return len(next(iter(result["attacks"].values()))["per_class"])


def headline_attacks(result: dict) -> list[str]:
    """clean, PGD-20 (else the strongest gradient attack), the strongest AutoAttack variant: those that ran."""
    attacks = result["attacks"]
    pgd = "pgd20" if "pgd20" in attacks else strongest(attacks, GRADIENT_ATTACKS)
    aa = strongest(attacks, [a for a in attacks if is_autoattack(a)])
    return [a for a in ("clean", pgd, aa) if a is not None and a in attacks]


def per_class_plot(result: dict, path: Path) -> Path:
    """Accuracy per class under clean / PGD / AA, classes ordered by training images (head to tail)."""
    order = np.asarray(head_to_tail(result["class_counts"], num_classes(result)))
    names = headline_attacks(result)
    labels = class_labels(result)
    fig, ax = new_figure(max(6.0, 0.5 * len(order) * len(names) ** 0.5), 4.0)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        acc = np.asarray(result["attacks"][name]["per_class"])[order]
        ax.bar(np.arange(len(order)) + (k - (len(names) - 1) / 2) * width, acc, width, label=name)
    if len(order) <= 20:
        ax.set_xticks(np.arange(len(order)), [labels[c] for c in order], fontsize=7)
    else:
        ax.set_xlabel("classes, most to fewest training images")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"per-class accuracy (n_test {result['n_test']}, eps {result['eps']:.4g})")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def check_values(result: dict, name: str) -> dict | None:
    return next((c.get("values") for c in result.get("checks", []) if c["name"] == name), None)


def steps_plot(result: dict, path: Path) -> Path | None:
    """Accuracy vs PGD steps (and vs eps) from the `more_steps` / `larger_eps` checks; None without them."""
    eps = check_values(result, "larger_eps")
    large = check_values(result, "large_eps_to_zero")
    if eps and large:  # the eps-0.5 point of large_eps_to_zero extends the eps curve
        eps = {"eps": eps["eps"] + [large["eps"]], "accuracy": eps["accuracy"] + [large["accuracy"]]}
    panels = [(v, key) for v, key in ((check_values(result, "more_steps"), "steps"), (eps, "eps")) if v]
    if not panels:
        return None
    fig, axes = new_figure(4.0 * len(panels), 3.2, len(panels))
    for ax, (values, key) in zip(np.atleast_1d(axes), panels):
        ax.plot(values[key], values["accuracy"], "o-")
        ax.set_xlabel("PGD steps" if key == "steps" else "eps (PGD-20)")
        ax.set_ylabel("accuracy on the checks subset (%)")
        ax.set_ylim(0, 100)
        if key == "steps":
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(values["steps"], [str(s) for s in values["steps"]])
    fig.suptitle("accuracy must not rise with more steps or a larger eps")
    fig.savefig(path, dpi=120)
    return path


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-normalised, in percent: row = true class, column = predicted class."""
    m = np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    return 100 * m / np.maximum(m.sum(1, keepdims=True), 1)


def confusion_plot(result: dict, path: Path) -> Path:
    """Where each true class goes under the strongest attack that ran; classes ordered head to tail."""
    attacks = result["attacks"]
    name = strongest(attacks, [a for a in attacks if a != "clean"]) or "clean"
    c = num_classes(result)
    order = np.asarray(head_to_tail(result["class_counts"], c))
    m = confusion_matrix(np.asarray(result["labels"]), np.asarray(attacks[name]["predictions"]), c)[order][:, order]
    fig, ax = new_figure(max(5.0, 0.45 * c), max(4.2, 0.4 * c))
    image = ax.imshow(m, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of the true class")
    if c <= 20:
        labels = [class_labels(result)[k].replace("\n", " ") for k in order]
        ax.set_xticks(range(c), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(c), labels, fontsize=7)
        for i in range(c):
            for j in range(c):
                if m[i, j] >= 0.5:
                    ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] > 50 else "black")
    ax.set_xlabel("predicted class (head to tail)")
    ax.set_ylabel("true class (head to tail)")
    ax.set_title(f"confusion under {name} ({attacks[name]['accuracy']:.1f}%)")
    fig.savefig(path, dpi=120)
    return path


def write_eval_plots(result: dict, folder: Path, stem: str = "eval") -> dict[str, Path]:
    """The evaluation's plots as `{stem}_per_class.png`, `{stem}_pgd_steps.png`, `{stem}_confusion.png`."""
    folder = Path(folder)
    plots = {"per_class": per_class_plot(result, folder / f"{stem}_per_class.png"),
             "pgd_steps": steps_plot(result, folder / f"{stem}_pgd_steps.png"),
             "confusion": confusion_plot(result, folder / f"{stem}_confusion.png")}
    return {k: p for k, p in plots.items() if p is not None}


def report_plot(rows: list[dict], path: Path) -> Path:
    """Clean, PGD-20 and AA accuracy of each run of a report, side by side."""
    columns = [("clean", "Clean"), ("pgd", "PGD-20"), ("aa", "AA")]
    fig, ax = new_figure(max(6.0, 1.1 * len(rows)), 4.0)
    width = 0.8 / len(columns)
    for k, (key, label) in enumerate(columns):
        acc = [r[key] if r[key] is not None else np.nan for r in rows]
        ax.bar(np.arange(len(rows)) + (k - 1) * width, acc, width, label=label)
    ax.set_xticks(np.arange(len(rows)), [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("clean vs robust accuracy per run (gap = Clean - AA)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path
