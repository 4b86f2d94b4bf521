"""Evaluation: metrics add up, reliability checks fire on masked gradients and pass otherwise, outputs parse.

The masked model is the shared digits PGD-AT model with its logits multiplied by 1e4 at inference (the
`scale` adjustment): the softmax saturates, CE gradients vanish, PGD looks strong; APGD-T (DLR loss, scale
invariant) and Square (no gradients) are not fooled.
"""
import json
import shutil

import numpy as np
import pytest

from robal.cli import main
from robal.evaluate.checks import CHECKS, LEVELS, CheckContext, fake_gain, grade, paired_noise

ATTACKS = "clean,pgd20,aa-paper"
MASK = "[{name: scale, s: 10000}]"


def evaluate(digits_run, tmp_path_factory, name, *extra):
    run = tmp_path_factory.mktemp(name) / "run"
    run.mkdir()
    for f in ("model.pt", "config.yaml"):
        shutil.copy(digits_run[0] / f, run / f)
    assert main(["eval", str(run), "--attacks", ATTACKS, "--n-test", "50", "--checks", "full",
                 "--checks-n", "100", *extra]) == 0
    return run, json.loads((run / "eval.json").read_text())


@pytest.fixture(scope="module")
def normal(digits_run, tmp_path_factory):
    return evaluate(digits_run, tmp_path_factory, "normal")


@pytest.fixture(scope="module")
def masked(digits_run, tmp_path_factory):
    return evaluate(digits_run, tmp_path_factory, "masked", "--inference", MASK)


def statuses(result):
    return {c["name"]: c["status"] for c in result["checks"]}


def test_checks_pass_on_a_normal_model(normal):
    _, result = normal
    assert set(statuses(result)) == set(CHECKS)
    assert all(s == "pass" for s in statuses(result).values()), result["checks"]
    for c in result["checks"]:
        assert set(c) >= {"name", "status", "detail", "values"} and c["detail"]


def test_masked_gradients_look_robust_to_pgd_and_the_checks_fire(normal, masked):
    _, result = masked
    acc = {a: m["accuracy"] for a, m in result["attacks"].items()}
    assert acc["pgd20"] > acc["aa-paper"] + 5  # PGD fooled, AutoAttack not
    assert acc["pgd20"] > normal[1]["attacks"]["pgd20"]["accuracy"] + 5  # a "gain" from rescaling alone
    s = statuses(result)
    assert s["fake_gain"] in ("warn", "fail")
    assert s["logit_scale"] == "warn"
    assert s["zero_gradients"] == "fail"
    assert s["large_eps_to_zero"] != "pass"
    assert s["black_box"] != "pass"


def test_per_class_numbers_add_up(normal):
    _, result = normal
    labels = np.array(result["labels"])
    counts = np.bincount(labels)
    clean = result["attacks"]["clean"]
    for name, m in result["attacks"].items():
        correct = np.array(m["predictions"]) == labels
        assert m["accuracy"] == pytest.approx(100 * correct.mean())
        assert np.dot(m["per_class"], counts) / counts.sum() == pytest.approx(m["accuracy"])
        assert m["balanced_robustness"] == pytest.approx(np.mean(m["per_class"]))
        assert m["worst_class"]["accuracy"] == min(m["per_class"])
        assert m["natural_error"] == pytest.approx(100 - clean["accuracy"])
    # AutoAttack only attacks correctly classified images: robust + natural + boundary error = 100, per class too
    aa = result["attacks"]["aa-paper"]
    assert aa["accuracy"] + aa["natural_error"] + aa["boundary_error"] == pytest.approx(100)
    assert np.allclose(np.array(clean["per_class"]) - aa["per_class"], aa["per_class_boundary_error"])


def test_eval_writes_markdown_and_plots(normal):
    run, result = normal
    md = (run / "eval.md").read_text()
    assert "## Reliability checks (full)" in md and "| fake_gain | PASS |" in md
    for png in ("eval_per_class.png", "eval_pgd_steps.png", "eval_confusion.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md


def parse_table(text):
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row)) for row in body]


