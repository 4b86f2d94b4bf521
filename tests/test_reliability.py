"""Reliability: exact resume after SIGKILL, checkpoint safety, non-finite guards, config and data validation.

Training runs use the long-tailed digits config made tiny (width-8 CNN, a few epochs); the bit-exact resume
test runs `python -m robal train` in subprocesses with OMP_NUM_THREADS=1 so that all runs compute alike.
"""
import copy
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robal.cli import main
from robal.config import load_config
from robal.data import long_tailed_counts
from robal.registry import ConfigError
from robal.train.checkpoint import CheckpointError, atomic_save, load_model, read_checkpoint
from robal.train.trainer import Trainer, TrainingDiverged, config_differences

DIGITS = Path(__file__).resolve().parents[1] / "configs/digits_lt/pgd_at.yaml"
TINY = ["model.backbone_args.width=8", "train.checkpoint_every=1"]
ONE_EPOCH = TINY + ["train.epochs=1", "train.lr_milestones=[]"]
# 4 epochs, lr decay at 2, batches of 8 (65 steps an epoch)
RESUMABLE = TINY + ["train.epochs=4", "train.lr_milestones=[2]", "train.batch_size=8"]


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def robal_train(out, *extra, overrides=ONE_EPOCH):
    """`robal train` in this process: (exit code, stdout, stderr) via pytest's capsys in the caller."""
    return main(["train", str(DIGITS), *sets(overrides), "--out", str(out), "--quiet", *extra])


