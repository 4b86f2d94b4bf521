"""The study's tables (paper Tables 1 and 2, seed repeats) from the evaluation JSONs in docs/results/.

Reads, for each row NAME, the two evaluations of `scripts/study.sh --cpu-protocol`: NAME.eval_clean_10k.json
(clean on all 10,000 test images) and NAME.eval_300.json (clean, PGD-20, AA-paper and the reliability checks
on the fixed stratified 300-image subset), and NAME.eval_full.json (PGD-20 on all 10,000, the full protocol)
where it exists. Rows without the first two are listed as not run. Each row also gets its
PGD-20 and AA gains over PGD-AT on the same 300 images and the PGD-20 gain AutoAttack does not confirm
(`robal report --baseline`). The paper's numbers (WRN-34-10, 80 epochs, original CIFAR-10 files) stand beside.
Then three tables hold the Table 2 rows, the Table 1 rows and the later methods (with PGD-AT and RoBal-N) at
issue 9's sizes, where they were run: NAME.eval_full.json
(clean and PGD-20 on all 10,000), NAME.eval_1000.json (clean, PGD-20, AA-paper on the stratified 1,000) and
NAME.eval_aa.json (AA-paper and standard AA on the same 1,000), with paired gains over PGD-AT (the later methods: and
over RoBal-N) and the PGD-20 gain that AA-paper does not confirm on the 1,000; then the 80-epoch rows beside the
20-epoch ones, paired with PGD-AT of 20 and of 80 epochs. The last table sets the 10-step
AutoAttack of later papers (NAME.eval_aa10step.json, `scripts/study.sh --aa-10step`) beside the official AA of
NAME.eval_aa.json on the same 1,000 images, for every row that has both.

    python scripts/study_tables.py [--results docs/results] [--doc docs/results.md]

prints the tables and, with --doc, replaces the block between the two STUDY-TABLES markers of that file.
"""
from __future__ import annotations

import argparse
import json
import statistics
from itertools import combinations
from pathlib import Path

from robal.evaluate.checks import paired_noise
from robal.evaluate.report import autoattack_of, correct, gain_over_baseline, paired_gains, with_se

BASELINE = "pgd_at"
BEGIN, END = "<!-- STUDY-TABLES BEGIN (scripts/study_tables.py) -->", "<!-- STUDY-TABLES END -->"

# (row, label, paper Clean / PGD-20 / AA on CIFAR-10-LT rho 50, or None where the paper has no such row)
TABLE_1 = [
    ("pgd_at", "FC (= PGD-AT)", (62.33, 29.30, 28.15)),
    ("cos", "Cos", (56.59, 29.38, 27.23)),
    ("ldam", "LDAM", (63.24, 29.81, 28.70)),
    ("ldam_drw", "LDAM-DRW", None),
    ("cos_margin", "Cos+margin", (58.47, 31.73, 28.45)),
    ("cdt", "CDT", (73.11, 30.12, 28.62)),
    ("logit_adjust", "logit adjustment", (74.46, 32.45, 30.55)),
    ("focal", "focal", (62.07, 30.73, 28.12)),
    ("resampling", "re-sampling", (58.62, 25.06, 24.25)),
    ("cb_reweight", "CB re-weighting", (64.33, 34.53, 29.01)),
    ("finetune_rs", "1-epoch RS", (70.88, 29.81, 28.59)),
    ("finetune_rw", "1-epoch RW", (71.72, 32.34, 28.25)),
    ("finetune_lws", "LWS", (69.63, 28.81, 27.99)),
    ("finetune_crt", "cRT", None),
    ("cdt_post", "CDT-post", (73.84, 39.05, 28.23)),
    ("tau_norm", "tau-norm", (72.70, 36.57, 29.77)),
    ("posthoc_la", "post-hoc LA", (74.25, 31.95, 30.45)),
    ("tde", "TDE", (71.16, 32.69, 30.48)),
]
TABLE_2 = [
    ("pgd_at", "PGD-AT", (62.33, 29.30, 28.15)),
    ("trades", "TRADES", (54.29, 30.20, 28.94)),
    ("robal_n", "RoBal-N", (75.52, 33.50, 31.72)),
    ("robal_r", "RoBal-R", (74.51, 33.87, 32.04)),
]
# the methods after RoBal (issue 28 item 1), each held against PGD-AT and RoBal-N on the same images
LATER = [
    ("at_bsl", "AT-BSL-RA", None),
    ("at_bsl_aua", "AT-BSL-AuA", None),
    ("reat", "REAT", None),
    ("taet", "TAET", None),
    ("classwise_eps", "class-wise eps (RobustLT)", None),
]
# the paper's 80-epoch schedule at CPU width (issue 28 item 4), each held against its 20-epoch row and PGD-AT's
E80 = [
    ("pgd_at_e80", "PGD-AT, 80 epochs", None),
    ("robal_n_e80", "RoBal-N, 80 epochs", None),
    ("posthoc_la_e80", "post-hoc LA, 80 epochs", None),
]
ALL_ROWS = [*TABLE_2, *TABLE_1[1:], *LATER, *E80]
SEEDED = [("pgd_at", "PGD-AT"), ("robal_n", "RoBal-N")]
LABELS = {**dict(SEEDED), **{row: label for row, label, _ in E80}}
SEEDS = (0, 1, 2)


