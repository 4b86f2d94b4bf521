"""Markdown outputs: one evaluation (`eval.md` beside `eval.json`) and `robal report`, a table across runs.

The report follows the paper's Table 1: method, Clean, PGD(-20), AA, gap = Clean - AA, and the flags (checks
that did not pass), with the standard error beside each accuracy and the AutoAttack version named.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from .attacks import AA_VERSIONS, is_autoattack
from .checks import FAKE_GAIN, grade, paired_noise, pct
from .metrics import class_thirds, head_to_tail, strongest
from .plots import report_plot, write_eval_plots
from .settings import check_output_file

AA_DESCRIPTION = {name: version.description for name, version in AA_VERSIONS.items()}
DASH = "—"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def f2(value) -> str:
    return DASH if value is None or not np.isfinite(value) else f"{value:.2f}"


def with_se(acc: float | None, se: float | None) -> str:
    return DASH if acc is None else f"{acc:.2f} ± {se:.2f}"


# ---------------------------------------------------------------- one evaluation

def eval_markdown(result: dict, plots: dict[str, Path] | None = None) -> str:
    attacks = result["attacks"]
    counts = result["class_counts"]
    c_all = len(next(iter(attacks.values()))["per_class"])
    names = result.get("class_names") or [str(c) for c in range(c_all)]
    aa_notes = [f"`{a}` = {AA_DESCRIPTION.get(a, a.removeprefix('aa:').replace('+', ' + '))}"
                for a in attacks if is_autoattack(a)]
    inference = [i.get("name") for i in result.get("inference") or []]
    lines = [f"# Evaluation of `{result.get('checkpoint', '?')}`", "",
             f"- L-inf eps {result['eps']:.4g}, PGD step {result['step_size']:.4g}; {result['n_test']} test images "
             f"(seed {result.get('test_indices_seed', 0)}); inference adjustments: {', '.join(inference) or 'none'}"
             + (" (overridden at evaluation)" if result.get("inference_overridden") else ""),
             f"- groups: {result['groups_rule']}"]
    if aa_notes:
        lines.append("- AutoAttack: " + "; ".join(aa_notes))
    lines += ["", "## Accuracy (%)", "", md_table(
        ["Attack", "Accuracy", "Many", "Medium", "Few", "Worst class", "Natural error", "Boundary error", "Seconds"],
        [[a, with_se(m["accuracy"], m["std_error"]), *(f2((m["groups"] or {}).get(g)) for g in ("many", "medium", "few")),
          f"{f2(m['worst_class']['accuracy'])} ({names[m['worst_class']['class']]})", f2(m["natural_error"]),
          f2(m["boundary_error"]), result.get("seconds", {}).get(a, DASH)] for a, m in attacks.items()])]
    hardest = strongest(attacks, [a for a in attacks if a != "clean"])
    order = head_to_tail(counts, c_all)
    header = ["Class", "Train images", *attacks] + ([f"Boundary error ({hardest})"] if hardest else [])
    rows = [[names[c], counts[c] if counts else DASH, *(f2(m["per_class"][c]) for m in attacks.values())]
            + ([f2(attacks[hardest]["per_class_boundary_error"][c])] if hardest else []) for c in order]
    lines += ["", "## Per class (%), most to fewest training images", "", md_table(header, rows)]
    lines += ["", f"## Reliability checks ({result.get('checks_level', 'basic')})", ""]
    checks = result.get("checks") or []
    lines.append(md_table(["Check", "Status", "Detail"], [[c["name"], c["status"].upper(), c["detail"]]
                                                         for c in checks]) if checks else "No checks were run.")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({Path(p).name})" for k, p in plots.items()]
    return "\n".join(lines) + "\n"


def write_eval_outputs(result: dict, json_path: Path) -> list[Path]:
    """eval.md and the PNG plots beside the evaluation JSON (named after its stem)."""
    json_path = Path(json_path)
    plots = write_eval_plots(result, json_path.parent, json_path.stem)
    md = json_path.with_suffix(".md")
    md.write_text(eval_markdown(result, plots))
    return [md, *plots.values()]


# ---------------------------------------------------------------- across runs

def eval_json_path(run: str | Path) -> Path:
    run = Path(run)
    path = run / "eval.json" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run `robal eval {run}` first)")
    return path


def method_name(result: dict, path: Path) -> str:
    """The run's config name (else the NAME of a copied `NAME.KIND.json`, else the run's folder), plus any
    inference adjustments set at evaluation."""
    config = path.parent / "config.yaml"
    name = (yaml.safe_load(config.read_text()) or {}).get("name") if config.is_file() else None
    if not name and path.name != "eval.json":
        name = path.name.split(".")[0]
    name = name or path.parent.name
    if result.get("inference_overridden"):
        name += " + " + (", ".join(i.get("name", "?") for i in result.get("inference") or []) or "no adjustment")
    return name


class EvalFileError(ValueError):
    """An evaluation JSON that is not one `robal eval` wrote; the message names the file and what is wrong."""


def check_eval_result(result, path: Path) -> dict:
    """The parts of an evaluation JSON that reports read: attacks with accuracy, std_error and per-class lists."""
    def bad(what):
        raise EvalFileError(f"{path}: {what}; expected an evaluation JSON written by `robal eval`")

    if not isinstance(result, dict) or not isinstance(result.get("attacks"), dict) or not result["attacks"]:
        bad("no 'attacks' mapping")
    for name, m in result["attacks"].items():
        if not isinstance(m, dict):
            bad(f"attacks.{name} is not a mapping")
        for key in ("accuracy", "std_error"):
            if isinstance(m.get(key), bool) or not isinstance(m.get(key), (int, float)):
                bad(f"attacks.{name}.{key} is {m.get(key)!r}, not a number")
        if not isinstance(m.get("per_class"), list):
            bad(f"attacks.{name}.per_class is missing")
    for key in ("n_test", "class_counts", "labels"):
        if key not in result:
            bad(f"no '{key}'")
    return result


def read_eval(run: str | Path) -> tuple[Path, dict]:
    path = eval_json_path(run)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalFileError(f"{path} is not JSON ({err}); expected an evaluation JSON written by `robal eval`") from None
    return path, check_eval_result(result, path)


def autoattack_of(result: dict) -> str | None:
    attacks = result["attacks"]
    return strongest(attacks, [a for a in attacks if is_autoattack(a)])


def report_row(path: Path, result: dict) -> dict:
    attacks = result["attacks"]
    aa = autoattack_of(result)

    def acc(name):
        return (attacks[name]["accuracy"], attacks[name]["std_error"]) if name in attacks else (None, None)

    (clean, clean_se), (pgd, pgd_se), (aa_acc, aa_se) = acc("clean"), acc("pgd20"), acc(aa)
    checks = result.get("checks") or []
    flags = [f"{c['name']} ({c['status']})" for c in checks if c["status"] != "pass"]
    return {"method": method_name(result, path), "run": str(path), "n_test": result["n_test"],
            "clean": clean, "clean_se": clean_se, "pgd": pgd, "pgd_se": pgd_se, "aa": aa_acc, "aa_se": aa_se,
            "aa_version": aa, "gap": None if clean is None or aa_acc is None else clean - aa_acc,
            "flags": flags if checks else ["unchecked"]}


def correct(result: dict, attack: str) -> np.ndarray:
    return np.asarray(result["attacks"][attack]["predictions"]) == np.asarray(result["labels"])


def in_tail_third(result: dict) -> np.ndarray:
    """Which test images belong to the tail third of the classes (the fewest training images), whatever the
    group rule of the evaluation's `groups` (at CIFAR-10-LT rho 50 its `few` band holds two classes, not three)."""
    return np.isin(result["labels"], class_thirds(result["class_counts"])[2])


