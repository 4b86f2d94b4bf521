"""bf16 against fp32 training (issue 27 item 1): is the precision's effect larger than a change of seed?

For PGD-AT and RoBal-N at seeds 0 and 1, reads each row's clean accuracy on all 10,000 test images and its PGD-20 and
AA-paper on the stratified 1,000, in fp32 (the study's rows: docs/results/NAME.eval_full.json or
NAME_seed1.eval_clean_10k.json, and NAME[_seed1].eval_1000.json) and in bf16 (docs/results/bf16/NAME[_seed1].*,
`scripts/study.sh --configs configs/cifar10_lt/bf16 --subset-1000 / --cpu-protocol`). Writes a Markdown table of the
accuracies, then the paired differences on the same images (two paired standard errors): bf16 - fp32 at the same
seed, beside seed 1 - seed 0 at the same precision, the yardstick a precision effect has to exceed.

    python scripts/bf16_report.py [--results docs/results] [--out docs/results/bf16.md]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robal.evaluate.report import paired_gains, tail_third_gain

METHODS = (("pgd_at", "PGD-AT"), ("robal_n", "RoBal-N"))
SEEDS = (0, 1)
PRECISIONS = ("fp32", "bf16")
# (column, evaluation kind, attack); the clean 10,000 of a seed-0 fp32 row is in its eval_full
COLUMNS = (("clean (10,000)", "clean_10k", "clean"), ("PGD-20 (1,000)", "eval_1000", "pgd20"),
           ("AA-paper (1,000)", "eval_1000", "aa-paper"))


def row_files(results: Path, method: str, seed: int, precision: str) -> dict[str, Path]:
    folder = results / "bf16" if precision == "bf16" else results
    name = method if seed == 0 else f"{method}_seed{seed}"
    clean = folder / f"{name}.eval_clean_10k.json"
    if not clean.is_file() and (folder / f"{name}.eval_full.json").is_file():
        clean = folder / f"{name}.eval_full.json"
    return {"clean_10k": clean, "eval_1000": folder / f"{name}.eval_1000.json"}


def load(results: Path) -> dict[tuple[str, int, str], dict]:
    """(method, seed, precision) -> evaluations by kind, for the rows whose evaluations all exist."""
    rows = {}
    for method, _ in METHODS:
        for seed in SEEDS:
            for precision in PRECISIONS:
                files = row_files(results, method, seed, precision)
                if all(f.is_file() for f in files.values()):
                    rows[(method, seed, precision)] = {k: json.loads(f.read_text()) for k, f in files.items()}
    return rows


def differences(a: dict, b: dict) -> list[tuple[float, float]]:
    """a - b on the same images, two paired SE, for every column and the tail third's AA-paper."""
    out = [paired_gains(a[kind], b[kind])[attack] for _, kind, attack in COLUMNS]
    return out + [tail_third_gain(a["eval_1000"], b["eval_1000"], "aa-paper")]


def report(rows: dict) -> str:
    header = ["Method", "seed", "precision", *(c for c, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method, label in METHODS:
        for seed in SEEDS:
            for precision in PRECISIONS:
                r = rows.get((method, seed, precision))
                cells = ["not run yet"] * len(COLUMNS) if r is None else [
                    f"{r[kind]['attacks'][attack]['accuracy']:.2f} ± {r[kind]['attacks'][attack]['std_error']:.2f}"
                    for _, kind, attack in COLUMNS]
                lines.append(f"| {label} | {seed} | {precision} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences on the same images (two SE): " + " / ".join(c for c, _, _ in COLUMNS)
              + " / tail-third AA-paper (300 of the 1,000)", "",
              "| Method | bf16 - fp32, seed 0 | bf16 - fp32, seed 1 | seed 1 - seed 0, fp32 | seed 1 - seed 0, bf16 |",
              "| --- | --- | --- | --- | --- |"]
    for method, label in METHODS:
        pairs = [((method, s, "bf16"), (method, s, "fp32")) for s in SEEDS]
        pairs += [((method, 1, p), (method, 0, p)) for p in PRECISIONS]
        cells = [" / ".join(f"{d:+.2f} ({n:.2f})" for d, n in differences(rows[a], rows[b]))
                 if a in rows and b in rows else "not run yet" for a, b in pairs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="docs/results", type=Path)
    p.add_argument("--out", default="docs/results/bf16.md", type=Path)
    args = p.parse_args(argv)
    text = report(load(args.results))
    print(text, end="")
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
