"""scripts/study_tables.py: the study's tables come from the evaluation JSONs, numbers placed and combined as
computed by hand here; rows without results say so; the block in the results document is replaced in place."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from robal.evaluate.report import paired_gains, tail_third_accuracy, tail_third_gain

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_tables.py"


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tables():
    return load_script("study_tables")


LABELS = [0, 0, 1, 1] * 10


def evaluation(clean, pgd, aa, checks=("pass",)):
    """Per-image correctness of 4 images, repeated 10 times -> an eval JSON (prediction = label when correct)."""
    def attack(ok):
        ok = ok * 10
        return {"accuracy": 100 * sum(ok) / len(ok), "std_error": 1.0,
                "predictions": [y if c else 1 - y for y, c in zip(LABELS, ok)]}
    return {"n_test": 40, "test_indices_seed": 0, "labels": LABELS,
            "attacks": {"clean": attack(clean), "pgd20": attack(pgd), "aa-paper": attack(aa)},
            "checks": [{"name": f"check{i}", "status": s} for i, s in enumerate(checks)]}


def write(folder, row, clean_10k, sub):
    (folder / f"{row}.eval_clean_10k.json").write_text(json.dumps(
        {"n_test": 10000, "attacks": {"clean": {"accuracy": clean_10k, "std_error": 0.5}}}))
    (folder / f"{row}.eval_300.json").write_text(json.dumps(sub))


def cells(text, label):
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_rows_gains_over_pgd_at_and_missing_rows(tables, tmp_path):
    write(tmp_path, "pgd_at", 32.5, evaluation([1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]))
    (tmp_path / "pgd_at.eval_full.json").write_text(json.dumps(
        {"n_test": 10000, "attacks": {"clean": {"accuracy": 32.5, "std_error": 0.5},
                                      "pgd20": {"accuracy": 23.4, "std_error": 0.4}}}))
    # tau-norm: PGD-20 +50 over PGD-AT, AA +0 -> 50 points unconfirmed, a fake gain
    write(tmp_path, "tau_norm", 35.0, evaluation([1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], ("pass", "warn")))
    text = tables.render(tmp_path)
    fc = cells(text, "FC (= PGD-AT)")
    assert fc[2:9] == ["32.50", "23.40", "75.00", "25.00", "25.00", "50.00", "none"]
    assert fc[9] == "—" and fc[10] == "62.33 / 29.30 / 28.15"
    tau = cells(text, "tau-norm")
    assert tau[2:9] == ["35.00", "—", "100.00", "75.00", "25.00", "75.00", "check1 warn"]
    assert tau[9] == "+50.00 / +0.00 / +50.00 (fail)"
    assert cells(text, "TDE")[2] == "not run yet"
    assert cells(text, "cRT")[10] == "—"
    assert cells(text, "RoBal-R")[2] == "not run yet" and cells(text, "RoBal-R")[10] == "74.51 / 33.87 / 32.04"


def test_seed_table_is_mean_and_sample_std(tables, tmp_path):
    for row, clean in (("robal_n", 48.0), ("robal_n_seed1", 46.0), ("robal_n_seed2", 50.5)):
        write(tmp_path, row, clean, evaluation([1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]))
    write(tmp_path, "pgd_at_seed1", 31.0, evaluation([1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]))
    text = tables.seed_table(tmp_path)
    robal = cells(text, "RoBal-N")
    values = [48.0, 46.0, 50.5]
    assert robal[1] == "0, 1, 2"
    assert robal[2] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (3 seeds)"
    assert robal[3] == "25.00 ± 0.00 (3 seeds)" and robal[4] == "0.00 ± 0.00 (3 seeds)"
    pgd = cells(text, "PGD-AT")
    assert pgd[1] == "1" and pgd[2] == "31.00 (1 seed)" and pgd[5] == "seed 1: 31.00 / 50.00 / 25.00"
    paired = cells(text, "RoBal-N - PGD-AT (same seed)")  # only seed 1 has both rows
    assert paired[1] == "1" and paired[2:5] == ["15.00 (1 seed)", "-25.00 (1 seed)", "-25.00 (1 seed)"]


def test_seed_table_pairs_the_rows_seed_by_seed(tables, tmp_path):
    for seed, (pgd_clean, robal_clean) in enumerate(((30.0, 47.0), (32.0, 46.0), (31.0, 50.5))):
        suffix = "" if seed == 0 else f"_seed{seed}"
        write(tmp_path, f"pgd_at{suffix}", pgd_clean, evaluation([1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]))
        write(tmp_path, f"robal_n{suffix}", robal_clean, evaluation([1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]))
    paired = cells(tables.seed_table(tmp_path), "RoBal-N - PGD-AT (same seed)")
    differences = [17.0, 14.0, 19.5]
    assert paired[1] == "0, 1, 2"
    assert paired[2] == f"{statistics.mean(differences):.2f} ± {statistics.stdev(differences):.2f} (3 seeds)"
    assert paired[3] == "-25.00 ± 0.00 (3 seeds)" and paired[4] == "25.00 ± 0.00 (3 seeds)"
    assert paired[5].startswith("seed 0: 17.00 / -25.00 / 25.00; seed 1: 14.00")


def test_block_is_replaced_and_a_doc_without_markers_is_refused(tables, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text(f"intro\n{tables.BEGIN}\nold table\n{tables.END}\noutro\n")
    assert tables.main(["--results", str(tmp_path), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{tables.END}\noutro\n")
    assert "old table" not in text and "| FC (= PGD-AT) |" in text
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="STUDY-TABLES"):
        tables.main(["--results", str(tmp_path), "--doc", str(doc)])
    assert doc.read_text() == "no markers\n"


def test_paired_gains_by_hand(tmp_path):
    base = evaluation([1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0])
    run = evaluation([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    gains = paired_gains(run, base)
    assert gains["clean"][0] == pytest.approx(25.0) and gains["pgd20"] == (0.0, 0.0)
    # aa-paper: differences -1, 0, 0, 0 repeated: mean -25, two SE = 200 * std / sqrt(40)
    assert gains["aa-paper"][0] == pytest.approx(-25.0)
    assert gains["aa-paper"][1] == pytest.approx(200 * statistics.pstdev([-1, 0, 0, 0]) / 40 ** 0.5)
    other = dict(run, labels=[1 - y for y in LABELS])
    with pytest.raises(ValueError, match="same test images"):
        paired_gains(other, base)


def test_paired_gains_script_prints_and_refuses(tmp_path, capsys):
    module = load_script("paired_gains")
    base, run, other = tmp_path / "base.json", tmp_path / "run.json", tmp_path / "other.json"
    base.write_text(json.dumps(evaluation([1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0])))
    run_result = evaluation([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    run.write_text(json.dumps(run_result))
    other.write_text(json.dumps(dict(run_result, labels=[1 - y for y in LABELS])))
    assert module.main([str(base), str(run)]) == 0
    assert "clean +25.00 (two SE" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other.json.*same test images"):
        module.main([str(base), str(other)])


def test_issue_size_table_reads_each_kind_and_pairs_with_pgd_at(tables, tmp_path):
    def save(row, kind, result):
        (tmp_path / f"{row}.{kind}.json").write_text(json.dumps(result))

    def only(result, *attacks):
        return dict(result, attacks={a: result["attacks"][a] for a in attacks})

    save("pgd_at", "eval_full", only(evaluation([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]), "clean", "pgd20"))
    save("pgd_at", "eval_1000", evaluation([1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]))
    aa_run = evaluation([1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0])
    aa_run["attacks"]["aa"] = aa_run["attacks"]["aa-paper"]
    save("pgd_at", "eval_aa", only(aa_run, "aa-paper", "aa"))
    # RoBal-N: AA-paper and standard AA only from its eval_aa (no eval_1000): AA-paper +25, AA +25 over PGD-AT
    robal = evaluation([1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0])
    robal["attacks"]["aa"] = robal["attacks"]["aa-paper"]
    save("robal_n", "eval_aa", only(robal, "aa-paper", "aa"))
    # tau-norm (a Table 1 row): eval_1000 only; PGD-20 +25 over PGD-AT on the 1,000, AA-paper +0 -> 25 unconfirmed
    save("tau_norm", "eval_1000", evaluation([1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]))
    text = tables.issue_size_table(tmp_path, tables.TABLE_2)
    assert cells(text, "PGD-AT")[1:] == ["75.00 ± 1.00", "25.00 ± 1.00", "50.00 ± 1.00", "50.00 ± 1.00",
                                         "25.00 ± 1.00", "25.00 ± 1.00", "", ""]
    row = cells(text, "RoBal-N")
    assert row[1:5] == ["—"] * 4 and row[5:7] == ["50.00 ± 1.00", "50.00 ± 1.00"]
    noise = 200 * statistics.pstdev([0, 1, 0, 0]) / 40 ** 0.5   # per-image differences 0, +1, 0, 0
    assert row[7:] == [f"— / — / +25.00 ({noise:.2f}) / +25.00 ({noise:.2f})", "—"]
    assert cells(text, "TRADES")[1:] == ["—"] * 6 + ["— / — / — / —", "—"]
    tau = cells(tables.issue_size_table(tmp_path, tables.TABLE_1), "tau-norm")
    assert tau[3:7] == ["100.00 ± 1.00", "75.00 ± 1.00", "25.00 ± 1.00", "—"]
    # PGD-20 per-image differences vs PGD-AT 0, 0, +1, 0; AA-paper none; unconfirmed gap differences 0, 0, +1, 0
    assert tau[7:] == [f"— / +25.00 ({noise:.2f}) / +0.00 (0.00) / —", "+25.00 (fail)"]
    assert "### Table 1 rows at issue 9's sizes" in tables.render(tmp_path)

    # a later method: standard AA on the 1,000 only, held against PGD-AT and against RoBal-N image by image
    at_bsl = evaluation([1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0])
    at_bsl["attacks"]["aa"] = at_bsl["attacks"]["aa-paper"]
    save("at_bsl", "eval_aa", only(at_bsl, "aa-paper", "aa"))
    later = tables.issue_size_table(tmp_path, [*tables.TABLE_2[:1], tables.TABLE_2[2], *tables.LATER],
                                    baselines=("pgd_at", "robal_n"))
    assert "vs PGD-AT, paired (two SE)" in later and "vs RoBal-N, paired (two SE)" in later
    row = cells(later, "AT-BSL-RA")
    vs_pgd = 200 * statistics.pstdev([0, 1, 1, 0]) / 40 ** 0.5   # AA right minus PGD-AT's: 0, +1, +1, 0
    vs_robal = 200 * statistics.pstdev([0, 0, 1, 0]) / 40 ** 0.5  # minus RoBal-N's: 0, 0, +1, 0
    assert row[5:7] == ["75.00 ± 1.00", "75.00 ± 1.00"]
    assert row[7:] == [f"— / — / +50.00 ({vs_pgd:.2f}) / +50.00 ({vs_pgd:.2f})",
                       f"— / — / +25.00 ({vs_robal:.2f}) / +25.00 ({vs_robal:.2f})", "—"]
    assert cells(later, "RoBal-N")[7:] == ["— / — / +25.00 ({:.2f}) / +25.00 ({:.2f})".format(noise, noise), "", "—"]
    assert cells(later, "PGD-AT")[7:] == ["", "— / — / -25.00 ({:.2f}) / -25.00 ({:.2f})".format(noise, noise), ""]
    assert cells(later, "TAET")[1:] == ["—"] * 6 + ["— / — / — / —"] * 2 + ["—"]
    assert "### Later methods at issue 9's sizes" in tables.render(tmp_path)


@pytest.fixture(scope="module")
def pareto():
    import sys

    sys.path.insert(0, str(SCRIPT.parent))  # pareto.py imports study_tables' row labels
    try:
        return load_script("pareto")
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_pareto_front_and_tail_gains_by_hand(pareto, tmp_path):
    """Rows dominated on both clean and AA accuracy are off the front (a tie on both does not dominate); the tail
    third's gain is counted on the tail classes' images only, with the paired noise of those images."""
    pts = [{"row": r, "clean": c, "aa": a} for r, c, a in
           [("a", 30, 22), ("b", 50, 20), ("c", 48, 24), ("d", 40, 21), ("e", 48, 24), ("f", 52, 19)]]
    assert pareto.pareto_front(pts, "aa") == {"b", "c", "e", "f"}  # d is beaten by c; c and e tie
    # a longer-trained row that beats them all has a front of its own and takes no row off the 20-epoch one
    budgets = [{**p, "epochs": 20} for p in pts] + [{"row": "g", "clean": 60, "aa": 25, "epochs": 80},
                                                     {"row": "h", "clean": 55, "aa": 23, "epochs": 80}]
    assert pareto.fronts(budgets, "aa") == {"b", "c", "e", "f", "g"}

    counts = [500, 300, 200, 100, 50, 20]  # thirds: classes 0-1, 2-3, 4-5 (the tail)
    labels = [0, 1, 2, 3, 4, 5] * 10

    def result(right):  # right(i, y): image i (label y) classified correctly under AA
        preds = [y if right(i, y) else (y + 1) % 6 for i, y in enumerate(labels)]
        return {"labels": labels, "class_counts": counts, "attacks": {"aa": {"predictions": preds}}}

    base = result(lambda i, y: y < 2)                    # the head right, the tail never
    run = result(lambda i, y: y < 2 or (y >= 4 and i % 3 == 0))  # and a third of the tail images
    gain, noise = tail_third_gain(run, base, "aa")
    tail = [i for i, y in enumerate(labels) if y >= 4]
    diff = [float(i % 3 == 0) for i in tail]  # per tail image: run right minus base right
    mean = sum(diff) / len(diff)
    sd = statistics.pstdev(diff)
    assert gain == pytest.approx(100 * mean)
    assert noise == pytest.approx(2 * 100 * sd / len(diff) ** 0.5)

    # CIFAR-10-LT rho 50: the evaluation's `few` band (< 200 training images) holds two classes, the tail third three
    rho50 = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
    labels = list(range(10)) * 4
    right = [y in (7, 9) or (y == 8 and i < 10) for i, y in enumerate(labels)]  # class 8: one of its four images
    run = {"labels": labels, "class_counts": rho50,
           "attacks": {"aa": {"predictions": [y if r else (y + 1) % 10 for y, r in zip(labels, right)]}}}
    assert tail_third_accuracy(run, "aa") == pytest.approx(100 * 9 / 12)   # classes 7, 8, 9: 4 + 1 + 4 of 12 images


def test_aa10step_table_pairs_with_the_official_aa_by_hand(tables, tmp_path):
    def save(row, kind, correct_of_four, attack, predictions=None):
        result = evaluation([1, 1, 1, 1], [1, 1, 1, 1], correct_of_four)
        result["attacks"] = {attack: dict(result["attacks"]["aa-paper"])}
        if predictions is not None:
            result["attacks"][attack]["predictions"] = predictions
        result["seconds"] = {attack: 1234.4}
        (tmp_path / f"{row}.{kind}.json").write_text(json.dumps(result))

    # PGD-AT: AA breaks images 2-4, the 10-step version image 4 only: +50 points, which ties it with RoBal-N, whose
    # two attacks break the same image 1 but leave it with different wrong labels (the 10-step one predicts 5)
    save("pgd_at", "eval_aa", [1, 0, 0, 0], "aa")
    save("pgd_at", "eval_aa10step", [1, 1, 1, 0], "aa-10step")
    save("robal_n", "eval_aa", [0, 1, 1, 1], "aa")
    save("robal_n", "eval_aa10step", [0, 1, 1, 1], "aa-10step", [5 if i % 4 == 0 else y for i, y in enumerate(LABELS)])
    save("trades", "eval_aa", [1, 1, 1, 1], "aa")   # no 10-step evaluation: listed as not run
    text = tables.aa10step_table(tmp_path, tables.TABLE_2)
    noise = 200 * statistics.pstdev([0, 1, 1, 0]) / 40 ** 0.5   # per-image 10-step minus AA: 0, +1, +1, 0
    assert cells(text, "PGD-AT")[1:] == ["75.00 ± 1.00", "25.00", "—", f"+50.00 ({noise:.2f})", "20", "20",
                                         "2 / 1", "1234"]
    assert cells(text, "RoBal-N")[1:] == ["75.00 ± 1.00", "75.00", "—", "+0.00 (0.00)", "0", "10", "1 / 1", "1234"]
    assert text.endswith("Not run yet (no `NAME.eval_aa10step.json` beside `NAME.eval_aa.json`): TRADES, RoBal-R.")
    assert ("Order changes between the two attacks. Pairs of rows in opposite order: 0. Pairs tied under one attack "
            "only: 1. The official AA separates the rows of every changed pair by at most 50.00 points.") in text
    assert tables.competition_ranks({"a": 3.0, "b": 5.0, "c": 5.0, "d": 1.0}) == {"a": 3, "b": 1, "c": 1, "d": 4}
    # a over b and c under the first attack; the second puts b over a (reversed) and ties c with d (tie changed)
    first, second = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5}, {"a": 3.0, "b": 4.0, "c": 1.0, "d": 1.0}
    assert tables.order_changes(first, second) == ([("a", "b")], [("c", "d")])
    line = tables.order_change_line({"aa": first, "ten": second}, {k: k.upper() for k in first})
    assert ("Pairs of rows in opposite order: 1 (A above B under AA (3.00 vs 2.00), below it under aa-10step "
            "(3.00 vs 4.00)). Pairs tied under one attack only: 1.") in line
    assert line.endswith("by at most 1.00 points.")
    unchanged = tables.order_change_line({"aa": first, "ten": first}, {})
    assert unchanged == "\nNo two rows change order between the two attacks."
    assert "### The 10-step AutoAttack beside the official AA" in tables.render(tmp_path)


@pytest.fixture(scope="module")
def sweep():
    return load_script("ratio_sweep_report")


def test_ratio_sweep_report_reads_the_study_rows_at_50_and_pairs_robal_with_pgd_at(sweep, tmp_path):
    """Ratio 50 comes from the study's own rows, the others from ratio_sweep/; the tail third is classes 7-9 at every
    ratio; RoBal-N's gains over PGD-AT are paired on the same images; missing rows say so; the plot is written."""
    labels = list(range(10)) * 2
    rho10, rho50 = [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500], \
        [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]

    def evaluation(counts, right):  # right: the classes classified correctly, under every attack
        preds = [y if y in right else (y + 1) % 10 for y in labels]
        attack = {"accuracy": 100 * sum(y in right for y in labels) / 20, "std_error": 1.0, "predictions": preds}
        return {"labels": labels, "class_counts": counts,
                "attacks": {"clean": attack, "pgd20": attack, "aa-paper": attack}}

    (tmp_path / "ratio_sweep").mkdir()
    for path, counts, right in [("pgd_at", rho50, {0, 1, 2}), ("robal_n", rho50, {0, 1, 8, 9}),
                                ("ratio_sweep/pgd_at_r10", rho10, {0, 1, 2, 3, 7})]:
        for kind in ("eval_full", "eval_1000"):
            (tmp_path / f"{path}.{kind}.json").write_text(json.dumps(evaluation(counts, right)))
    (tmp_path / "ratio_sweep/robal_n_r10.eval_full.json").write_text("{}")  # no eval_1000 yet: not run
    sweep.main(["--results", str(tmp_path), "--out", str(tmp_path / "sweep")])
    text = (tmp_path / "sweep.md").read_text()
    rows = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): [c.strip() for c in ln.strip("|").split("|")[2:]]
            for ln in text.splitlines()[2:]}
    # PGD-AT at 10: classes 0-3 and 7 right (50%); its tail third (7, 8, 9) 1 of 3 classes; SE sqrt(p(1-p)/6)
    assert rows[("10", "PGD-AT")][:5] == [f"{sum(rho10):,}", "50.00 ± 1.00", "50.00 ± 1.00", "50.00 ± 1.00",
                                          f"33.33 ± {100 * (1 / 3 * 2 / 3 / 6) ** 0.5:.2f}"]
    assert rows[("10", "RoBal-N")][0] == "not run yet" and rows[("100", "PGD-AT")][0] == "not run yet"
    # at 50: RoBal-N right on 0, 1, 8, 9, PGD-AT on 0, 1, 2 -> per-image differences -1 (class 2), +1 (8, 9), 0 else
    diff = [(-1 if y == 2 else 1 if y in (8, 9) else 0) for y in labels]
    noise = 200 * statistics.pstdev(diff) / 20 ** 0.5
    tail_diff = [1 if y in (8, 9) else 0 for y in labels if y >= 7]
    tail_noise = 200 * statistics.pstdev(tail_diff) / 6 ** 0.5
    assert rows[("50", "RoBal-N")][4] == f"66.67 ± {100 * (2 / 3 / 3 / 6) ** 0.5:.2f}"
    assert rows[("50", "RoBal-N")][5] == " / ".join([f"+10.00 ({noise:.2f})"] * 3) + f" / +66.67 ({tail_noise:.2f})"
    assert rows[("50", "PGD-AT")][5] == ""
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def bf16():
    return load_script("bf16_report")


