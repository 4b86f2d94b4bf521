"""Self-contained checkpoints, written atomically and verified on load (weights_only=True)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

FORMAT = "robal-checkpoint/1"
REQUIRED = ("format", "spec", "state_dict", "meta")


class CheckpointError(ValueError):
    """A missing, truncated, corrupt or foreign checkpoint; the message names the file."""


def atomic_save(obj: dict, path: str | Path) -> Path:
    """Write to a temporary file beside `path`, flush to disk, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # a full disk surfaces as either, depending on where torch.save is
        raise CheckpointError(f"writing {path} failed ({err}); {path.name} was not replaced (its previous "
                              f"version, if any, is intact)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, empty file, pickle with forbidden globals, ...
        reason = str(err).strip().split("\n")[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated, corrupt or not a robal "
                              f"checkpoint): {type(err).__name__}: {reason}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a robal checkpoint (expected format '{FORMAT}')")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    wrong = [k for k in ("spec", "state_dict", "meta") if not isinstance(obj[k], dict)]
    if wrong:
        raise CheckpointError(f"checkpoint {path}: {', '.join(wrong)} should be a mapping")
    return obj


def model_checkpoint(model, meta: dict) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "spec": model.spec, "state_dict": state, "meta": meta}


def rng_state(loader_generator: torch.Generator | None = None) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": random.getstate(),
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loader_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Epoch checkpoints of a run, oldest first."""
    return sorted(Path(run_dir).glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def latest_good_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest epoch checkpoint that reads back; corrupt newer ones are reported, older good ones used."""
    for path in reversed(checkpoint_paths(run_dir)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as err:
            print(f"warning: skipping {err}")
    return None


def prune(run_dir: Path, keep_last: int) -> None:
    for path in checkpoint_paths(run_dir)[:-keep_last]:
        path.unlink(missing_ok=True)


def resolve_model_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its final model, else its newest epoch checkpoint), or zoo:NAME."""
    if str(path).startswith("zoo:"):  # the model zoo: a verified local file, downloaded if need be (robal/zoo.py)
        from ..zoo import fetch

        return fetch(str(path))
    path = Path(path)
    if path.is_dir():
        if (path / "model.pt").is_file():
            return path / "model.pt"
        epochs = checkpoint_paths(path)
        if not epochs:
            raise CheckpointError(f"run directory {path} holds no model.pt and no epoch_*.pt checkpoint")
        return epochs[-1]
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """The eval-mode model a checkpoint (run directory, zoo:NAME, or `robal export` folder) describes,
    inference-time adjustments included."""
    from ..export import is_export_dir, load_export
    from ..models import build_model

    if is_export_dir(path):  # DIR/model.safetensors + DIR/model.json: read without pickle (robal/export.py)
        return load_export(path, device)
    path = resolve_model_path(path)
    ckpt = read_checkpoint(path)
    try:
        model = build_model(ckpt["spec"])
        model.load_state_dict(ckpt["state_dict"])
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its model spec: {str(err)[:300]}") from None
    return model.to(device).eval()
