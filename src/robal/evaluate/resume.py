"""Resumable evaluation: each (attack, batch) unit's predictions are stored as soon as they are computed, in a
state directory beside the output (`robal eval` uses `OUT.json.partial/`), so a killed evaluation rerun with the
same arguments continues where it stopped and gives the same result as an uninterrupted one.

The state is keyed by a fingerprint of everything that determines the predictions: the attacks, eps, step size,
batch size, seed, the attacked images and labels (a digest of the tensors), the model's weights (a digest of its
`state_dict`, when it has one), the device type, the versions of torch, pyautoattack and robal, and whatever
the caller adds (`robal eval`: the checkpoint's model spec, inference adjustments included; not its path, so a
run directory moved or checked out elsewhere resumes its evaluation). A state made with another
fingerprint is discarded, and the evaluation starts afresh and says so. Every file is written to a temporary
name and moved into place (os.replace), so a kill never leaves a half-written unit. The caller removes the state
(`clear_state`) once its result is written.

Layout: `STATE/fingerprint.json`, `STATE/units/<attack, %-quoted>/<batch:06d>.json` holding
`{"predictions": [...], "seconds": float}`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import torch

FINGERPRINT = "fingerprint.json"
UNITS = "units"


def state_dir_for(json_path: str | Path) -> Path:
    """Where `robal eval --json OUT.json` keeps its state: `OUT.json.partial/`."""
    json_path = Path(json_path)
    return json_path.with_name(json_path.name + ".partial")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def model_digest(model) -> str | None:
    """sha256 of the model's state_dict (names, dtypes, shapes, values); None for a callable without one."""
    state_dict = getattr(model, "state_dict", None)
    if not callable(state_dict):
        return None
    h = hashlib.sha256()
    for key, value in sorted(state_dict().items()):
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            _update(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def evaluation_fingerprint(model, x: torch.Tensor, y: torch.Tensor, attacks: list[str], eps: float,
                           step_size: float, batch_size: int, seed: int, device, extra: dict | None = None) -> dict:
    """What determines an evaluation's predictions (see the module docstring); JSON-able."""
    from importlib.metadata import version

    from .. import __version__

    return {"attacks": list(attacks), "eps": eps, "step_size": step_size, "batch_size": batch_size, "seed": seed,
            "n_test": len(x), "images": tensors_digest(x, y), "model": model_digest(model),
            "model_type": f"{type(model).__module__}.{type(model).__qualname__}",
            "device": torch.device(device).type,
            "versions": {"robal": __version__, "torch": torch.__version__, "pyautoattack": version("pyautoattack")},
            "extra": extra or {}}


def _normalised(fingerprint: dict) -> dict:
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


class EvalState:
    """The stored units of one evaluation. `open` it; `load` / `save` units; `clear_state` when done."""

    def __init__(self, directory: Path, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.reused: dict[str, float] = {}  # attack -> seconds its reused units took when they were computed

    @classmethod
    def open(cls, directory: str | Path, fingerprint: dict, log=print) -> "EvalState":
        """The state in `directory` if it was made with this fingerprint, else a fresh one (the old discarded,
        with a message naming what changed). `log`: where the messages go (None: nowhere)."""
        log = log or (lambda *_: None)
        directory, fingerprint = Path(directory), _normalised(fingerprint)
        path = directory / FINGERPRINT
        stored = None
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                stored = {"unreadable": True}
        if stored == fingerprint:
            n = sum(1 for _ in (directory / UNITS).glob("*/*.json")) if (directory / UNITS).is_dir() else 0
            log(f"resuming the evaluation stored in {directory}: {n} attack batches done")
            return cls(directory, fingerprint)
        if stored is not None or (directory / UNITS).exists():
            changed = sorted(k for k in set(stored or {}) | set(fingerprint)
                             if (stored or {}).get(k) != fingerprint.get(k))
            log(f"starting afresh: the evaluation state in {directory} was made with other "
                f"{', '.join(changed) or 'settings'}; discarding it")
            clear_state(directory)
        try:
            (directory / UNITS).mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(fingerprint, indent=1, sort_keys=True))
        except OSError as err:  # same type, naming what the directory is for
            raise type(err)(err.errno, f"cannot keep the evaluation state (what lets a killed evaluation resume) "
                                       f"in {directory}: {err.strerror}") from err
        return cls(directory, fingerprint)

    def _unit(self, attack: str, batch: int) -> Path:
        return self.directory / UNITS / quote(attack, safe="") / f"{batch:06d}.json"

    def load(self, attack: str, batch: int, n: int) -> torch.Tensor | None:
        """The stored predictions of this attack on this batch (of n images), or None when not stored."""
        path = self._unit(attack, batch)
        if not path.is_file():
            return None
        try:
            unit = json.loads(path.read_text())
            preds = torch.tensor(unit["predictions"], dtype=torch.long)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # damaged by hand: computed again
        if preds.shape != (n,):
            return None
        self.reused[attack] = self.reused.get(attack, 0.0) + float(unit.get("seconds", 0.0))
        return preds

    def save(self, attack: str, batch: int, preds: torch.Tensor, seconds: float) -> None:
        path = self._unit(attack, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"predictions": preds.tolist(), "seconds": round(seconds, 3)}))


def clear_state(directory: str | Path) -> None:
    """Remove an evaluation state: its units and fingerprint, then the directory if nothing else is in it (files
    that robal did not write are left alone)."""
    directory = Path(directory)
    shutil.rmtree(directory / UNITS, ignore_errors=True)
    (directory / FINGERPRINT).unlink(missing_ok=True)
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass
