"""The run directory never loses a user's files: --overwrite replaces only robal runs, checks everything first,
keeps the old run until the new one has a checkpoint; a lock keeps two processes out of one run."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from robal.cli import main
from robal.config import load_config
from robal.rundir import REPLACED, RunDirError, RunLock
from robal.train.checkpoint import read_checkpoint
from robal.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits_lt/pgd_at.yaml"
ONE_EPOCH = ["model.backbone_args.width=8", "train.epochs=1", "train.lr_milestones=[]"]


def robal_train(out, *extra, overrides=ONE_EPOCH, config=DIGITS):
    sets = [a for o in overrides for a in ("--set", o)]
    return main(["train", str(config), *sets, "--out", str(out), "--quiet", *extra])


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rundir") / "run"
    assert robal_train(out) == 0
    return out


def copy_run(one_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(one_run, run)
    return run


def test_overwrite_never_touches_a_folder_that_is_not_a_robal_run(tmp_path, capsys, monkeypatch):
    decoy = tmp_path / "my_project"
    (decoy / "data").mkdir(parents=True)
    (decoy / "notes.txt").write_text("three weeks of notes")
    (decoy / "data" / "train.npz").write_bytes(os.urandom(1000))
    (decoy / "model.pt").write_bytes(b"not robal's")  # robal's names alone do not make it a run
    (decoy / ".hidden").write_text("x")
    before = snapshot(decoy)
    assert robal_train(decoy, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "not a robal run directory" in err and "notes.txt" in err and "Nothing was removed" in err
    monkeypatch.chdir(decoy)  # `--out .` emptied the working directory once
    assert robal_train(".", "--overwrite") == 2
    assert "not a robal run directory" in capsys.readouterr().err
    assert snapshot(decoy) == before


def test_overwrite_refuses_a_run_that_holds_foreign_files(one_run, tmp_path, capsys):
    run = copy_run(one_run, tmp_path)
    (run / "analysis.ipynb").write_text("{}")
    (run / "plots").mkdir()
    before = snapshot(run)
    assert robal_train(run, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "files robal did not write: analysis.ipynb, plots" in err
    assert snapshot(run) == before


def test_overwrite_checks_everything_before_touching_the_old_run(one_run, tmp_path, capsys):
    run = copy_run(one_run, tmp_path)
    before = snapshot(run)
    # a fine-tune into its source run's own directory
    assert robal_train(run, "--overwrite", overrides=ONE_EPOCH + [f"train.init_from={run / 'model.pt'}"]) == 2
    assert "lies inside --out" in capsys.readouterr().err
    # a config that fails only when the model meets the data: 3 input channels for 1-channel digits
    assert robal_train(run, "--overwrite", overrides=ONE_EPOCH + ["model.backbone_args.in_channels=3"]) == 2
    err = capsys.readouterr().err
    assert "model:" in err and "in_channels" in err and "Traceback" not in err
    # a loss argument of the wrong type, which only the loss computation meets
    assert robal_train(run, "--overwrite", overrides=ONE_EPOCH + ["train.loss=focal", "train.loss_args={gamma: abc}"]) == 2
    assert "train.loss_args" in capsys.readouterr().err
    assert snapshot(run) == before


def test_the_old_run_is_kept_aside_until_the_new_run_has_a_checkpoint(one_run, tmp_path):
    run = copy_run(one_run, tmp_path)
    old_model = (run / "model.pt").read_bytes()
    cfg = load_config(DIGITS, ONE_EPOCH + ["seed=3"])
    trainer = Trainer(cfg, run, overwrite=True, progress=False)  # set aside, not trained yet (as if killed here)
    trainer.lock.release()
    assert (run / REPLACED / "model.pt").read_bytes() == old_model
    assert sorted(p.name for p in run.iterdir()) == [".lock", REPLACED, "config.yaml"]
    # replaced again before any checkpoint: the first run stays aside, the unfinished one goes
    Trainer(cfg, run, overwrite=True, progress=False).fit()
    assert not (run / REPLACED).exists()
    assert read_checkpoint(run / "model.pt")["meta"]["config"]["seed"] == 3


def test_demo_refuses_to_replace_its_runs_without_overwrite(tmp_path, capsys):
    (tmp_path / "pgd_at").mkdir()
    (tmp_path / "pgd_at" / "mine.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1"]) == 2
    assert "pgd_at already exists" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--overwrite"]) == 2  # not a robal run
    assert "not a robal run directory" in capsys.readouterr().err
    assert (tmp_path / "pgd_at" / "mine.txt").read_text() == "mine"


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep")
    assert robal_train(f) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert f.read_text() == "keep"


def test_a_second_process_on_one_run_exits_naming_the_holder(one_run, tmp_path, capsys):
    run = copy_run(one_run, tmp_path)
    holder = RunLock(run).acquire()
    try:
        assert robal_train(run, "--resume", "auto") == 2
        err = capsys.readouterr().err
        assert f"in use by robal pid {os.getpid()}" in err
    finally:
        holder.release()
    log = (run / "log.jsonl").read_text()
    assert robal_train(run, "--resume", "auto") == 0  # released: it runs (nothing left to train)
    assert (run / "log.jsonl").read_text() == log


def test_a_lock_left_by_a_killed_process_does_not_block_a_resume(one_run, tmp_path):
    run = copy_run(one_run, tmp_path)
    code = ("import sys, time; from robal.rundir import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match="in use by robal pid"):
            RunLock(run).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert (run / ".lock").read_text().startswith(f"robal pid {proc.pid}")  # the file stays, the lock does not
    assert robal_train(run, "--resume", overrides=ONE_EPOCH[:1] + ["train.epochs=2", "train.lr_milestones=[]"],
                       ) == 2  # a changed config is still refused: the lock was not the obstacle
    assert robal_train(run, "--resume", "--overwrite",
                       overrides=ONE_EPOCH[:1] + ["train.epochs=2", "train.lr_milestones=[]"]) == 0
    assert read_checkpoint(run / "model.pt")["meta"]["epoch"] == 2


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(one_run, tmp_path, monkeypatch, capsys):
    import errno

    import torch as torch_module

    run = copy_run(one_run, tmp_path)
    real_save = torch_module.save
    saved = []

    def save(obj, f, *args, **kwargs):
        if saved:  # the second checkpoint write finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch_module, "save", save)
    two = ONE_EPOCH[:1] + ["train.epochs=2", "train.lr_milestones=[]", "train.checkpoint_every=1"]
    assert robal_train(run, "--overwrite", overrides=two) == 2
    err = capsys.readouterr().err
    assert "epoch_002.pt failed" in err and "No space left" in err and "epoch_001.pt, is kept" in err
    assert not list(run.glob(".*tmp*"))
    assert read_checkpoint(run / "epoch_001.pt")["meta"]["epoch"] == 1


def test_evaluating_another_checkpoint_does_not_replace_the_runs_evaluation(one_run, tmp_path, capsys):
    run = copy_run(one_run, tmp_path)
    shutil.copy(run / "model.pt", run / "epoch_050.pt")
    assert main(["eval", str(run), "--attacks", "clean", "--checks", "none"]) == 0
    before = (run / "eval.json").read_bytes()
    assert main(["eval", str(run / "epoch_050.pt"), "--attacks", "clean", "--checks", "none"]) == 0
    assert (run / "eval.json").read_bytes() == before
    assert (run / "eval_epoch_050.json").is_file() and (run / "eval_epoch_050.md").is_file()


def test_suspicious_values_warn(tmp_path, capsys):
    assert robal_train(tmp_path / "run", "--dry-run", overrides=ONE_EPOCH + ["train.attack.eps=8"]) == 0
    assert "train.attack.eps 8 is above 32/255" in capsys.readouterr().err

