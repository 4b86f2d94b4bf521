"""Plain-text tables of an evaluation result."""
from __future__ import annotations

from .metrics import head_to_tail


def format_table(result: dict, class_names: list[str] | None = None) -> str:
    attacks = list(result["attacks"])
    counts = result["class_counts"]
    c_all = len(result["attacks"][attacks[0]]["per_class"])
    names = class_names or [str(c) for c in range(c_all)]
    width = max(8, *(len(a) for a in attacks))
    head = f"{'':<22}" + "".join(f"{a:>{width + 2}}" for a in attacks)
    rows = [head, "-" * len(head)]

    def row(label, values):
        rows.append(f"{label:<22}" + "".join(f"{v:>{width + 2}.2f}" for v in values))

    row("overall", [result["attacks"][a]["accuracy"] for a in attacks])
    row("  +/- std error", [result["attacks"][a]["std_error"] for a in attacks])
    for group in ("many", "medium", "few") if result["attacks"][attacks[0]]["groups"] else ():
        row(group, [result["attacks"][a]["groups"][group] for a in attacks])
    row("worst class", [result["attacks"][a]["worst_class"]["accuracy"] for a in attacks])
    row("boundary error", [result["attacks"][a]["boundary_error"] for a in attacks])
    rows.append("-" * len(head))
    for c in head_to_tail(counts, c_all):
        row(f"{names[c][:12]} (n={counts[c] if counts else '?'})", [result["attacks"][a]["per_class"][c]
                                                                     for a in attacks])
    rows.append(f"groups: {result['groups_rule']}; n_test = {result['n_test']}, eps = {result['eps']:.4f}")
    return "\n".join(rows)