def weights(path):
    return read_checkpoint(path)["state_dict"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{a} and {b} differ in {different}"


def log_epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation, and on a busy CPU makes them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-epoch run directory (do not modify: copy it)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert robal_train(out) == 0
    return out


# ---------------------------------------------------------------- resume after SIGKILL, bit for bit

def start(out, *extra, kill_at_step=None):
    """robal train; with kill_at_step=N, SIGKILLed at its N-th optimiser step (tests/kill_wrapper.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "robal"]
    if kill_at_step is not None:
        env.update(KILL_TARGET="torch.optim:SGD.step", KILL_AT=str(kill_at_step))
        cli = [sys.executable, str(Path(__file__).with_name("kill_wrapper.py"))]
    cmd = [*cli, "train", str(DIGITS), *sets(RESUMABLE), "--out", str(out), "--quiet", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    return output


def killed(proc):
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, output


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    ref, mid, early, fallback = (tmp_path / name for name in ("ref", "mid", "early", "fallback"))
    runs = [start(ref), start(mid, kill_at_step=160), start(early, kill_at_step=10)]  # 65 steps an epoch
    killed(runs[1])  # in epoch 3
    killed(runs[2])  # in epoch 1, before any checkpoint
    finish(runs[0])
    assert not (mid / "epoch_003.pt").exists() and log_epochs(mid) == [1, 2], "not killed in epoch 3"
    assert not list(early.glob("epoch_*.pt")), "not killed before the first checkpoint"
    # keep_last: 2 bounds the checkpoints kept
    assert sorted(p.name for p in ref.glob("*.pt")) == ["epoch_003.pt", "epoch_004.pt", "model.pt"]

    # a run whose newest checkpoint is truncated falls back to the one before
    shutil.copytree(ref, fallback)
    (fallback / "model.pt").unlink()
    newest = fallback / "epoch_004.pt"
    newest.write_bytes(newest.read_bytes()[:2000])
    (fallback / ".epoch_004.pt.tmp12345").write_bytes(b"left by a kill during a write")

    resumed = [start(mid, "--resume"), start(early, "--resume", "auto"), start(fallback, "--resume")]
    out_mid, out_early, out_fallback = map(finish, resumed)
    assert "resuming from" in out_mid and "epoch_002.pt" in out_mid
    assert "no checkpoint" in out_early
    assert "epoch_004.pt" in out_fallback and "resuming from" in out_fallback and "epoch_003.pt" in out_fallback
    for run in (mid, early, fallback):
        assert_same_weights(ref / "model.pt", run / "model.pt")
        assert log_epochs(run) == [1, 2, 3, 4]
    assert not list(fallback.glob(".*tmp*"))


# ---------------------------------------------------------------- the run directory

def test_existing_run_dir_needs_overwrite(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "model.pt").read_bytes()
    assert robal_train(run) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "model.pt").read_bytes() == before
    (run / "epoch_099.pt").write_bytes(before)  # a file of the old run that the new one does not write
    assert robal_train(run, "--overwrite") == 0
    assert not (run / "epoch_099.pt").exists() and not (run / ".robal-replaced").exists()


def test_resume_refuses_a_different_config_unless_overwrite(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    longer = TINY + ["train.epochs=2", "train.lr_milestones=[]"]
    assert robal_train(run, "--resume", overrides=longer) == 2
    err = capsys.readouterr().err
    assert err.startswith("robal train: error:") and "train.epochs: 1 -> 2" in err and "--overwrite" in err
    assert robal_train(run, "--resume", "--overwrite", overrides=longer) == 0
    assert log_epochs(run) == [1, 2]
    assert read_checkpoint(run / "model.pt")["meta"]["epoch"] == 2


def test_options_added_since_a_run_started_are_no_difference():
    new = load_config(DIGITS).to_dict()
    old = copy.deepcopy(new)
    del old["train"]["skip_nonfinite"]  # a run started before this option existed
    assert config_differences(old, new) == []
    old["train"]["epochs"] = 5
    assert config_differences(old, new) == ["train.epochs: 5 -> 60"]


def test_resume_needs_a_run_but_resume_auto_starts_one(tmp_path, capsys):
    assert robal_train(tmp_path / "none", "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert robal_train(tmp_path / "new", "--resume", "auto") == 0
    assert log_epochs(tmp_path / "new") == [1]


def test_resume_refuses_checkpoint_without_training_state(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = read_checkpoint(run / "epoch_001.pt")
    del ckpt["optimizer"]
    torch.save(ckpt, run / "epoch_001.pt")
    assert robal_train(run, "--resume") == 2
    err = capsys.readouterr().err
    assert "epoch_001.pt" in err and "cannot be resumed" in err


# ---------------------------------------------------------------- checkpoints

class NotAState:
    pass


def _plain_pickle(path):
    with open(path, "wb") as f:
        pickle.dump(NotAState(), f, protocol=2)


BAD_CHECKPOINTS = {
    "pickled object": (_plain_pickle, "cannot be read"),
    "torch-saved object": (lambda p: torch.save({"format": "robal-checkpoint/1", "x": NotAState()}, p),
                           "cannot be read"),
    "empty file": (lambda p: p.write_bytes(b""), "cannot be read"),
    "text file": (lambda p: p.write_text("not a checkpoint"), "cannot be read"),
    "plain tensor": (lambda p: torch.save(torch.zeros(3), p), "not a robal checkpoint"),
    "foreign dict": (lambda p: torch.save({"model": {}}, p), "not a robal checkpoint"),
    "missing keys": (lambda p: torch.save({"format": "robal-checkpoint/1", "spec": {}}, p), "lacks state_dict, meta"),
    "state_dict a list": (lambda p: torch.save({"format": "robal-checkpoint/1", "spec": {}, "state_dict": [],
                                                "meta": {}}, p), "state_dict should be a mapping"),
}


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_refused_naming_the_file(name, tmp_path):
    write, expected = BAD_CHECKPOINTS[name]
    path = tmp_path / "bad.pt"
    write(path)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_truncated_checkpoint_and_spec_mismatch(tiny_run, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tiny_run / "model.pt").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated.pt cannot be read"):
        load_model(truncated)
    ckpt = read_checkpoint(tiny_run / "model.pt")
    ckpt["spec"]["backbone_args"]["width"] = 16  # weights of a width-8 model
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mismatch.pt does not match its model spec"):
        load_model(tmp_path / "mismatch.pt")
    assert load_model(tiny_run).training is False


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "epoch_001.pt"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_save({"a": lambda: 0}, path)  # cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_001.pt"]


# ---------------------------------------------------------------- non-finite loss and weights

def poison(trainer, bad_loss_at=(), bad_weight_after=None):
    """Make the loss NaN at these (epoch, batch) pairs (1-based); set a weight to NaN after the step of one."""
    framework, step, per_epoch = trainer.framework, trainer.optimizer.step, len(trainer.loader)
    batches = iter((epoch, batch) for epoch in range(1, 100) for batch in range(1, per_epoch + 1))
    now = [None]

    def loss_fn(model, x, y, class_weight=None):
        now[0] = next(batches)
        loss, z_clean, z_adv = framework(model, x, y, class_weight)
        return (loss * math.nan if now[0] in bad_loss_at else loss), z_clean, z_adv

    def step_fn(*args, **kwargs):
        step(*args, **kwargs)
        if now[0] == bad_weight_after:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = math.nan

    loss_fn.set_epoch = framework.set_epoch
    trainer.framework, trainer.optimizer.step = loss_fn, step_fn


def tiny_trainer(out, *overrides):
    cfg = load_config(DIGITS, TINY + ["train.epochs=2", "train.lr_milestones=[]", *overrides])
    return Trainer(cfg, out, progress=False)


def test_skip_nonfinite_skips_up_to_n_batches(tmp_path):
    trainer = tiny_trainer(tmp_path / "run", "train.skip_nonfinite=2")
    poison(trainer, bad_loss_at={(2, 3), (2, 5)})
    trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [0, 2]
    assert read_checkpoint(tmp_path / "run/model.pt")["meta"]["skipped"] == 2


def test_nonfinite_loss_beyond_n_stops_and_keeps_last_checkpoint(tmp_path):
    trainer = tiny_trainer(tmp_path / "run", "train.skip_nonfinite=1")
    poison(trainer, bad_loss_at={(2, 3), (2, 5)})
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at epoch 2, batch 5 .*epoch_001.pt, is kept"):
        trainer.fit()
    assert read_checkpoint(tmp_path / "run/epoch_001.pt")["meta"]["epoch"] == 1
    assert not (tmp_path / "run/epoch_002.pt").exists() and not (tmp_path / "run/model.pt").exists()


@pytest.mark.parametrize("last_batch", [False, True])
def test_nonfinite_weights_stop_even_with_skips_left(tmp_path, last_batch):
    trainer = tiny_trainer(tmp_path / "run", "train.skip_nonfinite=5")
    n = len(trainer.loader)
    # a NaN weight makes the next batch's loss NaN; after the last batch the end-of-epoch check sees it
    poison(trainer, bad_weight_after=(1, n if last_batch else 2))
    expected = rf"epoch 1, batch {n} \(its last\)" if last_batch else "epoch 1, batch 3"
    with pytest.raises(TrainingDiverged, match=f"non-finite weights at {expected}.*no checkpoint was written yet"):
        trainer.fit()


def test_cli_reports_divergence_cleanly(tmp_path, capsys):
    assert robal_train(tmp_path / "run", overrides=ONE_EPOCH + ["train.lr=1e30"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robal train: error: non-finite loss at epoch 1, batch ")
    assert "Traceback" not in err


# ---------------------------------------------------------------- config validation

BAD_CONFIGS = [
    # (overrides on the digits config, text the error must contain)
    (["trian.epochs=2"], "trian: unknown key (did you mean 'train'?)"),
    (["train.epoch=2"], "train.epoch: unknown key (did you mean 'epochs'?)"),
    (["train.attack.epss=0.1"], "train.attack.epss: unknown key (did you mean 'eps'?)"),
    (["train.epochs=0"], "train.epochs: must be >= 1"),
    (["train.epochs=2.5"], "train.epochs: expected an integer"),
    (["train.lr=fast"], "train.lr: expected a finite number"),
    (["train.lr=0"], "train.lr: must be > 0"),
    (["train.lr=.nan"], "train.lr: expected a finite number"),
    (["train.attack.eps=-0.1"], "train.attack.eps: must be >= 0"),
    (["eval.eps=-8/255"], "eval.eps: must be >= 0"),
    (["train.attack=pgd"], "train.attack: expected a mapping"),
    (["data.imbalance_ratio=0.5"], "data.imbalance_ratio: must be n_max / n_min >= 1"),
    (["data.profile=linear"], "data.profile: must be 'exp' or 'step'"),
    (["data.flip=maybe"], "data.flip: expected true or false"),
    (["data.source=digit"], "data.source: unknown source 'digit' (did you mean 'digits'?)"),
    (["data.source_args.test_per_klass=5"], "data.source_args.test_per_klass: source 'digits' takes no argument"),
    (["data.source=npz", "data.source_args={}", "data.path=missing.npz"], "data.path: file missing.npz does not exist"),
    (["data.source=cifar10", "data.source_args={}", "data.path=no/such/dir"], "data.path: no/such/dir does not exist"),
    (["train.lr_milestones=[2, 70]"], "train.lr_milestones[1]: epoch 70 is outside the run (1..60)"),
    (["train.lr_milestones=[50, 40]"], "train.lr_milestones: must be increasing"),
    (["train.lr_milestones=5"], "train.lr_milestones: expected a list"),
    (["train.momentum=1"], "train.momentum: must be in [0, 1)"),
    (["train.keep_last=0"], "train.keep_last: must be >= 1"),
    (["train.skip_nonfinite=-1"], "train.skip_nonfinite: must be >= 0"),
    (["train.sampler=balanced"], "train.sampler: unknown sampler 'balanced'"),
    (["model.backbone=small_cn"], "model.backbone: unknown backbone 'small_cn' (did you mean 'small_cnn'?)"),
    (["model.backbone_args.widht=8"], "model.backbone_args.widht: backbone 'small_cnn' takes no argument 'widht' "
                                      "(did you mean 'width'?)"),
    (["model.head=cosin"], "model.head: unknown head 'cosin' (did you mean 'cosine'?)"),
    (["train.framework=trade"], "train.framework: unknown framework 'trade' (did you mean 'trades'?)"),
    (["train.loss_args.gama=2"], "train.loss_args.gama: loss 'ce' takes no argument 'gama'"),
    (["train.trainable=head"], "train.trainable: freezing the backbone needs train.init_from"),
    (["train.init_from=missing.pt"], "train.init_from: missing.pt does not exist"),
    (["train.amp=fp16"], "train.amp: must be auto, off or bf16"),
    (["eval.attacks=[clean, pgd30]"], "eval.attacks[1]: unknown attack 'pgd30'"),
    (["inference=[{tau: 1.0}]"], "inference[0]: expected a mapping with a 'name'"),
    (["seed=-1"], "seed: must be in [0, 2**32)"),
    (["device=gpu"], "device: must be auto, cpu, cuda, cuda:N or mps; got 'gpu'"),
    (["train.epochs.max=3"], "--set train.epochs.max: 'epochs' is not a mapping"),
    (["train.epochs"], "--set 'train.epochs': expected key=value"),
]


@pytest.mark.parametrize("overrides, expected", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_names_the_key(overrides, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, overrides)
    assert expected in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("train: {epochs: [1, 2}", "is not valid YAML"),
    ("- a list", "expected a mapping at the top level"),
    ("base: nowhere.yaml", "nowhere.yaml does not exist"),
])
def test_bad_config_file_names_the_file(text, expected, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert "bad.yaml" in str(err.value) or "nowhere.yaml" in str(err.value)


def test_numbers_in_scientific_notation_are_accepted():
    cfg = load_config(DIGITS, ["train.lr=1e-3", "train.weight_decay=5e-4", "train.attack.eps=8/255"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.attack.eps) == (1e-3, 5e-4, 8 / 255)


def test_dry_run_prints_resolved_config_and_class_counts(tmp_path, capsys):
    assert main(["train", str(DIGITS), "--dry-run", "--set", "train.batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert "name: digits_lt_pgd_at" in out and "batch_size: 32" in out
    counts = long_tailed_counts(120, 10, 10)
    assert f"class counts ({sum(counts)} images): {counts}" in out


# ---------------------------------------------------------------- malformed data files (through --dry-run)

def good_arrays():
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), "y_train": np.arange(20) % 2,
            "x_test": rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8), "y_test": np.arange(4) % 2}


def npz_with(**changes):
    def write(path):
        arrays = {**good_arrays(), **changes}
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return write


def truncated_npz(path):
    npz_with()(path)
    path.write_bytes(path.read_bytes()[:300])


def cifar_folder(root, truncate=None, drop_key=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in files:
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
        if name == drop_key:
            del batch[b"labels"]
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    if truncate:
        (folder / truncate).write_bytes((folder / truncate).read_bytes()[:50])
    return root


BAD_DATA = {
    # name: (source, writer of the file or folder at `path`, file named in the message, problem)
    "npz missing key": ("npz", npz_with(y_test=None), "data.npz", "missing key(s) y_test"),
    "npz float images": ("npz", npz_with(x_train=np.zeros((20, 8, 8, 1), np.float32)), "data.npz",
                         "key x_train has dtype float32"),
    "npz wrong shape": ("npz", npz_with(x_train=np.zeros((20, 8, 8, 5), np.uint8)), "data.npz",
                        "key x_train has shape (20, 8, 8, 5)"),
    "npz float labels": ("npz", npz_with(y_train=np.zeros(20)), "data.npz", "key y_train is float64"),
    "npz negative label": ("npz", npz_with(y_train=np.arange(20) - 1), "data.npz", "key y_train has label -1"),
    "npz label beyond class_names": ("npz", npz_with(y_test=np.array([0, 1, 2, 1]), class_names=np.array(["a", "b"])),
                                     "data.npz", "key y_test has label 2"),
    "npz labels for fewer images": ("npz", npz_with(y_train=np.arange(19) % 2), "data.npz",
                                    "key y_train has 19 labels for 20 images"),
    "npz test images of another size": ("npz", npz_with(x_test=np.zeros((4, 9, 9, 1), np.uint8)), "data.npz",
                                        "x_test images are (9, 9, 1)"),
    "npz object array": ("npz", npz_with(class_names=np.array(["a", None], dtype=object)), "data.npz",
                         "key class_names cannot be read without pickle"),
    "not a zip": ("npz", lambda p: p.write_text("x_train,y_train"), "data.npz", "not an .npz (zip) archive"),
    "truncated npz": ("npz", truncated_npz, "data.npz", "not an .npz (zip) archive"),
    "truncated CIFAR pickle": ("cifar10", lambda p: cifar_folder(p, truncate="data_batch_3"), "data_batch_3",
                               "cannot unpickle"),
    "CIFAR batch without labels": ("cifar10", lambda p: cifar_folder(p, drop_key="test_batch"), "test_batch",
                                   "expected a dict with b'data'"),
    "CIFAR archive not a tar": ("cifar10", lambda p: p.write_bytes(b"\x1f\x8b garbage"), "data.npz",
                                "cannot read as a .tar.gz archive"),
}


@pytest.mark.parametrize("name", BAD_DATA)
def test_bad_data_file_is_named_in_the_error(name, tmp_path, capsys):
    source, write, named, problem = BAD_DATA[name]
    path = tmp_path / ("data.npz" if source == "npz" or "archive" in name else "cifar")
    write(path)
    rc = main(["train", str(DIGITS), "--dry-run", "--set", f"data.source={source}", "--set", "data.source_args={}",
               "--set", f"data.path={path}", "--set", "data.subset=full"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("robal train: error:") and named in err and problem in err, err
