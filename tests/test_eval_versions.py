"""Issue 24, parts 3-5: the AutoAttack versions (settings read back from pyautoattack), resumable evaluation
(killed in the middle, rerun, same JSON) and the leaderboard.

Runtime about 40-50 s on 2 shared CPU cores, most of it Square's 5,000 queries in `aa` and `aa-10step` (a
Python loop of small tensor operations, whatever the model), so the model there is a small MLP."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robal.cli import main
from robal.evaluate import resume
from robal.evaluate.attacks import (AA_VERSIONS, autoattack_settings, build_autoattack, is_known_attack,
                                    settings_summary)
from robal.evaluate.leaderboard import leaderboard
from robal.evaluate.metrics import class_thirds
from robal.evaluate.metrics import attack_metrics
from robal.evaluate.runner import evaluate_model, to_images

ROOT = Path(__file__).resolve().parents[1]
EPS, STEP = 0.1, 0.025  # the digits configs' budget


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


# ------------------------------------------------------------------------------------ versions and settings

def test_every_version_is_registered_and_known():
    assert {"aa", "aa-paper", "aa-10step", "aa-plus"} <= set(AA_VERSIONS)
    assert all(is_known_attack(name) for name in AA_VERSIONS)
    assert is_known_attack("aa:apgd-ce+square") and not is_known_attack("aa:apgd-ce+nope")
    assert not is_known_attack("aa-20step")


def test_aa_10step_iterations_read_back_from_the_attack_objects():
    adversary = build_autoattack("aa-10step", nn.Identity(), EPS, "cpu", 0, 10)
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert adversary.apgd.n_iter == adversary.apgd_targeted.n_iter == adversary.fab.n_iter == 10
    assert adversary.square.n_queries == 5000
    assert adversary.apgd_targeted.n_target_classes == adversary.fab.n_target_classes == 9
    assert adversary.apgd.n_restarts == adversary.apgd_targeted.n_restarts == adversary.fab.n_restarts == 1
    # the step-size checkpoints follow the 10 iterations (the constructor derives them), not the default 100
    assert (adversary.apgd.n_iter_2, adversary.apgd.n_iter_min, adversary.apgd.size_decr) == (2, 1, 1)
    assert (adversary.apgd_targeted.n_iter_2, adversary.apgd_targeted.n_iter_orig) == (2, 10)
    # rebuilt APGD objects keep every other setting of the standard version's
    standard = build_autoattack("aa", nn.Identity(), EPS, "cpu", 0, 10)
    derived = {"n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr"}
    for ours, theirs in ((adversary.apgd, standard.apgd), (adversary.apgd_targeted, standard.apgd_targeted)):
        assert type(ours) is type(theirs)
        assert {k: v for k, v in vars(ours).items() if k not in derived | {"model"}} == \
               {k: v for k, v in vars(theirs).items() if k not in derived | {"model"}}
        assert theirs.n_iter == 100 and theirs.n_iter_2 == 22
    assert standard.fab.n_iter == 100
    # fewer classes than 10: C - 1 targets
    small = build_autoattack("aa-10step", nn.Identity(), EPS, "cpu", 0, 4)
    assert small.apgd_targeted.n_target_classes == small.fab.n_target_classes == 3


def test_settings_labels():
    ten = autoattack_settings("aa-10step", EPS, 3, 10)
    assert ten["version"] == "standard" and ten["seed"] == 3 and ten["eps"] == EPS
    assert ten["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert [ten["per_attack"][a].get("n_iter") for a in ten["attacks"]] == [10, 10, 10, None]
    assert ten["per_attack"]["square"]["n_queries"] == 5000
    assert ten["per_attack"]["apgd-t"]["n_target_classes"] == ten["per_attack"]["fab-t"]["n_target_classes"] == 9
    plus = autoattack_settings("aa-plus", EPS, 0, 10)
    assert plus["version"] == "plus"
    assert plus["attacks"] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert plus["per_attack"]["apgd-ce"]["n_restarts"] == plus["per_attack"]["apgd-dlr"]["n_restarts"] == 5
    assert plus["per_attack"]["fab"]["n_restarts"] == 5 and plus["per_attack"]["fab-t"]["n_restarts"] == 1
    assert all(plus["per_attack"][a]["n_iter"] == 100 for a in ("apgd-ce", "apgd-dlr", "fab", "apgd-t", "fab-t"))
    paper = autoattack_settings("aa-paper", EPS, 0, 10)
    assert paper["attacks"] == ["apgd-ce", "apgd-t"] and paper["per_attack"]["apgd-ce"]["n_restarts"] == 1
    assert settings_summary(ten) == ("standard: apgd-ce 10 it, apgd-t 10 it x 9 targets, fab-t 10 it x 9 targets, "
                                     "square 5000 queries")
    assert "apgd-ce 100 it x 5 restarts" in settings_summary(plus)


class Confident(nn.Module):
    """Class 0 by a margin no attack within eps can overcome (so every attack of a version runs)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 10)
        self.register_buffer("bias", torch.tensor([20.0] + [0.0] * 9))

    def forward(self, x):
        return self.bias + 0.01 * self.linear(x.flatten(1))