def test_bf16_report_pairs_precision_at_a_seed_and_seeds_at_a_precision_by_hand(bf16, tmp_path):
    """fp32 seed 0's clean 10,000 comes from its eval_full, seed 1's from eval_clean_10k; bf16 rows from bf16/;
    differences are paired on the same images; a pair with a missing row says so."""
    labels = list(range(10)) * 2
    rho50 = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]

    def evaluation(right):  # right: the classes classified correctly, under every attack
        preds = [y if y in right else (y + 1) % 10 for y in labels]
        attack = {"accuracy": 100 * sum(y in right for y in labels) / 20, "std_error": 1.0, "predictions": preds}
        return {"labels": labels, "class_counts": rho50,
                "attacks": {"clean": attack, "pgd20": attack, "aa-paper": attack}}

    (tmp_path / "bf16").mkdir()
    files = {"pgd_at.eval_full": {0, 1, 2}, "pgd_at.eval_1000": {0, 1, 2},
             "pgd_at_seed1.eval_clean_10k": {0, 1}, "pgd_at_seed1.eval_1000": {0, 1},
             "bf16/pgd_at.eval_clean_10k": {0, 1, 2, 9}, "bf16/pgd_at.eval_1000": {0, 1, 2, 9}}
    for name, right in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(evaluation(right)))
    bf16.main(["--results", str(tmp_path), "--out", str(tmp_path / "bf16.md")])
    text = (tmp_path / "bf16.md").read_text()
    assert "| PGD-AT | 0 | bf16 | 40.00 ± 1.00 | 40.00 ± 1.00 | 40.00 ± 1.00 |" in text
    assert "| PGD-AT | 1 | fp32 | 20.00 ± 1.00 | 20.00 ± 1.00 | 20.00 ± 1.00 |" in text
    assert "| RoBal-N | 0 | fp32 | not run yet | not run yet | not run yet |" in text
    # bf16 - fp32 at seed 0: class 9 gained (+1 on its 2 images), nothing lost; seed 1 - seed 0 in fp32: class 2 lost
    gain = 200 * statistics.pstdev([1 if y == 9 else 0 for y in labels]) / 20 ** 0.5
    tail_gain = 200 * statistics.pstdev([1 if y == 9 else 0 for y in labels if y >= 7]) / 6 ** 0.5
    loss = 200 * statistics.pstdev([-1 if y == 2 else 0 for y in labels]) / 20 ** 0.5
    row = [c.strip() for c in text.splitlines()[-2].strip("|").split("|")]
    assert row == ["PGD-AT", " / ".join([f"+10.00 ({gain:.2f})"] * 3) + f" / +33.33 ({tail_gain:.2f})", "not run yet",
                   " / ".join([f"-10.00 ({loss:.2f})"] * 3) + " / +0.00 (0.00)", "not run yet"]