def test_report_table_parses(normal, masked, tmp_path, capsys):
    out = tmp_path / "report" / "table.md"
    assert main(["report", str(normal[0]), str(masked[0] / "eval.json"), "--out", str(out)]) == 0
    rows = parse_table(out.read_text())
    assert out.read_text() in capsys.readouterr().out
    assert [r["Method"] for r in rows] == ["digits_lt_pgd_at", "digits_lt_pgd_at + scale"]
    for row, (_, result) in zip(rows, (normal, masked)):
        clean, aa = (float(row[k].split("±")[0]) for k in ("Clean", "AA"))
        assert clean == pytest.approx(result["attacks"]["clean"]["accuracy"], abs=0.01)
        assert float(row["Gap"]) == pytest.approx(clean - aa, abs=0.02)
        assert row["AA version"] == "aa-paper"
    assert rows[0]["Flags"] == "none" and "fake_gain" in rows[1]["Flags"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_report_names_a_copied_json_after_its_file(normal, tmp_path, capsys):
    """study.sh copies each run's JSON to docs/results/NAME.KIND.json, away from the run's config.yaml."""
    copied = tmp_path / "results" / "robal_n_seed1.eval_300.json"
    copied.parent.mkdir()
    copied.write_text((normal[0] / "eval.json").read_text())
    assert main(["report", str(copied), str(normal[0])]) == 0
    rows = parse_table(capsys.readouterr().out)
    assert [r["Method"] for r in rows] == ["robal_n_seed1", "digits_lt_pgd_at"]


def test_report_baseline_flags_a_pgd_gain_autoattack_does_not_confirm(normal, masked, tmp_path, capsys):
    """The rescaled run's PGD-20 gain over its own unscaled model, minus its AA gain, by hand from the JSONs."""
    assert main(["report", str(normal[0]), str(masked[0]), "--baseline", str(normal[0])]) == 0
    rows = parse_table(capsys.readouterr().out)
    column = next(k for k in rows[0] if k.startswith("vs digits_lt_pgd_at"))
    acc = [{a: r["attacks"][a]["accuracy"] for a in ("pgd20", "aa-paper")} for r in (normal[1], masked[1])]
    pgd_gain, aa_gain = (acc[1][a] - acc[0][a] for a in ("pgd20", "aa-paper"))
    assert pgd_gain > 5
    assert rows[0][column].startswith("+0.00 / +0.00: +0.00 (noise 0.00) pass")
    assert rows[1][column].startswith(f"{pgd_gain:+.2f} / {aa_gain:+.2f}: {pgd_gain - aa_gain:+.2f} (noise ")
    assert rows[1][column].endswith("fail")


def test_report_baseline_on_other_images_is_not_compared(normal, digits_run, tmp_path, capsys):
    other = tmp_path / "other.json"
    assert main(["eval", str(digits_run[0]), "--attacks", "clean,pgd20,aa-paper", "--n-test", "30",
                 "--checks", "none", "--json", str(other)]) == 0
    capsys.readouterr()
    assert main(["report", str(other), "--baseline", str(normal[0])]) == 0
    row = parse_table(capsys.readouterr().out)[0]
    assert row[next(k for k in row if k.startswith("vs "))] == "—"


def test_report_of_a_run_without_eval_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "eval.json" in capsys.readouterr().err


def test_grading_needs_threshold_and_noise():
    assert grade(3.0, 1.0, (2.0, 5.0)) == "warn"
    assert grade(3.0, 4.0, (2.0, 5.0)) == "pass"   # within the noise
    assert grade(6.0, 1.0, (2.0, 5.0)) == "fail"
    a, b = np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])
    assert paired_noise(a, a) == 0
    assert paired_noise(a, b) == pytest.approx(200 * np.std([0, 1, 0, 0]) / 2)


def test_fake_gain_needs_autoattack_and_levels():
    result = {"attacks": {"clean": {"accuracy": 90.0}, "pgd20": {"accuracy": 50.0}}, "labels": []}
    out = fake_gain(CheckContext(None, None, None, result))
    assert out["status"] == "warn" and "no AutoAttack" in out["detail"]
    assert LEVELS["none"] == () and CHECKS["black_box"].level == "full"
    assert all(c.level == "basic" for n, c in CHECKS.items() if n != "black_box")
