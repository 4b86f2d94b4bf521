"""Packaging: config names, `robal --version`, and (opt-in, minutes) the built wheel working outside the repository.

The slow test runs only with ROBAL_PACKAGING_TEST=1 (README, "Development"):

    ROBAL_PACKAGING_TEST=1 .venv/bin/python -m pytest tests/test_packaging.py -m packaging

It needs `build` and `twine` (`pip install -e ".[release]"`) and reaches the package index for the wheel's
dependencies; torch is installed first from ROBAL_PACKAGING_TORCH (default `torch==2.13.0`, the CPU build that
lies on the reference machine).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from robal._version import __version__
from robal.cli import main
from robal.config import PACKAGED_CONFIGS, load_config, resolve_config
from robal.registry import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fast: in the default run

def test_packaged_config_names_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: configs/ is not on disk here
    want = PACKAGED_CONFIGS / "cifar10_lt" / "robal_n.yaml"
    for name in ("cifar10_lt/robal_n", "cifar10_lt/robal_n.yaml", "configs/cifar10_lt/robal_n.yaml"):
        assert resolve_config(name) == want
    cfg = load_config("digits_lt/pgd_at", validate_files=True)
    assert cfg.name == "digits_lt_pgd_at"


def test_a_file_on_disk_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_lt").mkdir()
    (tmp_path / "digits_lt" / "pgd_at.yaml").write_text(f"base: {PACKAGED_CONFIGS / 'digits_lt/pgd_at.yaml'}\n"
                                                       "name: mine\n")
    assert resolve_config("digits_lt/pgd_at.yaml") == Path("digits_lt/pgd_at.yaml")
    assert load_config("digits_lt/pgd_at.yaml").name == "mine"
    assert load_config("digits_lt/pgd_at").name == "digits_lt_pgd_at"  # no such file: the packaged one


def test_unknown_config_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_config("cifar10_lt/robal_x")
    msg = str(err.value)
    assert str(tmp_path / "cifar10_lt" / "robal_x") in msg and str(PACKAGED_CONFIGS) in msg
    assert "did you mean 'cifar10_lt/robal_" in msg and "robal_n, robal_n_e80, robal_r, taet" in msg
    with pytest.raises(ConfigError, match="packaged config folders: .*digits_lt/"):
        resolve_config("nothing/here")


def test_packaged_config_with_relative_data_path_says_how_to_give_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "cifar10_lt/robal_n", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "data.path: file ../shared/data/cifar10.npz does not exist" in err
    assert "--set data.path=PATH" in err and str(tmp_path) in err


def test_version_is_set_in_one_place(capsys):
    import robal

    assert robal.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"robal {__version__}"
    assert f"## [{__version__}]" in (REPO / "CHANGELOG.md").read_text()
    assert f"version: {__version__}" in (REPO / "CITATION.cff").read_text()
    assert 'version = {attr = "robal._version.__version__"}' in (REPO / "pyproject.toml").read_text()


# ---------------------------------------------------------------- slow: build, check, install, run

def _run(cmd, cwd, env, timeout=900) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _tiny_cifar_npz(path: Path) -> None:
    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(10), 50), np.repeat(np.arange(10), 5)
    np.savez(path, x_train=rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8), y_train=y_train,
             x_test=rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), y_test=y_test)


@pytest.mark.packaging
@pytest.mark.skipif(os.environ.get("ROBAL_PACKAGING_TEST") != "1",
                    reason="builds and installs the wheel (minutes); set ROBAL_PACKAGING_TEST=1")
def test_wheel_works_outside_the_repository(tmp_path):
    started = time.monotonic()
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")

    # sdist and wheel (the wheel built from the sdist), both passing twine's checks
    _run([sys.executable, "-m", "build", "--outdir", dist, REPO], REPO, env)
    sdist, = dist.glob(f"robal-{__version__}.tar.gz")
    wheel, = dist.glob(f"robal-{__version__}-py3-none-any.whl")
    assert "PASSED" in _run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel], REPO, env)
    n_configs = len(list(PACKAGED_CONFIGS.rglob("*.yaml")))
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = whl.read(f"robal-{__version__}.dist-info/METADATA").decode()
    assert sum(re.fullmatch(r"robal/configs/.+\.yaml", n) is not None for n in names) == n_configs
    assert f"robal-{__version__}.dist-info/licenses/LICENSE" in names
    assert "robal/zoo_index.json" in names  # the model zoo's index (robal/zoo.py)
    assert "License-Expression: Apache-2.0" in metadata and "Description-Content-Type: text/markdown" in metadata
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    for f in ("LICENSE", "README.md", "CHANGELOG.md", "CITATION.cff", "src/robal/configs/digits_lt/pgd_at.yaml"):
        assert f"robal-{__version__}/{f}" in members

    # a plain virtual environment outside the repository: torch first (the build for this machine), then the wheel
    _run([sys.executable, "-m", "venv", venv], work, env)
    py, robal = venv / "bin" / "python", venv / "bin" / "robal"
    _run([py, "-m", "pip", "install", "--quiet", os.environ.get("ROBAL_PACKAGING_TORCH", "torch==2.13.0")],
         work, env)
    _run([py, "-m", "pip", "install", "--quiet", wheel], work, env)
    where = _run([py, "-c", "import robal; print(robal.__file__)"], work, env).strip()
    assert Path(where).is_relative_to(venv), f"robal imported from {where}, not from the installed wheel"

    assert _run([robal, "--version"], work, env).strip() == f"robal {__version__}"
    assert "cifar10_lt/robal_n" in _run([robal, "zoo"], work, env)  # the packaged index, no repository needed
    out = _run([robal, "train", "digits_lt/pgd_at", "--dry-run"], work, env)
    assert "class counts (486 images): [120, 92, 71, 55, 43, 33, 25, 20, 15, 12]" in out
    # a CIFAR config by name: its base chain comes from the package, the data from --set data.path
    _tiny_cifar_npz(work / "tiny.npz")
    out = _run([robal, "train", "cifar10_lt/robal_n.yaml", "--dry-run", "--set", "data.path=tiny.npz"], work, env)
    assert "name: cifar10_lt_robal_n" in out and "class counts (" in out
    missing = subprocess.run([robal, "train", "cifar10_lt/robal_n", "--dry-run"], cwd=work, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "--set data.path=PATH" in missing.stderr

    out = _run([robal, "demo", "--epochs", "1"], work, env)
    assert "RoBal-N: clean" in out and "PGD-AT: clean" in out

    _run([robal, "train", "digits_lt/robal_n", "--out", "run", "--quiet", "--set", "train.epochs=1",
          "--set", "train.lr_milestones=[]"], work, env)
    _run([robal, "eval", "run", "--attacks", "clean,pgd20", "--checks", "none"], work, env)
    assert (work / "run" / "eval.json").is_file()
    check = ("import json, torch, robal\n"
             "from robal.config import load_config\n"
             "from robal.data import prepare_data\n"
             "m = robal.load_model('run')\n"
             "d = prepare_data(load_config('digits_lt/robal_n').data)\n"
             "x = torch.from_numpy(d.x_test).permute(0, 3, 1, 2).float() / 255  # [0, 1] NCHW\n"
             "with torch.no_grad():\n"
             "    z = m(x)\n"
             "acc = 100 * (z.argmax(1).numpy() == d.y_test).mean()\n"
             "evaluated = json.load(open('run/eval.json'))['attacks']['clean']['accuracy']  # robal eval's\n"
             "assert z.shape == (len(x), 10) and not m.training, (z.shape, m.training)\n"
             "assert abs(acc - evaluated) < 0.5, (acc, evaluated)\n"
             "print('loaded', type(m).__name__, tuple(z.shape), f'clean accuracy {acc:.2f}')\n")
    assert "loaded" in _run([py, "-c", check], work, env)
    print(f"packaging test: {time.monotonic() - started:.0f} s")