def tail_third_accuracy(result: dict, attack: str) -> float:
    """Accuracy under `attack` on the test images of the tail third of the classes."""
    return pct(correct(result, attack)[in_tail_third(result)])


def tail_third_gain(result: dict, baseline: dict, attack: str) -> tuple[float, float]:
    """The tail third's accuracy gain over the baseline under `attack` on the same images, and two paired standard
    errors (the tail classes' images only)."""
    if result["labels"] != baseline["labels"]:
        raise ValueError("the two evaluations did not attack the same test images (labels differ)")
    tail = in_tail_third(result)
    a, b = correct(result, attack)[tail], correct(baseline, attack)[tail]
    return pct(a) - pct(b), paired_noise(a, b)


def paired_gains(result: dict, baseline: dict) -> dict[str, tuple[float, float]]:
    """attack -> (the run's accuracy minus the baseline's, two standard errors of that difference) for every attack
    both evaluations ran on the same test images (per-image correctness, so the shared images cancel)."""
    if result["labels"] != baseline["labels"]:
        raise ValueError("the two evaluations did not attack the same test images (labels differ)")
    shared = [a for a in baseline["attacks"] if a in result["attacks"]]
    return {a: (pct(correct(result, a)) - pct(correct(baseline, a)),
                paired_noise(correct(result, a), correct(baseline, a))) for a in shared}


