"""The run directory: the files robal writes there, replacing a run without losing anything else, and the lock
that keeps two processes from writing one run.

`--overwrite` replaces only a robal run (a `config.yaml` holding a robal config) whose every entry is one robal
writes (RUN_FILES). The old run's files are first moved into `RUN/.robal-replaced/` and deleted only once the new
run has written its first checkpoint, so a new run that fails early leaves the old one recoverable.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

# every name robal writes in a run directory (train, eval, tune-tau, the lock, atomic-write temporaries,
# train.tensorboard's event folder)
RUN_FILES = ("config.yaml", "log.jsonl", "model.pt", "epoch_*.pt", "eval*.json", "eval*.md", "eval*.png",
             "eval*.partial", ".eval*", "tune_tau.json", ".lock", ".*.tmp*", "tensorboard")
REPLACED = ".robal-replaced"
LOCK = ".lock"


class RunDirError(FileExistsError):
    """A run directory that cannot be used as asked; the message names it and what is there."""


def is_robal_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)


def is_run_dir(path: Path) -> bool:
    """A directory whose config.yaml holds a robal config (robal writes the resolved config first)."""
    config = Path(path) / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and {"model", "train"} <= data.keys()


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def contents(path: Path) -> list[str]:
    """The entries of `path` other than the lock and the replaced run kept aside."""
    return [p.name for p in Path(path).iterdir() if p.name not in (LOCK, REPLACED)]


def check_replaceable(path: Path) -> None:
    """Raise unless `path` is a robal run whose entries robal wrote, so that replacing it removes nothing else."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"--out {path} is not a directory")
    if not is_run_dir(path):
        raise RunDirError(f"{path} is not a robal run directory (no robal config.yaml), and --overwrite "
                          f"replaces only those; it holds {_listing(contents(path))}. Nothing was removed: choose "
                          f"another --out")
    foreign = [name for name in contents(path) if not is_robal_file(name)]
    if foreign:
        raise RunDirError(f"{path} is a robal run but also holds files robal did not write: {_listing(foreign)}. "
                          f"Nothing was removed: move them away or choose another --out")


def set_aside(path: Path) -> Path:
    """Move the run in `path` into `path/.robal-replaced` (kept until the new run's first checkpoint)."""
    path = Path(path)
    aside = path / REPLACED
    keep_older = aside.exists()  # an earlier replacement never reached its first checkpoint: keep the run before it
    aside.mkdir(exist_ok=True)
    for name in contents(path):
        if keep_older:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        else:
            os.replace(path / name, aside / name)
    return aside


def discard_replaced(path: Path) -> None:
    """The new run has a checkpoint: the run it replaced goes."""
    aside = Path(path) / REPLACED
    if aside.exists():
        shutil.rmtree(aside)


def inside(child: str | Path, parent: str | Path) -> bool:
    child, parent = Path(child).resolve(), Path(parent).resolve()
    return child == parent or parent in child.parents


class RunLock:
    """An exclusive advisory lock (flock) on RUN/.lock, held while a process writes the run. The kernel drops it
    when the process dies, so a lock left by a killed run never blocks its resume."""

    def __init__(self, path: Path):
        self.path = Path(path) / LOCK
        self._file = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs are not protected against a second writer
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"run directory {self.path.parent} is in use by {holder}; wait for that run to end "
                              f"or stop it (a killed run's lock is released by the system)") from None
        f.seek(0)
        f.truncate()
        f.write(f"robal pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None
