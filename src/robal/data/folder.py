"""Image folders and split files: `data.source: folder`.

Two ways to say which images form each split, mixed freely (one split from a list, the other from folders):

- the ImageFolder convention: `ROOT/train/CLASS/...` and `ROOT/test/CLASS/...` (or `ROOT/val/CLASS/...` when
  there is no `test/`); classes are the training folder's sub-folders in sorted order, label i is the i-th
  name; every image file below a class folder, at any depth, belongs to it, files in sorted path order;
- split files (`data.train_list`, `data.test_list`): one `relative/path label` line per image, the path relative
  to `data.root`, as the ImageNet-LT and Places-LT files of Liu et al. (2019). Blank lines and `#` comments are
  skipped. A list file's own path is taken from the working directory, or from `data.root` when it is not there.

Images are decoded with Pillow and converted to RGB (grayscale repeated, alpha dropped). With `data.image_size`
S each is resized so that its shorter side is `data.resize` (default S; Pillow's bilinear filter, which
antialiases when it shrinks) and center-cropped to S x S: the usual test transform. Without it every image must
already have the same size. The training transforms (pad-crop or random-resized crop, flip) run later on the
batches (loader.py), as for every source. Decoded images are uint8 (N, S, S, 3) arrays, like every source's;
until then a split is an `ImageFiles` (a lazy stand-in for that array: prepare_data decodes only the images its
subset keeps, the streaming loader decodes batch by batch), optionally backed by a decoded cache (data.cache).
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import DataError, ImageDataset, register_source

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
TEST_FOLDERS = ("test", "val")  # the first one present is the test split


@dataclass
class FileSplits:
    """Which files form each split, before anything is decoded. Paths are relative to `root`."""
    root: Path
    train_files: list[str]
    train_labels: np.ndarray
    test_files: list[str]
    test_labels: np.ndarray
    class_names: list[str]
    name: str


@dataclass(frozen=True)
class Decode:
    """How a file becomes an image: shorter side to `resize`, center crop `image_size` (None: as stored)."""
    image_size: int | None = None
    resize: int | None = None


# ---------------------------------------------------------------- finding files

def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def class_folders(split_dir: Path) -> list[str]:
    """The sorted class folder names of a split folder (hidden ones skipped)."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such folder; expected one sub-folder per class")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        loose = [p.name for p in split_dir.iterdir() if is_image_file(p)][:3]
        found = f" (found image files such as {', '.join(loose)} directly in it)" if loose else ""
        raise DataError(f"{split_dir}: no class folders{found}; expected {split_dir}/CLASS/IMAGE files")
    return names