@pytest.mark.parametrize("name", ["aa-plus", "aa-10step"])
def test_settings_are_those_in_effect_when_each_attack_runs(name, monkeypatch):
    """pyautoattack changes some settings in its run loop (the APGD loss, FAB's targeted flag and restarts): the
    recorded settings must be those each attack has when pyautoattack calls it. The attacks are stubbed (they
    return the clean images) so that only the run loop runs."""
    import robal.evaluate.attacks as attacks_module

    seen = {}

    def attack_name(obj, adversary):
        if obj is adversary.apgd:
            return "apgd-" + obj.loss
        if obj is adversary.fab:
            return "fab-t" if obj.targeted else "fab"
        return "apgd-t" if obj is adversary.apgd_targeted else "square"

    def recording_build(*args):
        adversary = build_autoattack(*args)
        for obj in (adversary.apgd, adversary.apgd_targeted, adversary.fab, adversary.square):
            def perturb(x, y, _obj=obj):
                keys = ("n_iter", "n_restarts", "n_target_classes", "n_queries")
                seen[attack_name(_obj, adversary)] = {k: getattr(_obj, k) for k in keys if hasattr(_obj, k)}
                return x
            obj.perturb = perturb
        return adversary

    monkeypatch.setattr(attacks_module, "build_autoattack", recording_build)
    x = torch.rand(3, 3, 2, 2)
    preds = attacks_module.attack_predictions(name, Confident(), x, torch.zeros(3, dtype=torch.long), EPS, STEP,
                                              3, "cpu")
    assert preds.tolist() == [0, 0, 0]
    settings = autoattack_settings(name, EPS, 0, 10)
    assert list(seen) == settings["attacks"]
    for attack, values in seen.items():
        if attack in ("fab", "apgd-ce", "apgd-dlr"):  # untargeted: the object's target count plays no part
            values.pop("n_target_classes", None)
        assert {k: settings["per_attack"][attack][k] for k in values} == values, attack


# ------------------------------------------------------------------------------------ a small trained model

