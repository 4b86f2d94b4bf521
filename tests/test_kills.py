"""Kills survived: SIGKILL at seeded points of a digits run (inside training steps, inside checkpoint writes, inside
an evaluation), each followed by a resume or rerun that ends bit-identical to an uninterrupted run.

The kill is exact, not timed: the process runs robal under tests/kill_wrapper.py, which SIGKILLs it at the N-th call
of a function robal calls at that point (the optimiser step, the fsync of a checkpoint write, an attack batch).
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from robal.train.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs/digits_lt/pgd_at.yaml")
RUN = ["model.backbone_args.width=8", "train.checkpoint_every=1", "train.epochs=3", "train.lr_milestones=[2]",
       "train.batch_size=32", "train.keep_last=2"]
STEPS_PER_EPOCH = 17  # 519 training images in batches of 32

KILL_WRAPPER = str(Path(__file__).with_name("kill_wrapper.py"))  # its N-th call of KILL_TARGET SIGKILLs it

TRAIN = ["train", DIGITS, *[a for o in RUN for a in ("--set", o)], "--quiet"]
EVAL = ["--attacks", "clean,pgd20,mim", "--checks", "none", "--batch-size", "100"]


def robal(argv, kill_target=None, kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if kill_target is None:
        return subprocess.run([sys.executable, "-m", "robal", *argv], env=env, capture_output=True, text=True,
                              timeout=300)
    env.update(KILL_TARGET=kill_target, KILL_AT=str(kill_at))
    return subprocess.run([sys.executable, KILL_WRAPPER, *argv], env=env, capture_output=True, text=True,
                          timeout=300)


def kill_points() -> list[tuple[str, str, int]]:
    """(label, target, N): 6 seeded optimiser steps, 3 checkpoint writes (fsync before the rename), 2 eval batches."""
    rng = np.random.default_rng(2026)
    steps = sorted(rng.choice(np.arange(2, 3 * STEPS_PER_EPOCH), 6, replace=False).tolist())
    points = [(f"train step {n}", "torch.optim:SGD.step", n) for n in steps]
    points += [(f"checkpoint write {n}", "os:fsync", n) for n in (1, 2, 4)]  # epoch_001, epoch_002, model.pt
    points += [(f"eval batch {n}", "robal.evaluate.attacks:batch_seed", n) for n in (3, 8)]
    return points


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    ref = root / "ref"
    done = robal([*TRAIN, "--out", str(ref)])
    assert done.returncode == 0, done.stderr
    ev = robal(["eval", str(ref), *EVAL, "--json", str(root / "ref_eval.json")])
    assert ev.returncode == 0, ev.stderr
    return root, ref, json.loads((root / "ref_eval.json").read_text())


def survive(point, reference) -> str | None:
    """Kill at `point`, then resume or rerun; a description of what differs, or None."""
    label, target, n = point
    root, ref, ref_eval = reference
    run = root / label.replace(" ", "_")
    if label.startswith("eval"):
        import shutil
        shutil.copytree(ref, run)
        out = run / "eval_killed.json"
        killed = robal(["eval", str(run), *EVAL, "--json", str(out)], target, n)
        if killed.returncode != -9:
            return f"{label}: not killed (exit {killed.returncode}): {killed.stderr[-300:]}"
        rerun = robal(["eval", str(run), *EVAL, "--json", str(out)])
        if rerun.returncode != 0:
            return f"{label}: rerun failed: {rerun.stderr[-500:]}"
        result = json.loads(out.read_text())
        same = all(result["attacks"][a]["predictions"] == ref_eval["attacks"][a]["predictions"]
                   for a in ref_eval["attacks"])
        return None if same else f"{label}: predictions differ from the uninterrupted evaluation"
    killed = robal([*TRAIN, "--out", str(run)], target, n)
    if killed.returncode != -9:
        return f"{label}: not killed (exit {killed.returncode}): {killed.stderr[-300:]}"
    resumed = robal([*TRAIN, "--out", str(run), "--resume", "auto"])
    if resumed.returncode != 0:
        return f"{label}: resume failed: {resumed.stderr[-500:]}"
    a, b = read_checkpoint(ref / "model.pt")["state_dict"], read_checkpoint(run / "model.pt")["state_dict"]
    different = [k for k in a if not torch.equal(a[k], b[k])]
    epochs = [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]
    if different or epochs != [1, 2, 3] or list(run.glob(".*tmp*")):
        return f"{label}: weights differ in {different[:3]}, log epochs {epochs}"
    return None


def test_sigkill_at_eleven_seeded_points_ends_bit_identical(reference):
    points = kill_points()
    assert len(points) >= 10
    with ThreadPoolExecutor(2) as pool:
        problems = [p for p in pool.map(lambda pt: survive(pt, reference), points) if p]
    assert not problems, "\n".join(problems)