def files_of_class(folder: Path) -> list[Path]:
    """Every image file below `folder`, at any depth, in sorted path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if is_image_file(Path(f))]
    return sorted(found)


def scan_folder_split(root: Path, split: str, class_names: list[str] | None = None):
    """(files relative to root, labels, class names) of ROOT/split/CLASS/...; with `class_names` given (the
    training split's), the split's folders must be among them and take their labels."""
    split_dir = root / split
    names = class_folders(split_dir)
    if class_names is None:
        class_names = names
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise DataError(f"{split_dir}: class folder(s) {', '.join(unknown[:5])} are not training classes; "
                        f"expected folders named as the training classes ({', '.join(class_names[:5])}, ...)")
    label_of = {n: i for i, n in enumerate(class_names)}
    files, labels = [], []
    for name in names:
        members = files_of_class(split_dir / name)
        files += [p.relative_to(root).as_posix() for p in members]
        labels += [label_of[name]] * len(members)
    if not files:
        raise DataError(f"{split_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return files, np.asarray(labels, dtype=np.int64), class_names


# ---------------------------------------------------------------- split files

def resolve_list(path: str | Path, root: Path, key: str) -> Path:
    """A split file named by `key`: as given (from the working directory), else inside `root`."""
    given = Path(path)
    for candidate in (given, root / given):
        if candidate.is_file():
            return candidate
    raise DataError(f"{key}: split file {path} not found (looked at {given.absolute()} and {root / given})")


def read_split_file(path: Path, root: Path, check_exists: bool = True) -> tuple[list[str], np.ndarray]:
    """`relative/path label` lines -> (paths relative to root, labels); errors name the file and line."""
    files, labels = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as a text split file ({e})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        where = f"{path}, line {number}"
        if len(parts) != 2:
            raise DataError(f"{where}: {line!r}; expected 'relative/path label' (a path, a space, an integer label)")
        rel, label = parts
        try:
            label = int(label)
        except ValueError:
            label = -1
        if label < 0:
            raise DataError(f"{where}: label {parts[1]!r}; expected an integer label >= 0 after the path")
        if check_exists and not (root / rel).is_file():
            raise DataError(f"{where}: {root / rel} does not exist; paths in a split file are relative to "
                            f"data.root ({root})")
        files.append(rel)
        labels.append(label)
    if not files:
        raise DataError(f"{path}: no 'relative/path label' lines; expected one line per image")
    return files, np.asarray(labels, dtype=np.int64)


def write_split_file(path: str | Path, files: list[str], labels, header: str = "") -> Path:
    """Write `relative/path label` lines (readable by `read_split_file`), with `# ` comment lines first."""
    path = Path(path)
    bad = [f for f in files if f != f.strip() or "\n" in f]
    if bad:
        raise DataError(f"{path}: cannot write path {bad[0]!r} into a split file (leading/trailing space or newline)")
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(comments + "".join(f"{f} {int(y)}\n" for f, y in zip(files, labels)), encoding="utf-8")
    tmp.replace(path)
    return path


def names_from_paths(files: list[str], labels: np.ndarray, num_classes: int) -> list[str]:
    """Class names for a split file's labels: the name of the folder holding each label's images when, for every
    label, all its images lie in folders of one name and no two labels share it (ImageNet-LT: the WNIDs); else
    the labels themselves ("0", "1", ...)."""
    names = []
    for c in range(num_classes):
        parents = {Path(files[i]).parent.name for i in np.flatnonzero(labels == c)}
        if len(parents) != 1 or "" in parents:
            return [str(c) for c in range(num_classes)]
        names.append(parents.pop())
    return names if len(set(names)) == len(names) else [str(c) for c in range(num_classes)]


def scan_splits(root: Path, train_list: str | None = None, test_list: str | None = None,
                name: str | None = None) -> FileSplits:
    """The files of both splits of a folder dataset: from split files where given, else from class folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a directory; expected a folder holding train/CLASS/... and "
                        f"test/CLASS/... (or val/), or the images named by data.train_list / data.test_list")
    class_names = None
    if train_list is None:
        train_files, train_labels, class_names = scan_folder_split(root, "train")
    else:
        train_files, train_labels = read_split_file(resolve_list(train_list, root, "data.train_list"), root)
    if test_list is None:
        split = next((s for s in TEST_FOLDERS if (root / s).is_dir()), None)
        if split is None:
            raise DataError(f"{root}: no test/ or val/ folder and no data.test_list; expected ROOT/test/CLASS/... "
                            f"or a split file for the test images")
        if class_names is None:  # training labels from a split file: test folders are named as those classes
            class_names = names_from_paths(train_files, train_labels, int(train_labels.max()) + 1)
        test_files, test_labels, class_names = scan_folder_split(root, split, class_names)
    else:
        test_files, test_labels = read_split_file(resolve_list(test_list, root, "data.test_list"), root)
    if class_names is None:
        num = int(max(train_labels.max(), test_labels.max())) + 1
        class_names = names_from_paths(train_files + test_files, np.concatenate([train_labels, test_labels]), num)
    num = len(class_names)
    for key, labels in (("data.train_list", train_labels), ("data.test_list", test_labels)):
        if labels.max() >= num:
            raise DataError(f"{key}: label {labels.max()} but the dataset has {num} classes "
                            f"({', '.join(class_names[:5])}{', ...' if num > 5 else ''})")
    empty = [c for c, n in enumerate(np.bincount(train_labels, minlength=num)) if n == 0]
    if empty:
        raise DataError(f"{root}: class(es) {', '.join(class_names[c] for c in empty[:5])} (label "
                        f"{', '.join(map(str, empty[:5]))}) have no training image; every label from 0 to "
                        f"{num - 1} needs at least one")
    return FileSplits(root, train_files, train_labels, test_files, test_labels, class_names, name or root.name)


