"""The model zoo: trained checkpoints by name (`zoo:DATA/ROW`), fetched, verified and cached.

    robal.load_model("zoo:cifar10_lt/robal_n")     # any place robal takes a checkpoint takes zoo:NAME
    robal eval zoo:cifar10_lt/robal_n --json out.json ...
    robal zoo                                      # the table: name, method, data, results and their JSONs
    python -m robal.zoo --write-index              # regenerate zoo_index.json from docs/results

The index (`zoo_index.json`, packaged beside this file) maps each name to the checkpoint's file, URL, sha256 and
size, the packaged config it was trained from, and its results, each number copied by `build_index` from a
committed eval JSON (docs/results/NAME.eval_*.json) together with that JSON's name: no number is typed in, and
tests/test_zoo.py fails when the index and docs/results disagree.

A name resolves to a local file, always checked against the index's sha256 before it is used:
1. the repository's own copy, docs/results/models/FILE (beside the package in a clone or editable install, or
   under the working directory), when its sha256 matches;
2. the cache, `$ROBAL_HOME/zoo/DATA/ROW.pt` (ROBAL_HOME defaults to ~/.cache/robal);
3. else it is downloaded from the URL into the cache through a temporary file; a download whose size or sha256
   differs from the index is refused and removed.
`$ROBAL_ZOO_INDEX` names another index file (a private zoo; the tests use one with file:// URLs).

The URLs point at https://github.com/robal-dev/robal, a placeholder address until the repository is public
(as in the README and pyproject.toml); until then the repository's own files serve the zoo.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from .train.checkpoint import CheckpointError

FORMAT = "robal-zoo/1"
PREFIX = "zoo:"
INDEX = Path(__file__).with_name("zoo_index.json")
# placeholder remote (the repository is not public yet; see README "Model zoo, TensorBoard, safetensors")
REMOTE = "https://github.com/robal-dev/robal/raw/main/docs/results/models/"
REPO_ROOT = Path(__file__).resolve().parents[2]  # src/robal/zoo.py -> the repository, in a clone
MODELS_SUBDIR = Path("docs/results/models")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*/[a-z0-9][a-z0-9_.-]*$")
ENTRY_KEYS = ("file", "url", "sha256", "size")
# the numbers a zoo entry carries, in table order; AA is standard AutoAttack, AA-paper APGD-CE + APGD-T
ATTACKS = {"clean": "clean", "pgd20": "PGD-20", "aa-paper": "AA-paper", "aa": "AA"}
# among eval JSONs with the same number of test images, the one taken first
PREFERRED = ("eval_full", "eval_aa", "eval_clean_10k", "eval_1000", "eval_300")
CHUNK = 1 << 20


class ZooError(CheckpointError):
    """An unknown zoo name, a bad index, or a download that failed or did not match; the message says which."""


# ------------------------------------------------------------------ index

def index_path() -> Path:
    return Path(os.environ["ROBAL_ZOO_INDEX"]) if os.environ.get("ROBAL_ZOO_INDEX") else INDEX


def load_index(path: str | Path | None = None) -> dict:
    """The index's models, checked: {name: entry}."""
    path = Path(path) if path is not None else index_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ZooError(f"zoo index {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ZooError(f"zoo index {path} cannot be read as JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("models"), dict):
        raise ZooError(f"zoo index {path} is not a robal zoo index (expected a mapping with format '{FORMAT}' "
                       f"and models)")
    for name, entry in data["models"].items():
        if not NAME_RE.match(name):
            raise ZooError(f"zoo index {path}: model name '{name}' is not DATA/ROW (lower-case letters, digits, "
                           f"'_', '-', '.')")
        missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ZooError(f"zoo index {path}: models.{name} lacks {', '.join(missing)}")
        if Path(entry["file"]).name != entry["file"]:
            raise ZooError(f"zoo index {path}: models.{name}.file must be a file name, got {entry['file']!r}")
    return data["models"]


def entry(name: str, index: dict | None = None) -> dict:
    models = load_index() if index is None else index
    if name not in models:
        import difflib

        close = difflib.get_close_matches(name, list(models), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ZooError(f"zoo:{name} is not in the model zoo ({index_path()}){hint} Known: {', '.join(models)} "
                       f"(`robal zoo` lists them)")
    return models[name]


# ------------------------------------------------------------------ fetching

def cache_dir() -> Path:
    return Path(os.environ.get("ROBAL_HOME") or Path.home() / ".cache" / "robal") / "zoo"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, e: dict) -> bool:
    return path.is_file() and path.stat().st_size == e["size"] and sha256_of(path) == e["sha256"]


def repository_copies(file: str) -> list[Path]:
    """Where the repository's own copy of a zoo file may be: beside the package, then under the working dir."""
    places = [REPO_ROOT / MODELS_SUBDIR / file, Path.cwd() / MODELS_SUBDIR / file]
    return list(dict.fromkeys(p.resolve() for p in places))