def load(results: Path, row: str) -> tuple[dict, dict] | None:
    """The row's (clean on 10,000, 300-image) evaluations, or None when either is missing."""
    paths = [results / f"{row}.{kind}.json" for kind in ("eval_clean_10k", "eval_300")]
    if not all(p.is_file() for p in paths):
        return None
    return tuple(json.loads(p.read_text()) for p in paths)


def accuracy(result: dict | None, attack: str | None) -> float | None:
    return result["attacks"][attack]["accuracy"] if result and attack in result["attacks"] else None


def load_optional(results: Path, row: str, kind: str) -> dict | None:
    path = results / f"{row}.{kind}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def flags(result: dict) -> str:
    bad = [f"{c['name']} {c['status']}" for c in result.get("checks") or [] if c["status"] != "pass"]
    if not result.get("checks"):
        return "not checked"
    return ", ".join(bad) or "none"


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def paper_cell(paper: tuple | None) -> str:
    return "—" if paper is None else " / ".join(f"{v:.2f}" for v in paper)


def row_cells(results: Path, row: str, label: str, paper: tuple | None, baseline: dict | None) -> list[str]:
    evaluations = load(results, row)
    if evaluations is None:
        return [label, f"`{row}`", "not run yet", "", "", "", "", "", "", "", paper_cell(paper)]
    clean_10k, sub = evaluations
    aa = autoattack_of(sub)
    clean, pgd, aa_acc = accuracy(sub, "clean"), accuracy(sub, "pgd20"), accuracy(sub, aa)
    gain = None if baseline is None or row == BASELINE else gain_over_baseline(sub, baseline)
    vs = "—" if gain is None else (f"{gain['pgd_gain']:+.2f} / {gain['aa_gain']:+.2f} / "
                                   f"{gain['excess']:+.2f} ({gain['status']})")
    gap = None if clean is None or aa_acc is None else clean - aa_acc
    pgd_10k = accuracy(load_optional(results, row, "eval_full"), "pgd20")
    return [label, f"`{row}`", fmt(accuracy(clean_10k, "clean")), fmt(pgd_10k), fmt(clean), fmt(pgd), fmt(aa_acc), fmt(gap),
            flags(sub), vs, paper_cell(paper)]


HEADER = ["Row", "config / JSON", "Clean (10,000)", "PGD-20 (10,000)", "Clean (300)", "PGD-20 (300)", "AA-paper (300)",
          "Clean - AA (300)", "checks not passed (300)", "vs PGD-AT: PGD-20 / AA gain / unconfirmed",
          "paper Clean / PGD-20 / AA"]


