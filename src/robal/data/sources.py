"""Where images come from: CIFAR-10/100 in the official python format, .npz files and scikit-learn digits.

Every source returns an `ImageDataset` of uint8 images in (N, H, W, C) order and int64 labels, and every
problem with its input is a `DataError` whose message names the file and what was expected there.

    load_source("cifar10", path="data")           # data/cifar-10-batches-py/ or data/cifar-10-python.tar.gz
    load_source("npz", path="../shared/data/cifar10.npz")
    load_source("digits", test_per_class=50, seed=0)

CIFAR `path` may be a directory holding the extracted folder (`cifar-10-batches-py/`, `cifar-100-python/`),
a directory holding the `.tar.gz`, the `.tar.gz` itself, or the extracted folder itself. The extracted folder
wins when both are present. An archive is read in one streaming pass, without extracting anything to disk.
With `download=True` and nothing found, the archive is downloaded into the directory and checked against its
md5 before it is given its final name.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from robal.registry import did_you_mean

log = logging.getLogger(__name__)


@dataclass
class ImageDataset:
    x_train: np.ndarray = field(repr=False)  # uint8 (N, H, W, C), RGB for C=3
    y_train: np.ndarray = field(repr=False)  # int64 (N,)
    x_test: np.ndarray = field(repr=False)   # uint8 (M, H, W, C)
    y_test: np.ndarray = field(repr=False)   # int64 (M,)
    class_names: list[str]
    name: str
    # image files the arrays were decoded from (folder sources), relative to `root`; None for array sources
    train_files: list[str] | None = field(default=None, repr=False)
    test_files: list[str] | None = field(default=None, repr=False)
    root: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class DataError(ValueError):
    """Bad or missing input data; the message names the path and what was expected."""


SOURCES: dict[str, Callable[..., ImageDataset]] = {}
ROOT_SOURCES: set[str] = set()  # sources whose `path` is the dataset folder `data.root` (not `data.path`)


def register_source(name: str, reads_root: bool = False):
    """Decorator: `@register_source("cifar10")` makes `load_source("cifar10", ...)` call the function; with
    reads_root=True its `path` comes from `data.root` (a folder of images) instead of `data.path`."""
    def add(fn):
        if name in SOURCES:
            raise KeyError(f"data source '{name}' is registered twice")
        SOURCES[name] = fn
        if reads_root:
            ROOT_SOURCES.add(name)
        return fn
    return add


def load_source(name: str, path: str | None = None, download: bool = False, **options) -> ImageDataset:
    """Load the dataset of a registered source; `options` are that source's own keyword arguments."""
    if name not in SOURCES:
        raise DataError(f"unknown data source '{name}'{did_you_mean(name, SOURCES)}; "
                        f"known: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    allowed = [p for p in inspect.signature(source).parameters if p not in ("path", "download")]
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise DataError(f"data source '{name}' takes no option {', '.join(map(repr, unknown))}; "
                        f"it takes: {', '.join(allowed) or 'nothing besides path and download'}")
    return source(path=path, download=download, **options)


# ---------------------------------------------------------------- CIFAR (official python pickles)

@dataclass(frozen=True)
class CifarSpec:
    name: str
    title: str
    folder: str              # folder inside the archive
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes         # key of the labels in each batch
    names_key: bytes         # key of the class names in the meta file
    num_classes: int

    def describe(self) -> str:
        return (f"the official {self.title} python version: a directory holding {self.folder}/ "
                f"({', '.join(self.train_files + self.test_files + (self.meta_file,))}) or {self.archive}, "
                f"or the path of {self.archive} itself")


CIFAR10 = CifarSpec(
    name="cifar10", title="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
    meta_file="batches.meta", label_key=b"labels", names_key=b"label_names", num_classes=10)

CIFAR100 = CifarSpec(
    name="cifar100", title="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files=("train",), test_files=("test",),
    meta_file="meta", label_key=b"fine_labels", names_key=b"fine_label_names", num_classes=100)


@register_source("cifar10")
def load_cifar10(path: str | None = None, download: bool = False) -> ImageDataset:
    """CIFAR-10 from the official python pickles (see the module docstring for what `path` may be)."""
    return _load_cifar(CIFAR10, path, download)


@register_source("cifar100")
def load_cifar100(path: str | None = None, download: bool = False) -> ImageDataset:
    """CIFAR-100 with its 100 fine labels, from the official python pickles."""
    return _load_cifar(CIFAR100, path, download)


def _load_cifar(spec: CifarSpec, path, download: bool) -> ImageDataset:
    if path is None:
        raise DataError(f"data source '{spec.name}' needs a path: {spec.describe()}")
    root = Path(path)
    wanted = spec.train_files + spec.test_files + (spec.meta_file,)
    if root.is_file():
        return _cifar_dataset(spec, _read_archive(root, spec.folder, wanted))
    if (root / spec.folder).is_dir():
        return _cifar_dataset(spec, _read_folder(root / spec.folder, wanted))
    archive = root / spec.archive
    if archive.is_file():
        return _cifar_dataset(spec, _read_archive(archive, spec.folder, wanted))
    if (root / spec.meta_file).is_file():  # `path` is the extracted folder itself
        return _cifar_dataset(spec, _read_folder(root, wanted))
    if not download:
        raise DataError(f"{root}: no {spec.title} data found; expected {spec.describe()}. "
                        f"Set `download: true` to fetch it from {spec.url}")
    if root.name == spec.archive:  # a path naming the archive that is not there yet
        archive = root
    download_file(spec.url, archive, spec.md5)
    return _cifar_dataset(spec, _read_archive(archive, spec.folder, wanted))


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR pickles hold (dicts, lists, bytes, numbers and numpy arrays): a crafted
    file cannot make unpickling call anything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR file never holds; refused "
                                         f"(a crafted pickle can run code)")
        return super().find_class(module, name)