def fetch(name: str, progress: bool = True) -> Path:
    """The verified local checkpoint file of zoo model `name` (downloaded into the cache if need be)."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    e = entry(name)
    for local in repository_copies(e["file"]):
        if _verified(local, e):
            return local
        if local.is_file() and progress:
            print(f"warning: {local} differs from the zoo index entry of {name} (sha256); not used "
                  f"(regenerate the index with `python -m robal.zoo --write-index` if it was retrained)",
                  file=sys.stderr)
    cached = cache_dir() / f"{name}.pt"
    if _verified(cached, e):
        return cached
    if cached.exists():
        print(f"warning: cached {cached} does not match the zoo index (sha256); downloading it again",
              file=sys.stderr)
    return download(e["url"], cached, e["sha256"], e["size"], name, progress)


def download(url: str, dest: Path, sha256: str, size: int, name: str = "", progress: bool = True) -> Path:
    """Download `url` to `dest` through a temporary file beside it; kept only if its size and sha256 match."""
    import urllib.error
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    if progress:
        print(f"downloading zoo:{name} from {url} ({size / 2**20:.1f} MiB) to {dest}", file=sys.stderr)
    h, got = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            for block in iter(lambda: response.read(CHUNK), b""):
                got += len(block)
                if got > size:
                    break  # more than the index says: refused below without reading the rest
                h.update(block)
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        if got != size or h.hexdigest() != sha256:
            what = (f"{got if got <= size else 'more than ' + str(size)} bytes, expected {size}" if got != size
                    else f"sha256 {h.hexdigest()}, expected {sha256}")
            raise ZooError(f"the download of zoo:{name} from {url} does not match the zoo index ({what}): "
                           f"refused and removed")
        os.replace(tmp, dest)
    except ZooError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:
        copies = " or ".join(str(p) for p in repository_copies(dest.name))
        raise ZooError(f"zoo:{name}: downloading {url} failed ({err}); no verified copy was found in {copies} "
                       f"or in the cache {dest}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------ the table

def _cell(result: dict | None) -> str:
    return "-" if not result else f"{result['accuracy']:.2f} ({result['n_test']})"


def _sources(results: dict) -> str:
    by_file: dict[str, list[str]] = {}
    for attack, label in ATTACKS.items():
        if attack in results:
            by_file.setdefault(results[attack]["file"], []).append(label)
    return "; ".join(f"{', '.join(labels)}: {file}" for file, labels in by_file.items())


def zoo_rows(index: dict | None = None) -> list[dict]:
    models = load_index() if index is None else index
    return [{"name": name, "method": e.get("method", "?"), "data": e.get("data", "?"),
             **{label: _cell(e.get("results", {}).get(attack)) for attack, label in ATTACKS.items()},
             "results from": _sources(e.get("results", {}))} for name, e in models.items()]


def format_table(index: dict | None = None) -> str:
    rows = zoo_rows(index)
    if not rows:
        return f"the model zoo ({index_path()}) is empty"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip()  # noqa: E731
    out = [line({c: c for c in cols}), line({c: "-" * width[c] for c in cols}), *map(line, rows)]
    out.append(f"\naccuracy in % (test images); AA: standard AutoAttack, AA-paper: APGD-CE + APGD-T; the numbers "
               f"are copied from the named eval JSONs (docs/results) into {index_path().name}.\nload one with "
               f"robal.load_model('zoo:NAME'), evaluate it with `robal eval zoo:NAME --json OUT.json`.")
    return "\n".join(out)


# ------------------------------------------------------------------ regenerating the index

def _data_label(cfg) -> str:
    d = cfg.data
    base = Path(d.path).stem if d.source == "npz" and d.path else d.source
    if d.subset == "long_tailed":
        return f"{base}-LT rho {d.imbalance_ratio:g}" + ("" if d.profile == "exp" else f" ({d.profile})")
    if d.subset == "matched_balanced":
        return f"{base} balanced, LT size (rho {d.imbalance_ratio:g})"
    return f"{base} {d.subset}"


def _method_label(cfg) -> str:
    t, m = cfg.train, cfg.model
    parts = [t.framework]
    parts += [x for x, default in ((t.loss, "ce"), (m.head, "linear"), (t.sampler, "random"),
                                   (t.weighting, "none")) if x != default]
    if t.init_from:
        parts.append("fine-tune")
    post = [i["name"] for i in cfg.inference if i.get("name") != "scale"]
    return ", ".join(parts) + (f"; inference {'+'.join(post)}" if post else "")


def _same_method(a, b) -> bool:
    """The fields that make a config the training recipe of a checkpoint (not paths or bookkeeping)."""
    key = lambda c: (c.model, c.train.framework, c.train.framework_args, c.train.loss, c.train.loss_args,  # noqa
                     c.train.sampler, c.train.weighting, bool(c.train.init_from), c.data.subset,
                     c.data.imbalance_ratio, c.inference)
    return key(a) == key(b)


def packaged_config(stem: str, cfg) -> str | None:
    """The packaged config (DATA/ROW) a checkpoint was trained from: DATA/STEM.yaml, or DATA/BASE.yaml for
    STEM = BASE_seedN, whose recipe matches the checkpoint's."""
    from .config import load_config

    root = Path(__file__).with_name("configs")
    for row in dict.fromkeys((stem, re.sub(r"_seed\d+$", "", stem))):
        for path in sorted(root.glob(f"*/{row}.yaml")):
            try:
                packaged = load_config(path, validate_files=False)
            except Exception:  # noqa: BLE001 (a config that does not load is no match)
                continue
            if _same_method(packaged, cfg):
                return f"{path.parent.name}/{row}"
    return None


