"""`robal export RUN_OR_CKPT --format safetensors --out DIR`: a model to share without pickle.

DIR/model.safetensors holds the weights (the state_dict, tensors only); DIR/model.json holds what rebuilds the
model: the model spec (backbone, head, normalisation, class counts and names, and the inference-time adjustments
under spec.inference), the training meta (its config included), the weights' sha256 and the source checkpoint.
`robal.load_model(DIR)` reads both with safetensors and json alone (no torch.load, no pickle) and returns the
same eval-mode model, with the same logits, as `robal.load_model(CHECKPOINT)`.

safetensors is an optional extra: `pip install 'robal[safetensors]'`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ._version import __version__
from .train.checkpoint import CheckpointError, read_checkpoint, resolve_model_path

FORMAT = "robal-export/1"
WEIGHTS = "model.safetensors"
INFO = "model.json"
EXTRA = "pip install 'robal[safetensors]'"
FORMATS = ("safetensors",)


def _safetensors(what: str):
    try:
        import safetensors.torch as st
    except ImportError:
        raise CheckpointError(f"{what} needs the safetensors package, which is not installed: {EXTRA} "
                              f"(or pip install safetensors)") from None
    return st


def is_export_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / WEIGHTS).is_file() or (path / INFO).is_file()) and \
        not (path / "model.pt").is_file()


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(f"writing {path} failed ({err}); {path.name} was not replaced") from None
    finally:
        tmp.unlink(missing_ok=True)


def export_model(target, out_dir, fmt: str = "safetensors", overwrite: bool = False) -> tuple[Path, Path]:
    """Write OUT/model.safetensors and OUT/model.json for a run directory, checkpoint or zoo:NAME."""
    from .train.checkpoint import load_model

    if fmt not in FORMATS:
        raise CheckpointError(f"--format {fmt}: known formats: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    weights, info = out_dir / WEIGHTS, out_dir / INFO
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file; give a directory for {WEIGHTS} and {INFO}")
    if weights.exists() and not overwrite:
        raise FileExistsError(f"{weights} already exists; pass --overwrite to replace it")
    st = _safetensors(f"robal export --format {fmt}")
    path = resolve_model_path(target)
    ckpt = read_checkpoint(path)
    load_model(path)  # the checkpoint builds its model (else CheckpointError naming it): nothing unloadable goes out
    # own storage per tensor (safetensors refuses shared or strided tensors)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["state_dict"].items()}
    # one metadata key: safetensors writes a metadata mapping in no fixed order, and an export of the same
    # weights should be the same bytes (robal's own format tag is in model.json)
    blob = st.save(tensors, metadata={"format": "pt"})
    try:
        meta = json.loads(json.dumps(ckpt["meta"], default=_jsonable))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: its meta cannot be written as JSON ({err})") from None
    description = {
        "format": FORMAT, "weights": WEIGHTS, "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "spec": ckpt["spec"], "meta": meta,
        "source": {"checkpoint": str(path), "robal_version": __version__},
        "load": "robal.load_model(DIR); spec.inference holds the inference-time adjustments, spec.class_counts "
                "the training images per class",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(weights, blob)
    _write_atomic(info, (json.dumps(description, indent=1) + "\n").encode())
    return weights, info


def read_info(path) -> dict:
    path = Path(path)
    info_file = path / INFO
    try:
        info = json.loads(info_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} holds {WEIGHTS} but no {INFO} (the model spec): re-export it with "
                              f"`robal export CHECKPOINT --format safetensors --out {path} --overwrite`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{info_file} cannot be read as JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{info_file} is not a robal export (expected format '{FORMAT}')")
    if not isinstance(info.get("spec"), dict):
        raise CheckpointError(f"{info_file}: spec should be a mapping (the model spec)")
    return info


def load_export(path, device="cpu"):
    """The eval-mode model of a `robal export` folder, read with safetensors and json only."""
    from .models import build_model

    path = Path(path)
    info = read_info(path)
    weights = path / info.get("weights", WEIGHTS)
    st = _safetensors(f"reading {weights}")
    if not weights.is_file():
        raise CheckpointError(f"{path} holds {INFO} but not its weights {weights.name}")
    blob = weights.read_bytes()
    if info.get("weights_sha256") and hashlib.sha256(blob).hexdigest() != info["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 in {path / INFO} (changed, truncated or from "
                              f"another export)")
    try:
        state = st.load(blob)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types)
        raise CheckpointError(f"{weights} cannot be read as safetensors ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    try:
        model = build_model(info["spec"])
        model.load_state_dict(state)
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{weights} does not match the model spec in {path / INFO}: {str(err)[:300]}") from None
    return model.to(device).eval()