# ---------------------------------------------------------------- decoding

def _to_rgb(img):
    if img.mode == "P":  # palette images may carry transparency: through RGBA, as Pillow advises
        img = img.convert("RGBA")
    return img.convert("RGB")


def resize_center_crop(img, resize: int, size: int):
    """Shorter side to `resize` (longer side scaled and truncated, as torchvision's Resize), then the central
    size x size square (offsets rounded, as its CenterCrop). An image already of that size is left untouched."""
    from PIL import Image

    w, h = img.size
    if (w, h) != (size, size) or resize != size:
        if min(w, h) != resize:
            new = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
            img = img.resize(new, Image.Resampling.BILINEAR)
        w, h = img.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def decode_image(path: str | Path, decode: Decode = Decode()) -> np.ndarray:
    """One image file as uint8 (H, W, 3) RGB; a file Pillow cannot decode is a DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = _to_rgb(img)  # reads and decodes the whole file
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode as an image ({type(e).__name__}: {e}); expected a readable image "
                        f"file ({', '.join(sorted(IMAGE_SUFFIXES))})") from None
    if decode.image_size is not None:
        img = resize_center_crop(img, decode.resize or decode.image_size, decode.image_size)
    return np.asarray(img, dtype=np.uint8)


def _decode_chunk(args) -> np.ndarray:
    root, files, decode = args
    return np.stack([decode_image(root / f, decode) for f in files])


def decode_files(root: Path, files: list[str], decode: Decode = Decode(), workers: int = 0, chunk: int = 256,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Decode `files` (relative to root) into one uint8 (N, S, S, 3) array (or into `out`, e.g. a memory-mapped
    cache file); `workers` > 0 decodes chunks in that many processes. Without data.image_size the images must
    all have the first one's size."""
    root = Path(root)
    if not files:
        return np.zeros((0, decode.image_size or 1, decode.image_size or 1, 3), dtype=np.uint8)
    jobs = [(root, files[i:i + chunk], decode) for i in range(0, len(files), chunk)]
    at = 0
    pool = ProcessPoolExecutor(workers) if workers > 0 and len(jobs) > 1 else None
    try:
        parts = pool.map(_decode_chunk, jobs) if pool else map(_decode_chunk, jobs)
        for part in parts:
            if out is None:
                out = np.empty((len(files),) + part.shape[1:], dtype=np.uint8)
            out[at:at + len(part)] = part
            at += len(part)
    except ValueError as e:  # np.stack / assignment of images of different sizes
        if isinstance(e, DataError):
            raise
        raise DataError(_size_mismatch(root, files)) from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def _size_mismatch(root: Path, files: list[str]) -> str:
    from PIL import Image

    with Image.open(root / files[0]) as first:
        size = first.size
    for f in files[1:]:
        with Image.open(root / f) as img:
            if img.size != size:
                return (f"{root / f}: image is {img.size[0]}x{img.size[1]} but {root / files[0]} is "
                        f"{size[0]}x{size[1]}; set data.image_size to resize and center-crop every image to one size")
    return f"{root}: images of different sizes; set data.image_size"


# ---------------------------------------------------------------- image files as a lazy array, the decoded cache

CACHE_VERSION = 1  # part of every cache key: bump when decoding changes