def table(results: Path, rows: list) -> str:
    base = load(results, BASELINE)
    baseline = base[1] if base else None
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row_cells(results, *r, baseline)) + " |" for r in rows]
    return "\n".join(lines)


def spread(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)} seeds)"


def seed_accuracies(results: Path, row: str) -> dict[int, list[float | None]]:
    """seed -> [clean on 10,000, PGD-20, AA-paper on 300] for the seeds of `row` evaluated so far."""
    found = {}
    for seed in SEEDS:
        evaluations = load(results, row if seed == 0 else f"{row}_seed{seed}")
        if evaluations is not None:
            clean_10k, sub = evaluations
            found[seed] = [accuracy(clean_10k, "clean"), accuracy(sub, "pgd20"), accuracy(sub, autoattack_of(sub))]
    return found


def seed_line(label: str, per_seed: dict[int, list[float | None]]) -> str:
    columns = [[values[i] for values in per_seed.values()] for i in range(3)]
    listed = "; ".join(f"seed {seed}: " + " / ".join(fmt(v) for v in values) for seed, values in per_seed.items())
    return "| " + " | ".join([label, ", ".join(map(str, per_seed)) or "none",
                              *(spread(col) for col in columns), listed or "—"]) + " |"


def seed_table(results: Path) -> str:
    """Mean ± sample standard deviation over the seeds evaluated so far (seed 0 is the row without suffix), and
    the difference of the two rows seed by seed: a difference is real when its mean is large against its spread."""
    header = ["Row", "seeds", "Clean (10,000)", "PGD-20 (300)", "AA-paper (300)", "per seed: Clean / PGD-20 / AA"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    per_row = {row: seed_accuracies(results, row) for row, _ in SEEDED}
    lines += [seed_line(label, per_row[row]) for row, label in SEEDED]
    (base, base_label), (other, other_label) = SEEDED
    paired = {seed: [None if a is None or b is None else b - a for a, b in zip(per_row[base][seed], values)]
              for seed, values in per_row[other].items() if seed in per_row[base]}
    lines.append(seed_line(f"{other_label} - {base_label} (same seed)", paired))
    return "\n".join(lines)


# (column, attack, the evaluation kinds that may hold it, first found wins)
ISSUE_SIZE_COLUMNS = [
    ("Clean (10,000)", "clean", ("eval_full",)),
    ("PGD-20 (10,000)", "pgd20", ("eval_full",)),
    ("Clean (1,000)", "clean", ("eval_1000",)),
    ("PGD-20 (1,000)", "pgd20", ("eval_1000",)),
    ("AA-paper (1,000)", "aa-paper", ("eval_1000", "eval_aa")),
    ("standard AA (1,000)", "aa", ("eval_aa",)),
]
PAIRED_COLUMNS = ("PGD-20 (10,000)", "PGD-20 (1,000)", "AA-paper (1,000)", "standard AA (1,000)")


def evaluation_with(results: Path, row: str, attack: str, kinds: tuple[str, ...]) -> dict | None:
    """The first of the row's evaluations `kinds` that ran `attack`."""
    for kind in kinds:
        result = load_optional(results, row, kind)
        if result is not None and attack in result["attacks"]:
            return result
    return None


def paired_cell(results: Path, attack: str, kinds: tuple[str, ...], result: dict | None, baseline: str) -> str:
    """The row's gain over the baseline row on the same images, with two standard errors of the paired difference."""
    base = evaluation_with(results, baseline, attack, kinds)
    if result is None or base is None:
        return "—"
    gain, two_se = paired_gains(result, base)[attack]
    return f"{gain:+.2f} ({two_se:.2f})"


def unconfirmed_cell(results: Path, row: str) -> str:
    """The PGD-20 gain over PGD-AT that AA-paper does not confirm on the same 1,000 images (graded like fake_gain)."""
    result, base = load_optional(results, row, "eval_1000"), load_optional(results, BASELINE, "eval_1000")
    gain = None if result is None or base is None else gain_over_baseline(result, base)
    return "—" if gain is None else f"{gain['excess']:+.2f} ({gain['status']})"


def issue_size_table(results: Path, rows: list, baselines: tuple[str, ...] = (BASELINE,)) -> str:
    """Accuracy ± standard error at issue 9's sizes, each row's gain over each baseline row (PGD-AT by default) on
    the same images with two standard errors of the paired difference, and the PGD-20 gain AA-paper does not
    confirm over PGD-AT; "—" where an evaluation was not run."""
    header = ["Row", *(c for c, _, _ in ISSUE_SIZE_COLUMNS),
              *(f"vs {LABELS[b]}, paired (two SE): " + " / ".join(PAIRED_COLUMNS) for b in baselines),
              "unconfirmed PGD-20 gain (1,000)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row, label, _ in rows:
        cells, gains = [label], {b: [] for b in baselines if b != row}
        for column, attack, kinds in ISSUE_SIZE_COLUMNS:
            result = evaluation_with(results, row, attack, kinds)
            cells.append("—" if result is None else with_se(result["attacks"][attack]["accuracy"],
                                                             result["attacks"][attack]["std_error"]))
            if column in PAIRED_COLUMNS:
                for baseline, cell in gains.items():
                    cell.append(paired_cell(results, attack, kinds, result, baseline))
        cells += [" / ".join(gains[b]) if b in gains else "" for b in baselines]
        cells.append("" if row == BASELINE else unconfirmed_cell(results, row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def competition_ranks(values: dict[str, float]) -> dict[str, int]:
    """1 for the highest value; tied values share the best rank of their group (1, 2, 2, 4)."""
    return {key: 1 + sum(other > value for other in values.values()) for key, value in values.items()}


def order_changes(first: dict[str, float], second: dict[str, float]) -> tuple[list, list]:
    """Pairs of rows that `second` orders differently from `first`: (a, b) with a strictly above b under `first`
    and strictly below it under `second` (reversed), and pairs tied under exactly one of the two (tie changed)."""
    def order(values, a, b):
        return (values[a] > values[b]) - (values[a] < values[b])
    reversed_pairs, tie_changed = [], []
    for a, b in combinations(first, 2):
        before, after = order(first, a, b), order(second, a, b)
        if before * after < 0:
            reversed_pairs.append((a, b) if before > 0 else (b, a))
        elif (before == 0) != (after == 0):
            tie_changed.append((a, b))
    return reversed_pairs, tie_changed


def order_change_line(acc: dict, labels: dict) -> str:
    reversed_pairs, tie_changed = order_changes(acc["aa"], acc["ten"])
    if not reversed_pairs and not tie_changed:
        return "\nNo two rows change order between the two attacks."
    gaps = [abs(acc["aa"][a] - acc["aa"][b]) for a, b in reversed_pairs + tie_changed]
    described = [f"{labels[a]} above {labels[b]} under AA ({fmt(acc['aa'][a])} vs {fmt(acc['aa'][b])}), below it "
                 f"under aa-10step ({fmt(acc['ten'][a])} vs {fmt(acc['ten'][b])})" for a, b in reversed_pairs]
    return (f"\nOrder changes between the two attacks. Pairs of rows in opposite order: {len(reversed_pairs)}"
            + (" (" + "; ".join(described) + ")" if described else "")
            + f". Pairs tied under one attack only: {len(tie_changed)}. The official AA separates the rows of every "
            f"changed pair by at most {max(gaps):.2f} points.")


def aa10step_table(results: Path, rows: list) -> str:
    """The 10-step AutoAttack (aa-10step) beside the official AA on the same 1,000 images, row by row: how much the
    10-step version overstates robust accuracy (paired, two SE), the images it leaves standing that AA breaks, the
    images whose adversarial prediction differs, and each row's rank under either attack among the rows with both;
    rows without both evaluations are listed after the table."""
    evaluated, missing = {}, []
    for row, label, _ in rows:
        pair = load_optional(results, row, "eval_aa10step"), load_optional(results, row, "eval_aa")
        if all(pair) and "aa" in pair[1]["attacks"]:
            evaluated[row] = (label, *pair)
        else:
            missing.append(label)
    acc = {kind: {row: e[i]["attacks"][attack]["accuracy"] for row, e in evaluated.items()}
           for kind, i, attack in (("ten", 1, "aa-10step"), ("aa", 2, "aa"))}
    ranks = {kind: competition_ranks(values) for kind, values in acc.items()}
    header = ["Row", "aa-10step (1,000)", "standard AA (1,000)", "AA-paper (1,000)",
              "aa-10step - AA, paired (two SE)", "images only AA breaks", "images predicted differently",
              "rank: AA / aa-10step", "aa-10step seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row, (label, ten, aa) in evaluated.items():
        if ten["labels"] != aa["labels"]:
            raise SystemExit(f"{row}: eval_aa10step and eval_aa did not attack the same test images")
        ten_ok, aa_ok = correct(ten, "aa-10step"), correct(aa, "aa")
        gain, two_se = 100 * float(ten_ok.mean() - aa_ok.mean()), paired_noise(ten_ok, aa_ok)
        differ = sum(a != b for a, b in zip(ten["attacks"]["aa-10step"]["predictions"],
                                            aa["attacks"]["aa"]["predictions"]))
        cells = [label, with_se(acc["ten"][row], ten["attacks"]["aa-10step"]["std_error"]), fmt(acc["aa"][row]),
                 fmt(accuracy(aa, "aa-paper")), f"{gain:+.2f} ({two_se:.2f})", str(int((ten_ok & ~aa_ok).sum())),
                 str(differ), f"{ranks['aa'][row]} / {ranks['ten'][row]}", f"{ten['seconds']['aa-10step']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(order_change_line(acc, {row: e[0] for row, e in evaluated.items()}))
    if missing:
        lines.append("\nNot run yet (no `NAME.eval_aa10step.json` beside `NAME.eval_aa.json`): " + ", ".join(missing) + ".")
    return "\n".join(lines)


def render(results: Path) -> str:
    return "\n\n".join([
        "### Table 2 rows (AT frameworks and RoBal)", table(results, TABLE_2),
        "### Table 1 rows (long-tailed methods inside PGD-AT)", table(results, TABLE_1),
        "### Seed repeats (mean ± standard deviation over seeds)", seed_table(results),
        "### Table 2 rows at issue 9's sizes", issue_size_table(results, TABLE_2),
        "### Table 1 rows at issue 9's sizes", issue_size_table(results, TABLE_1),
        "### Later methods at issue 9's sizes (issue 28), against PGD-AT and RoBal-N",
        issue_size_table(results, [*TABLE_2[:1], TABLE_2[2], *LATER], baselines=(BASELINE, "robal_n")),
        "### The paper's schedule at CPU width (issue 28): 80 epochs against 20, paired with PGD-AT of each length",
        issue_size_table(results, [*TABLE_2[:1], TABLE_2[2], *E80], baselines=(BASELINE, "pgd_at_e80")),
        "### The 10-step AutoAttack beside the official AA (issue 28), every row on the same 1,000 images",
        aa10step_table(results, ALL_ROWS)])


def replace_block(doc: Path, block: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no block to replace; it needs the two lines\n{BEGIN}\n{END}")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="docs/results", type=Path, help="folder of the NAME.KIND.json files")
    parser.add_argument("--doc", type=Path, help="Markdown file whose STUDY-TABLES block is replaced")
    args = parser.parse_args(argv)
    block = render(args.results)
    print(block)
    if args.doc is not None:
        replace_block(args.doc, block)
        print(f"wrote the tables into {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