def gain_over_baseline(result: dict, baseline: dict) -> dict | None:
    """The method's PGD-20 gain over the baseline minus its AutoAttack gain, on the same images: robustness that
    PGD-20 credits and AutoAttack does not, beyond the baseline's own PGD-20 - AA gap. Graded like `fake_gain`
    (FAKE_GAIN points and the paired noise). None when the two evaluations did not attack the same images with
    PGD-20 and the same AutoAttack."""
    aa = autoattack_of(result)
    comparable = (aa is not None and aa == autoattack_of(baseline)
                  and all("pgd20" in r["attacks"] for r in (result, baseline))
                  and result["labels"] == baseline["labels"]
                  and (result["n_test"], result.get("test_indices_seed")) == (baseline["n_test"],
                                                                             baseline.get("test_indices_seed")))
    if not comparable:
        return None
    method_gap = correct(result, "pgd20").astype(int) - correct(result, aa)
    base_gap = correct(baseline, "pgd20").astype(int) - correct(baseline, aa)
    excess = 100 * float(method_gap.mean() - base_gap.mean())
    noise = paired_noise(method_gap, base_gap)
    gain = {f"{key}_gain": pct(correct(result, attack)) - pct(correct(baseline, attack))
            for key, attack in (("pgd", "pgd20"), ("aa", aa))}
    return {**gain, "excess": excess, "noise": noise, "status": grade(excess, noise, FAKE_GAIN)}


def baseline_cell(gain: dict | None) -> str:
    if gain is None:
        return DASH
    return (f"{gain['pgd_gain']:+.2f} / {gain['aa_gain']:+.2f}: {gain['excess']:+.2f} "
            f"(noise {gain['noise']:.2f}) {gain['status']}")


def report_markdown(rows: list[dict], baseline: str | None = None) -> str:
    header = ["Method", "Clean", "PGD-20", "AA", "Gap", "Flags", "AA version", "n_test", "Run"]
    cells = [[r["method"], with_se(r["clean"], r["clean_se"]), with_se(r["pgd"], r["pgd_se"]),
              with_se(r["aa"], r["aa_se"]), f2(r["gap"]), ", ".join(r["flags"]) or "none",
              r["aa_version"] or DASH, r["n_test"], f"`{r['run']}`"] for r in rows]
    intro = "Accuracy (%) ± standard error; Gap = Clean - AA; Flags = reliability checks that did not pass."
    if baseline is not None:
        header.insert(6, f"vs {baseline}: PGD-20 gain / AA gain: excess")
        for row, r in zip(cells, rows):
            row.insert(6, baseline_cell(r["vs_baseline"]))
        intro += (f" vs {baseline}: gains over the baseline on the same images, and the PGD-20 gain that AutoAttack "
                  f"does not confirm (excess, graded like fake_gain: warn above {FAKE_GAIN[0]:g}, fail above "
                  f"{FAKE_GAIN[1]:g} points and the noise).")
    notes = [f"`{k}` = {v}" for k, v in AA_DESCRIPTION.items() if any(r["aa_version"] == k for r in rows)]
    return intro + (" AA: " + "; ".join(notes) + "." if notes else "") + "\n\n" + md_table(header, cells) + "\n"


def write_report(runs: list[str | Path], out: str | Path | None = None, baseline: str | Path | None = None) -> str:
    """The report's Markdown; with `out`, also written there, with the plot beside it (same stem, .png). With
    `baseline` (a run or eval JSON), each row also gets its gains over the baseline (`gain_over_baseline`)."""
    if out is not None:
        check_output_file(out, "--out")
    evaluations = [read_eval(r) for r in runs]
    rows = [report_row(path, result) for path, result in evaluations]
    base_name = None
    if baseline is not None:
        base_path, base_result = read_eval(baseline)
        base_name = method_name(base_result, base_path)
        for row, (_, result) in zip(rows, evaluations):
            row["vs_baseline"] = gain_over_baseline(result, base_result)
    text = report_markdown(rows, base_name)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        report_plot(rows, out.with_suffix(".png"))
    return text