def _results(stem: str, results_dir: Path, spec: dict) -> dict:
    """Per attack: the number from the eval JSON of this checkpoint with the most test images."""
    found = {}
    files = sorted(results_dir.glob(f"{stem}.eval_*.json"),
                   key=lambda p: (PREFERRED.index(p.stem.split(".")[-1]) if p.stem.split(".")[-1] in PREFERRED
                                  else len(PREFERRED), p.name))
    for path in files:
        data = json.loads(path.read_text())
        ckpt = Path(str(data.get("checkpoint", "")))
        if ckpt.parent.name != stem and ckpt.stem != stem:
            print(f"warning: {path.name} evaluated {ckpt}, not {stem}: not used", file=sys.stderr)
            continue
        if data.get("inference_overridden") or data.get("class_counts") != spec["class_counts"] or \
                data.get("inference", spec["inference"]) != spec["inference"]:
            print(f"warning: {path.name}: other inference adjustments or class counts than {stem}.pt: not used",
                  file=sys.stderr)
            continue
        for attack in ATTACKS:
            result = data.get("attacks", {}).get(attack)
            if result is None:
                continue
            if attack not in found or data["n_test"] > found[attack]["n_test"]:
                found[attack] = {"accuracy": result["accuracy"], "n_test": data["n_test"], "file": path.name}
    return {a: found[a] for a in ATTACKS if a in found}


def build_index(results_dir: str | Path | None = None, remote: str = REMOTE) -> dict:
    """The index for the checkpoints in RESULTS/models, each number read from RESULTS/*.eval_*.json."""
    from .config import Config, from_dict
    from .train.checkpoint import read_checkpoint

    results_dir = Path(results_dir) if results_dir is not None else REPO_ROOT / "docs" / "results"
    models_dir = results_dir / "models"
    checkpoints = sorted(models_dir.glob("*.pt"))
    if not checkpoints:
        raise ZooError(f"{models_dir} holds no checkpoint (*.pt)")
    models = {}
    for path in checkpoints:
        ckpt = read_checkpoint(path)
        config = ckpt["meta"].get("config")
        if not isinstance(config, dict):
            raise ZooError(f"{path}: its meta holds no training config, so the zoo cannot say its data or method")
        cfg = from_dict(Config, config)
        row = packaged_config(path.stem, cfg)
        data = row.split("/")[0] if row else f"{Path(cfg.data.path or cfg.data.source).stem}_lt"
        name = f"{data}/{path.stem}"
        models[name] = {
            "file": path.name, "url": remote + path.name, "sha256": sha256_of(path), "size": path.stat().st_size,
            "config": row, "seed": cfg.seed, "epochs": ckpt["meta"].get("epoch"),
            "method": _method_label(cfg), "data": _data_label(cfg),
            "backbone": " ".join([cfg.model.backbone, *(f"{k}={v}" for k, v in cfg.model.backbone_args.items())]),
            "results": _results(path.stem, results_dir, ckpt["spec"]),
        }
    return {"format": FORMAT,
            "note": "generated by `python -m robal.zoo --write-index` from docs/results; the URLs use the placeholder "
                    "address github.com/robal-dev/robal until the repository is public",
            "models": models}


def write_index(results_dir: str | Path | None = None, out: str | Path = INDEX) -> Path:
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(build_index(results_dir), indent=1) + "\n")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m robal.zoo", description="print the model zoo, or regenerate its "
                                                                        "index from docs/results")
    p.add_argument("--write-index", action="store_true", help=f"regenerate {INDEX}")
    p.add_argument("--results", default=None, help="the results folder (default: docs/results of the repository)")
    args = p.parse_args(argv)
    if args.write_index:
        print(f"wrote {write_index(args.results)}")
    else:
        print(format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
