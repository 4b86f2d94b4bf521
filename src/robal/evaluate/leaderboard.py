"""`robal report --leaderboard`: one row per evaluation, sorted by AutoAttack accuracy, as JSON and Markdown.

Each row: model, data, eps, the AutoAttack version and its settings, n_test, clean and AA accuracy (with standard
errors), and under that AutoAttack: balanced robustness (the mean of the per-class robust accuracies, which equals
the overall robust accuracy on a class-balanced test set), the worst class, and the tail third (the mean robust
accuracy of the third of the classes with the fewest training images). AA is the strongest AutoAttack version
the evaluation holds: the one with the lowest accuracy (`report.autoattack_of`), named in the row.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import yaml

from .attacks import aa_version, settings_summary
from .metrics import class_thirds
from .report import DASH, autoattack_of, f2, md_table, method_name, read_eval, with_se


def eps_label(eps: float) -> str:
    """8/255 for 0.0313..., else the number."""
    frac = Fraction(eps * 255).limit_denominator(1)
    return f"{frac.numerator}/255" if frac and abs(eps * 255 - frac.numerator) < 1e-6 else f"{eps:g}"


def data_label(result: dict, path: Path) -> str:
    """The evaluation's `data` entry if it has one, else the training config beside it (source, subset, ratio)."""
    data = result.get("data")
    if isinstance(data, str):
        return data
    if not isinstance(data, dict):
        config = path.parent / "config.yaml"
        data = (yaml.safe_load(config.read_text()) or {}).get("data") if config.is_file() else None
    if not isinstance(data, dict):
        return DASH
    source = data.get("name") or data.get("source") or "?"
    if data.get("path") and source == "npz":
        source = Path(data["path"]).stem
    if data.get("subset", "long_tailed") == "long_tailed" and data.get("imbalance_ratio"):
        return f"{source}-LT ratio {data['imbalance_ratio']:g}"
    return f"{source} ({data['subset']})" if data.get("subset") else source


def aa_settings_text(result: dict, aa: str) -> str:
    settings = result["attacks"][aa].get("settings")
    if settings:
        return settings_summary(settings)
    try:  # an evaluation written before settings were recorded: the version's description
        return aa_version(aa).description + " (settings not recorded)"
    except ValueError:
        return "settings not recorded"


def leaderboard_row(path: Path, result: dict) -> dict:
    attacks = result["attacks"]
    aa = autoattack_of(result)
    clean = attacks.get("clean")
    row = {"model": method_name(result, path), "run": str(path), "data": data_label(result, path),
           "eps": result["eps"], "n_test": result["n_test"], "aa_version": aa,
           "aa_settings": aa_settings_text(result, aa) if aa else None,
           "clean": clean["accuracy"] if clean else None, "clean_se": clean["std_error"] if clean else None,
           "aa": None, "aa_se": None, "balanced_robustness": None, "worst_class": None, "tail_third": None,
           "tail_classes": None}
    if aa is None:
        return row
    m = attacks[aa]
    names = result.get("class_names") or [str(c) for c in range(len(m["per_class"]))]
    worst = m["worst_class"]["class"]
    row.update(aa=m["accuracy"], aa_se=m["std_error"], balanced_robustness=float(np.nanmean(m["per_class"])),
               worst_class={"class": worst, "name": names[worst], "accuracy": m["worst_class"]["accuracy"]})
    counts = result.get("class_counts")
    if counts and len(counts) == len(m["per_class"]):
        tail = class_thirds(counts)[2]
        row.update(tail_classes=tail, tail_third=float(np.nanmean([m["per_class"][c] for c in tail])))
    return row


def leaderboard(runs: list[str | Path]) -> dict:
    """The rows of the evaluations (run directories or eval JSONs), highest AA first (rows without AA last)."""
    rows = [leaderboard_row(*read_eval(r)) for r in runs]
    rows.sort(key=lambda r: (r["aa"] is None, -(r["aa"] or 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    notes = []
    for key, what in (("aa_version", "AutoAttack versions"), ("eps", "eps"), ("n_test", "test sets (n_test)"),
                      ("data", "data")):
        values = {json.dumps(r[key]) for r in rows if r[key] is not None}
        if len(values) > 1:
            notes.append(f"the rows differ in {what}: compare them with care")
    return {"sorted_by": "aa", "aa_rule": "the strongest AutoAttack version each evaluation holds (lowest accuracy)",
            "balanced_robustness": "mean over classes of the per-class AA accuracy",
            "tail_third": "mean AA accuracy over the third of the classes with the fewest training images",
            "notes": notes, "rows": rows}


def leaderboard_markdown(board: dict) -> str:
    header = ["#", "Model", "Data", "eps", "AA version", "AA settings", "n_test", "Clean", "AA",
              "Balanced robustness", "Worst class (AA)", "Tail third (AA)"]
    cells = [[r["rank"], r["model"], r["data"], eps_label(r["eps"]), r["aa_version"] or DASH,
              r["aa_settings"] or DASH, r["n_test"], with_se(r["clean"], r["clean_se"]), with_se(r["aa"], r["aa_se"]),
              f2(r["balanced_robustness"]),
              f"{f2(r['worst_class']['accuracy'])} ({r['worst_class']['name']})" if r["worst_class"] else DASH,
              f2(r["tail_third"])] for r in board["rows"]]
    intro = (f"Sorted by AA: {board['aa_rule']}. Accuracies in percent, ± one standard error. Balanced robustness: "
             f"{board['balanced_robustness']}. Tail third: {board['tail_third']}.")
    notes = "".join(f"\n\nNote: {n}." for n in board["notes"])
    return intro + notes + "\n\n" + md_table(header, cells) + "\n"


def write_leaderboard(runs: list[str | Path], out: str | Path | None = None) -> str:
    """The leaderboard's Markdown; with `out` (FILE.md), also written there and as JSON beside it (FILE.json)."""
    board = leaderboard(runs)
    text = leaderboard_markdown(board)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(board, indent=1))
    return text
