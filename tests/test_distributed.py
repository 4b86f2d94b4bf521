"""Distributed training and evaluation: `torchrun --nproc-per-node 2 -m robal ...` on 2 CPU processes (gloo)
against one process, on the long-tailed digits made tiny.

Tolerances (measured on the reference machine, 2 CPU cores, OMP_NUM_THREADS=1):
- with train.sync_bn and no random start the two runs compute the same thing in another summation order:
  after the first epoch (15 steps, unequal slices of 19 / 18 and an empty last slice) the weights differ by at
  most 4.8e-7 (test: 1e-4); after the second epoch by 2.0e-3 (test: 2e-2), once float differences have flipped
  the sign of a few PGD input gradients; loss and accuracies in the log agree;
- with per-rank BatchNorm and random starts (the defaults) a 2-rank run is another sample of the same training
  (different BatchNorm batches and random starts); it is checked for exact resume instead;
- evaluation: every prediction, hence every per-class count, equals the single-process one exactly.
Runtime: about 50 s (four torchrun launches of ~12 s, mostly starting Python and torch).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robal.cli import main
from robal.distributed import shard_batches, shard_indices, slice_weight, torchrun_command
from robal.train.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits_lt/pgd_at.yaml"
# 519 training images in global batches of 37: 14 full batches (slices of 19 and 18) and a last batch of one
# image, so rank 1's last slice is empty
TINY = ["model.backbone_args.width=4", "train.epochs=2", "train.lr_milestones=[]", "train.batch_size=37",
        "train.checkpoint_every=1"]
EXACT = TINY + ["train.sync_bn=true", "train.attack.random_start=false"]
EVAL = ["--attacks", "clean,fgsm,pgd20", "--batch-size", "64", "--checks", "none"]  # 8 batches of the 500 images


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "robal",
           *map(str, args)]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def max_weight_diff(a, b) -> float:
    wa, wb = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].is_floating_point())


def log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_sharding_helpers():
    for n, batch, world in [(500, 64, 2), (519, 37, 2), (10, 4, 3), (3, 8, 4)]:
        parts = [shard_indices(n, batch, (r, world)) for r in range(world)]
        assert sorted(torch.cat(parts).tolist()) == list(range(n))  # every item once
        assert sorted(b for r in range(world) for b in shard_batches(n, batch, (r, world))) == \
            list(range(-(-n // batch)))
    # the last global batch of one image: slices of 1 and 0, weights summing to the world size
    assert slice_weight(1, 1, 2) + slice_weight(0, 1, 2) == 2
    assert slice_weight(19, 37, 2) + slice_weight(18, 37, 2) == pytest.approx(2)
    cmd = torchrun_command(["train", "c.yaml", "--launcher", "torchrun", "--nproc=3", "--out", "r"], 3)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "robal",
                       "train", "c.yaml", "--out", "r"]


def test_torchrun_training_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(DIGITS), *sets(EXACT), "--out", str(one), "--quiet"]) == 0
    torchrun("train", DIGITS, *sets(EXACT), "--out", two, "--quiet")
    assert max_weight_diff(one / "epoch_001.pt", two / "epoch_001.pt") < 1e-4  # measured 4.8e-7
    assert max_weight_diff(one / "model.pt", two / "model.pt") < 2e-2          # measured 2.0e-3
    for a, b in zip(log(one), log(two), strict=True):  # rank 0 alone wrote the log: one record per epoch
        assert a["epoch"] == b["epoch"] and abs(a["loss"] - b["loss"]) < 1e-2
        assert abs(a["clean_acc"] - b["clean_acc"]) <= 1 and abs(a["adv_acc"] - b["adv_acc"]) <= 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_torchrun_resume_and_evaluation(tmp_path, monkeypatch, capsys):
    """Default settings (per-rank BatchNorm, random starts): a run resumed from its epoch-1 checkpoint under
    torchrun ends bit-identical to the uninterrupted one; `robal eval` on 2 ranks gives the single-process JSON."""
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    torchrun("train", DIGITS, *sets(TINY), "--out", run, "--quiet")
    shutil.copytree(run, resumed)
    (resumed / "epoch_002.pt").unlink()
    (resumed / "model.pt").unlink()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    code = main(["train", str(DIGITS), *sets(TINY), "--out", str(resumed), "--resume", "--quiet",
                 "--launcher", "torchrun", "--nproc", "2"])  # through torchrun, like the line above
    assert code == 0
    assert max_weight_diff(run / "model.pt", resumed / "model.pt") == 0
    assert [r["epoch"] for r in log(resumed)] == [1, 2]

    torchrun("eval", run, *EVAL, "--json", tmp_path / "two.json")
    assert main(["eval", str(run), *EVAL, "--json", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for name, res in one["attacks"].items():
        assert two["attacks"][name]["predictions"] == res["predictions"], name
        assert two["attacks"][name]["per_class"] == res["per_class"], name
    assert {k: v for k, v in two.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