@pytest.fixture(scope="module")
def mlp(digits_data):
    """A small MLP adversarially trained (PGD-5) on the long-tailed digits in a few seconds."""
    from robal.attacks import pgd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = to_images(digits_data.x_train), torch.as_tensor(digits_data.y_train, dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(6):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            xb, yb = x[perm[i:i + 64]], y[perm[i:i + 64]]
            model.eval()
            x_adv = pgd(model, xb, yb, EPS, STEP, 5)
            model.train()
            loss = nn.functional.cross_entropy(model(x_adv), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_aa_10step_is_never_stronger_than_aa(mlp, digits_data):
    """On the same 20 images (one batch, seeded) the 10-step version's robust accuracy is at least standard
    AutoAttack's; each result is labelled with its settings."""
    result = evaluate_model(mlp, digits_data.x_test, digits_data.y_test, ["pgd20", "aa-10step", "aa"], EPS, STEP,
                            list(digits_data.class_counts), batch_size=20, n_test=20, seed=0, progress=False)
    acc = {name: m["accuracy"] for name, m in result["attacks"].items()}
    print("accuracy on 20 digits:", acc, "seconds:", result["seconds"])
    assert 0 < acc["aa"] < acc["clean"]  # a model with something left to attack
    assert acc["aa-10step"] >= acc["aa"]
    assert result["attacks"]["aa-10step"]["settings"]["per_attack"]["apgd-ce"]["n_iter"] == 10
    assert result["attacks"]["aa"]["settings"]["per_attack"]["apgd-ce"]["n_iter"] == 100
    assert "settings" not in result["attacks"]["pgd20"]


def test_autoattack_runs_batch_by_batch(mlp, digits_data):
    """One batch is exactly one call of the official implementation; batches taken by two shards and put back in
    order give one process's predictions."""
    import logging

    from pyautoattack import AutoAttack

    from robal.evaluate.attacks import AutoAttackAdapter, attack_predictions
    from robal.distributed import shard_indices

    x, y = to_images(digits_data.x_test[::50][:10]), torch.as_tensor(digits_data.y_test[::50][:10])
    ours = attack_predictions("aa-paper", mlp, x, y, EPS, STEP, 10, "cpu", seed=0)
    torch.manual_seed(0)
    official = AutoAttack(AutoAttackAdapter(mlp), eps=EPS, norm="Linf", version="custom",
                          attacks=["apgd-ce", "apgd-t"], device="cpu", seed=0)
    official.apgd.n_restarts = 1  # the standard version's (custom starts APGD-CE with 5)
    official.logger.setLevel(logging.WARNING)
    _, y_adv = official.run_standard_evaluation(x.contiguous(), y, batch_size=10)
    assert torch.equal(ours, y_adv) and (ours != y).any()

    name = "aa:apgd-ce+apgd-dlr"
    batched = attack_predictions(name, mlp, x, y, EPS, STEP, 4, "cpu", seed=0)
    shards = {r: attack_predictions(name, mlp, x, y, EPS, STEP, 4, "cpu", seed=0, shard=(r, 2)) for r in (0, 1)}
    gathered = torch.empty_like(batched)
    for r, preds in shards.items():
        gathered[shard_indices(len(x), 4, (r, 2))] = preds
    assert torch.equal(gathered, batched)


# ------------------------------------------------------------------------------------ resumable evaluation

class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, units: int):
    """EvalState.save raises once `units` units are stored (as a kill right after the last store would)."""
    saved = []
    original = resume.EvalState.save

    def save(self, *args):
        original(self, *args)
        saved.append(args[:2])
        if len(saved) == units:
            raise Interrupted
    monkeypatch.setattr(resume.EvalState, "save", save)
    return saved


def test_interrupted_evaluation_resumes_to_the_same_result(mlp, digits_data, tmp_path, monkeypatch, capsys):
    args = (mlp, digits_data.x_test, digits_data.y_test, ["fgsm", "aa:apgd-ce+apgd-dlr"], EPS, STEP,
            list(digits_data.class_counts))
    kwargs = dict(batch_size=5, n_test=20, seed=0)  # 4 batches per attack, clean included: 12 units
    reference = evaluate_model(*args, **kwargs, progress=False)
    state = tmp_path / "eval.json.partial"
    fingerprint = {"checkpoint": "mlp"}
    saved = interrupt_after(monkeypatch, 10)  # clean, fgsm and two batches of AutoAttack
    with pytest.raises(Interrupted):
        evaluate_model(*args, **kwargs, progress=False, state_dir=state, fingerprint=fingerprint)
    assert saved[-2:] == [("aa:apgd-ce+apgd-dlr", 0), ("aa:apgd-ce+apgd-dlr", 1)]
    assert len(list((state / "units").glob("*/*.json"))) == 10
    monkeypatch.undo()

    computed = []
    original = resume.EvalState.save
    monkeypatch.setattr(resume.EvalState, "save", lambda self, *a: (computed.append(a[:2]), original(self, *a)))
    resumed = evaluate_model(*args, **kwargs, progress=True, state_dir=state, fingerprint=fingerprint)
    assert "resuming the evaluation" in capsys.readouterr().out
    # only what the interrupted run had not stored
    assert computed == [("aa:apgd-ce+apgd-dlr", 2), ("aa:apgd-ce+apgd-dlr", 3)]
    assert without_seconds(resumed) == without_seconds(reference)
    assert resumed["seconds"]["aa:apgd-ce+apgd-dlr"] > 0  # the stored units' times count

    # another eps, or other weights: the stored state is discarded, and the opening says so
    x, y = to_images(digits_data.x_test[:20]), torch.as_tensor(digits_data.y_test[:20])
    key = resume.evaluation_fingerprint(mlp, x, y, ["clean", "fgsm"], EPS, STEP, 5, 0, "cpu", fingerprint)
    resume.EvalState.open(state, key, log=None).save("fgsm", 0, torch.tensor([1]), 0.5)
    messages = []
    changed = resume.evaluation_fingerprint(mlp, x, y, ["clean", "fgsm"], 0.05, STEP, 5, 0, "cpu", fingerprint)
    assert resume.EvalState.open(state, changed, log=messages.append).load("fgsm", 0, 1) is None
    assert "starting afresh" in messages[0] and "eps" in messages[0]
    with torch.no_grad():
        mlp[1].bias[0] += 1
    other_weights = resume.evaluation_fingerprint(mlp, x, y, ["clean", "fgsm"], 0.05, STEP, 5, 0, "cpu",
                                                  fingerprint)
    with torch.no_grad():
        mlp[1].bias[0] -= 1
    resume.EvalState.open(state, other_weights, log=messages.append)
    assert "model" in messages[1] and "eps" not in messages[1]
    resume.clear_state(state)
    assert not state.exists()


def test_state_files_are_written_atomically(tmp_path, monkeypatch):
    """A kill during a unit's write leaves the previous file (or none), never a truncated one."""
    state = resume.EvalState.open(tmp_path / "s", {"a": 1}, log=None)
    state.save("aa:apgd-ce+square", 0, torch.tensor([1, 2, 3]), 1.0)
    assert state.load("aa:apgd-ce+square", 0, 3).tolist() == [1, 2, 3]

    def killed(src, dst):
        raise Interrupted
    monkeypatch.setattr(resume.os, "replace", killed)
    with pytest.raises(Interrupted):
        state.save("aa:apgd-ce+square", 0, torch.tensor([4, 5, 6]), 1.0)
    monkeypatch.undo()
    assert state.load("aa:apgd-ce+square", 0, 3).tolist() == [1, 2, 3]
    assert state.load("aa:apgd-ce+square", 0, 4) is None  # another batch size: not this unit
    (tmp_path / "s" / "mine.txt").write_text("not robal's")
    resume.clear_state(tmp_path / "s")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["mine.txt"]


KILL_AFTER = """
import os, signal, sys
from robal.evaluate import resume
saved = []
original = resume.EvalState.save
def save(self, *args):
    original(self, *args)
    saved.append(args)
    if len(saved) == {units}:
        os.kill(os.getpid(), signal.SIGKILL)
resume.EvalState.save = save
from robal.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_robal_eval_resumes_to_the_same_json(digits_run, tmp_path, capsys):
    """`robal eval` killed (SIGKILL) right after its 5th stored batch (clean 2, FGSM 2, APGD-CE 1 of 2), rerun
    with the same arguments on the run directory moved elsewhere (a fresh checkout): it resumes, gives the same JSON
    as an uninterrupted run, and removes the state."""
    run = tmp_path / "run"
    shutil.copytree(digits_run[0], run)
    eval_args = ["--attacks", "clean,fgsm,aa:apgd-ce", "--n-test", "20", "--batch-size", "10", "--checks", "none"]
    killed_json = tmp_path / "killed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER.format(units=5), "eval", str(run), *eval_args,
                           "--json", str(killed_json)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = resume.state_dir_for(killed_json)
    assert not killed_json.exists() and len(list((state / "units").glob("*/*.json"))) == 5

    moved = run.rename(tmp_path / "moved")
    assert main(["eval", str(moved), *eval_args, "--json", str(killed_json)]) == 0
    assert "resuming the evaluation stored in" in capsys.readouterr().out
    assert not state.exists()
    assert main(["eval", str(moved), *eval_args, "--json", str(tmp_path / "whole.json")]) == 0
    resumed, whole = (json.loads(p.read_text()) for p in (killed_json, tmp_path / "whole.json"))
    assert without_seconds(resumed) == without_seconds(whole)
    assert resumed["attacks"]["aa:apgd-ce"]["settings"]["attacks"] == ["apgd-ce"]


# ------------------------------------------------------------------------------------ leaderboard

def fake_eval(path: Path, name: str, clean: float, robust: dict, counts: list[int], n_per_class: int = 10):
    """An eval JSON with `robust[attack]` the per-class count right out of n_per_class."""
    labels = np.repeat(np.arange(len(counts)), n_per_class)

    def correct(per_class):
        return np.concatenate([np.arange(n_per_class) < k for k in per_class])

    clean_correct = correct([round(clean * n_per_class)] * len(counts))
    attacks = {"clean": attack_metrics(clean_correct, clean_correct, labels, counts)}
    for attack, per_class in robust.items():
        attacks[attack] = attack_metrics(correct(per_class), clean_correct, labels, counts)
        if attack in AA_VERSIONS:
            attacks[attack]["settings"] = autoattack_settings(attack, 8 / 255, 0, len(counts))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"attacks": attacks, "class_counts": counts, "n_test": len(labels),
                                "labels": labels.tolist(), "eps": 8 / 255, "step_size": 2 / 255,
                                "data": "cifar10-LT ratio 50", "class_names": list("abcdefghij")[:len(counts)]}))
    return path


def test_leaderboard(tmp_path, capsys):
    counts = [500, 300, 200, 120, 80, 50]  # tail third: classes 4 and 5
    a = fake_eval(tmp_path / "a" / "weak.eval.json", "weak", 0.8, {"pgd20": [6] * 6, "aa": [5, 5, 5, 5, 2, 0]}, counts)
    b = fake_eval(tmp_path / "strong.eval.json", "strong", 0.9,
                  {"aa-10step": [9, 8, 8, 7, 6, 6], "aa": [9, 8, 7, 7, 6, 5], "aa-paper": [9, 8, 8, 7, 6, 5]}, counts)
    c = fake_eval(tmp_path / "noaa.eval.json", "noaa", 0.7, {"pgd20": [5] * 6}, counts)
    assert class_thirds(counts)[2] == [4, 5] and class_thirds([10, 1, 5])[2] == [1]
    board = leaderboard([a, c, b])
    rows = board["rows"]
    assert [r["model"] for r in rows] == ["strong", "weak", "noaa"]
    strong, weak, noaa = rows
    assert strong["aa_version"] == "aa" and strong["aa"] == pytest.approx(100 * 42 / 60)  # the lowest of the three
    assert strong["aa_settings"].startswith("standard: apgd-ce 100 it")
    assert weak["aa"] == pytest.approx(100 * 22 / 60)
    assert weak["balanced_robustness"] == pytest.approx(np.mean([50, 50, 50, 50, 20, 0]))
    assert weak["worst_class"] == {"class": 5, "name": "f", "accuracy": 0.0}
    assert weak["tail_third"] == pytest.approx(10.0) and weak["tail_classes"] == [4, 5]
    assert strong["tail_third"] == pytest.approx(55.0)
    assert noaa["aa"] is None and noaa["rank"] == 3
    assert (strong["data"], strong["n_test"], strong["clean"]) == ("cifar10-LT ratio 50", 60, pytest.approx(90.0))

    assert main(["report", "--leaderboard", str(a), str(b), str(c), "--out", str(tmp_path / "board.md")]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "board.md").read_text()
    assert md in printed
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| # | Model | Data | eps | AA version |")
    assert lines[1].startswith("| 1 | strong | cifar10-LT ratio 50 | 8/255 | aa | standard: apgd-ce 100 it")
    assert "| 36.67 ± " in lines[2] and "| 10.00 |" in lines[2] and "0.00 (f)" in lines[2]
    assert json.loads((tmp_path / "board.json").read_text())["rows"] == json.loads(json.dumps(rows))
    with pytest.raises(SystemExit, match="--baseline"):
        main(["report", "--leaderboard", str(a), "--baseline", str(b)])