class ImageFiles:
    """Image files standing in for a uint8 (N, S, S, 3) array, decoded only when needed.

    Indexing with a slice or an index array gives another ImageFiles (nothing decoded), an integer one decoded
    image, `np.asarray(files)` all of them (with `workers` processes). With `cache` (data.cache, a folder) the
    decoded array is kept there as an .npy file named after a hash of the root, the file list, each file's size
    and modification time and the decoding settings: the next run with the same images reads it back instead
    of decoding (`cached()` gives it memory-mapped).
    """
    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, root: Path, files: list[str], decode: Decode = Decode(), workers: int = 0,
                 cache: str | Path | None = None):
        self.root, self.files, self.decode = Path(root), list(files), decode
        self.workers, self.cache = workers, cache
        self._image_shape = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        if self._image_shape is None:
            s = self.decode.image_size
            if s or not self.files:  # (an empty set has decode_files' shape)
                self._image_shape = (s or 1, s or 1, 3)
            else:  # the first file's header: its size, nothing decoded
                from PIL import Image

                first = self.root / self.files[0]
                try:
                    with Image.open(first) as img:
                        self._image_shape = (img.size[1], img.size[0], 3)
                except (OSError, SyntaxError, ValueError) as e:
                    raise DataError(f"{first}: cannot decode as an image ({type(e).__name__}: {e})") from None
        return (len(self.files),) + tuple(self._image_shape)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return decode_image(self.root / self.files[index], self.decode)
        picked = np.arange(len(self.files))[index]
        return ImageFiles(self.root, [self.files[i] for i in picked], self.decode, self.workers, self.cache)

    def rows(self, indices) -> np.ndarray:
        """The images at `indices`, decoded in this process (the streaming loader's workers call this)."""
        return np.stack([decode_image(self.root / self.files[i], self.decode) for i in indices])

    def __array__(self, dtype=None, copy=None):
        array = np.array(self.cached()) if self.cache is not None and self.files else decode_files(
            self.root, self.files, self.decode, self.workers)
        return array if dtype is None else array.astype(dtype)

    def cache_path(self) -> Path:
        import hashlib
        import json

        stats = []
        for f in self.files:
            st = (self.root / f).stat()
            stats.append((st.st_size, st.st_mtime_ns))
        key = json.dumps({"version": CACHE_VERSION, "root": str(self.root.resolve()), "files": self.files,
                          "stats": stats, "image_size": self.decode.image_size, "resize": self.decode.resize})
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return Path(self.cache) / f"{self.root.name}-{len(self.files)}-{digest}.npy"

    def cached(self) -> np.ndarray:
        """The decoded images, memory-mapped from the cache file (decoded and written there first if missing)."""
        path = self.cache_path()
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=self.shape)
                decode_files(self.root, self.files, self.decode, self.workers, out=out)
                out.flush()
                del out
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the decoded-image cache ({e}); delete the file to rebuild it") from None
        if array.shape != self.shape or array.dtype != np.uint8:
            raise DataError(f"{path}: the cache holds {array.dtype} {array.shape}, expected uint8 {self.shape}; "
                            f"delete the file to rebuild it")
        return array


def load_splits(splits: FileSplits, decode: Decode, workers: int = 0, lazy: bool = False,
                cache: str | None = None) -> ImageDataset:
    """Both splits as an ImageDataset that remembers its files (for `robal split`): decoded arrays, or with
    lazy=True ImageFiles that decode when asked to (prepare_data decodes only the images it keeps)."""
    x_train = ImageFiles(splits.root, splits.train_files, decode, workers, cache)
    x_test = ImageFiles(splits.root, splits.test_files, decode, workers, cache)
    if not lazy:
        x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{splits.root}: training images are {x_train.shape[2]}x{x_train.shape[1]} but test images "
                        f"are {x_test.shape[2]}x{x_test.shape[1]}; set data.image_size to bring both to one size")
    return ImageDataset(x_train, splits.train_labels, x_test, splits.test_labels, splits.class_names, splits.name,
                        train_files=splits.train_files, test_files=splits.test_files, root=str(splits.root))


@register_source("folder", reads_root=True)
def load_folder(path: str | None = None, download: bool = False, train_list: str | None = None,
                test_list: str | None = None, image_size: int | None = None, resize: int | None = None,
                workers: int = 0, lazy: bool = False, cache: str | None = None) -> ImageDataset:
    """An image folder dataset (see the module docstring); `path` is data.root, `download` is ignored."""
    if path is None:
        raise DataError("data.root: the folder source needs the dataset's folder (holding train/CLASS/... and "
                        "test/CLASS/... or val/, or the images named by data.train_list / data.test_list)")
    splits = scan_splits(Path(path), train_list, test_list)
    return load_splits(splits, Decode(image_size, resize), workers, lazy, cache)