def _unpickle(f, where: str):
    try:
        return _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated or corrupt pickles fail in many ways (EOFError, UnpicklingError, ...)
        raise DataError(f"{where}: cannot unpickle ({type(e).__name__}: {e}); the file is corrupt or "
                        f"truncated, expected an official CIFAR python pickle") from None


def _read_folder(folder: Path, names: tuple[str, ...]) -> dict[str, tuple[str, object]]:
    """{file name: (where, unpickled object)} for the extracted folder."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; expected all of {', '.join(names)}")
    objects = {}
    for name in names:
        with open(folder / name, "rb") as f:
            objects[name] = (str(folder / name), _unpickle(f, str(folder / name)))
    return objects


def _read_archive(archive: Path, folder: str, names: tuple[str, ...]) -> dict[str, tuple[str, object]]:
    """{file name: (where, unpickled object)} read from the .tar.gz in one pass, nothing extracted."""
    members = {f"{folder}/{name}": name for name in names}
    objects = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = members.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    where = f"{archive} (member {member.name})"
                    objects[name] = (where, _unpickle(tar.extractfile(member), where))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot read as a .tar.gz archive ({e}); expected the official "
                        f"CIFAR python archive") from None
    missing = [member for member, name in members.items() if name not in objects]
    if missing:
        raise DataError(f"{archive}: archive lacks {', '.join(missing)}; expected the official CIFAR python archive")
    return objects


def _batch_arrays(obj, where: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    expected = f"a dict with b'data' (uint8, N x 3072) and b'{label_key.decode()}' (N labels in [0, {num_classes}))"
    if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{where}: found {keys}; expected {expected}")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: b'data' is {data.dtype} {data.shape}; expected {expected}")
    if labels.shape != (len(data),) or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{where}: {len(data)} images but labels of shape {labels.shape} ({labels.dtype}); "
                        f"expected {expected}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: labels span [{labels.min()}, {labels.max()}]; expected {expected}")
    # each row is the R, G and B planes of one image, each plane row-major: CHW -> HWC
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _join_batches(spec: CifarSpec, objects, files) -> tuple[np.ndarray, np.ndarray]:
    parts = [_batch_arrays(obj, where, spec.label_key, spec.num_classes)
             for where, obj in (objects[name] for name in files)]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _class_names(spec: CifarSpec, objects) -> list[str]:
    where, meta = objects[spec.meta_file]
    names = meta.get(spec.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        raise DataError(f"{where}: expected a dict with b'{spec.names_key.decode()}' listing "
                        f"{spec.num_classes} class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _cifar_dataset(spec: CifarSpec, objects) -> ImageDataset:
    class_names = _class_names(spec, objects)
    x_train, y_train = _join_batches(spec, objects, spec.train_files)
    x_test, y_test = _join_batches(spec, objects, spec.test_files)
    return ImageDataset(x_train, y_train, x_test, y_test, class_names, spec.name)


# ---------------------------------------------------------------- downloading

def _fetch_url(url: str, dest: Path) -> None:
    """Write the bytes at `url` into `dest` (the tests replace this function)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str) -> Path:
    """Download `url` to `dest` through a temporary file that is renamed only once its md5 matches."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s to %s", url, dest)
        try:
            _fetch_url(url, tmp)
        except OSError as e:
            raise DataError(f"{dest}: download from {url} failed ({e}); download it by hand and put it "
                            f"there") from None
        actual = _md5(tmp)
        if actual != md5:
            raise DataError(f"{dest}: md5 of the download from {url} is {actual}, expected {md5}; "
                            f"the download was deleted")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------- .npz files

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_EXPECTED = ("an .npz with x_train, x_test (uint8, N x H x W x C with C 1 or 3, or N x H x W), "
                "y_train, y_test (integer labels, one per image) and optional class_names (strings)")


@register_source("npz")
def load_npz(path: str | None = None, download: bool = False) -> ImageDataset:
    """Arrays saved with np.savez; `download` is ignored. Loaded without pickle."""
    if path is None:
        raise DataError(f"data source 'npz' needs a path: {NPZ_EXPECTED}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected {NPZ_EXPECTED}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz (zip) archive; expected {NPZ_EXPECTED}")
    with np.load(path, allow_pickle=False) as npz:
        missing = [key for key in NPZ_KEYS if key not in npz.files]
        if missing:
            raise DataError(f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(npz.files)}); "
                            f"expected {NPZ_EXPECTED}")
        keys = NPZ_KEYS + (("class_names",) if "class_names" in npz.files else ())
        arrays = {key: _npz_array(npz, key, path) for key in keys}
    x_train = _npz_images(arrays["x_train"], path, "x_train")
    x_test = _npz_images(arrays["x_test"], path, "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x_train images are {x_train.shape[1:]} but x_test images are "
                        f"{x_test.shape[1:]}; expected the same H x W x C")
    y_train = _npz_labels(arrays["y_train"], len(x_train), path, "y_train")
    y_test = _npz_labels(arrays["y_test"], len(x_test), path, "y_test")
    if len(y_train) == 0:
        raise DataError(f"{path}: x_train holds no images; expected {NPZ_EXPECTED}")
    class_names = _npz_class_names(arrays.get("class_names"), path, max(y_train.max(), y_test.max(initial=0)))
    for key, labels in (("y_train", y_train), ("y_test", y_test)):
        if labels.size and labels.max() >= len(class_names):
            raise DataError(f"{path}: key {key} has label {labels.max()}; expected labels in "
                            f"[0, {len(class_names)}) to match class_names")
    return ImageDataset(x_train, y_train, x_test, y_test, class_names, path.stem)


def _npz_array(npz, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as e:  # object arrays need pickle
        raise DataError(f"{path}: key {key} cannot be read without pickle ({e}); expected {NPZ_EXPECTED}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # a CRC error, a truncated member
        raise DataError(f"{path}: key {key} is corrupt ({e}); the file is damaged, copy or download it again") from None


def _npz_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(f"{path}: key {key} has dtype {x.dtype}; expected uint8 pixels 0..255")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{path}: key {key} has shape {x.shape}; expected N x H x W x C with C 1 or 3 "
                        f"(channels last), or N x H x W")
    return x


def _npz_labels(y: np.ndarray, n_images: int, path: Path, key: str) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: key {key} is {y.dtype} with shape {y.shape}; expected 1-D integer labels")
    if len(y) != n_images:
        raise DataError(f"{path}: key {key} has {len(y)} labels for {n_images} images; expected one label per image")
    if y.size and y.min() < 0:
        raise DataError(f"{path}: key {key} has label {y.min()}; expected labels >= 0")
    return y.astype(np.int64)


def _npz_class_names(names: np.ndarray | None, path: Path, max_label: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(int(max_label) + 1)]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: key class_names is {names.dtype} with shape {names.shape}; "
                        f"expected a 1-D array of strings")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names.tolist()]


# ---------------------------------------------------------------- scikit-learn digits

@register_source("digits")
def load_digits(path: str | None = None, download: bool = False,
                test_per_class: int = 50, seed: int = 0) -> ImageDataset:
    """The 1,797 8x8 scikit-learn digits, bundled with scikit-learn (`path` and `download` are ignored).

    The test set holds `test_per_class` images of each class: the first ones of that class in a permutation
    drawn with `np.random.default_rng(seed)`. Both sets keep the original order.
    """
    from sklearn.datasets import load_digits as sklearn_digits  # slow import, only when needed

    bunch = sklearn_digits()
    images = np.rint(bunch.images * 255 / 16).astype(np.uint8)[..., None]  # 0..16 -> 0..255, (N, 8, 8, 1)
    labels = bunch.target.astype(np.int64)
    test = _balanced_test_mask(labels, test_per_class, seed)
    return ImageDataset(images[~test], labels[~test], images[test], labels[test],
                        [str(c) for c in range(10)], "digits")


def _balanced_test_mask(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    counts = np.bincount(labels)
    if not isinstance(per_class, (int, np.integer)) or not 0 <= per_class < counts.min():
        raise DataError(f"digits: test_per_class is {per_class!r}; expected an integer from 0 to "
                        f"{counts.min() - 1} (the smallest class has {counts.min()} images)")
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each image among its class in `order`
    for c in range(len(counts)):
        in_class = order[labels[order] == c]
        rank[in_class] = np.arange(len(in_class))
    return rank < per_class
