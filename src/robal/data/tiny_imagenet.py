"""Tiny-ImageNet (`data.source: tiny_imagenet`): 200 ImageNet classes at 64x64, in the official layout.

    tiny-imagenet-200/wnids.txt                  the 200 WordNet ids, one a line
    tiny-imagenet-200/words.txt                  WNID<TAB>names (optional: class names)
    tiny-imagenet-200/train/WNID/images/*.JPEG   500 training images per class
    tiny-imagenet-200/val/images/*.JPEG          10,000 images, 50 per class: robal's test set
    tiny-imagenet-200/val/val_annotations.txt    FILE<TAB>WNID<TAB>box (four numbers)

(The official test/ folder has no labels and is not read.) Classes are the WNIDs in sorted order, as an
ImageFolder over train/ would give. `data.root` is the `tiny-imagenet-200` folder, a folder holding it, or a
folder holding `tiny-imagenet-200.zip` (extracted there on first use); with `data.download: true` and nothing
found, the archive is downloaded from the official URL into `data.root` and checked against its md5.
`data.train_list` / `data.test_list` replace a split by a split file, paths relative to the tiny-imagenet-200
folder and labels indexing the sorted WNIDs (what `robal split` writes).
"""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .folder import Decode, FileSplits, files_of_class, load_splits, read_split_file, resolve_list
from .sources import DataError, ImageDataset, download_file, register_source

FOLDER = "tiny-imagenet-200"
ARCHIVE = "tiny-imagenet-200.zip"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
EXPECTED = (f"the official {FOLDER} folder (wnids.txt, train/WNID/images/*.JPEG, val/images/*.JPEG and "
            f"val/val_annotations.txt), a folder holding it, or a folder holding {ARCHIVE}")


def find_folder(root: Path, download: bool) -> Path:
    """The tiny-imagenet-200 folder for data.root, extracting (and with `download`, first fetching) the zip."""
    if (root / "wnids.txt").is_file():
        return root
    if (root / FOLDER / "wnids.txt").is_file():
        return root / FOLDER
    archive = root / ARCHIVE
    if not archive.is_file():
        if not download:
            raise DataError(f"data.root: {root} holds no Tiny-ImageNet; expected {EXPECTED}. Set data.download: "
                            f"true to fetch it from {URL}")
        download_file(URL, archive, MD5)
    return extract(archive, root)


def extract(archive: Path, into: Path) -> Path:
    """Unzip the official archive into `into`/tiny-imagenet-200 through a temporary folder (no partial tree)."""
    into.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=into, prefix=".tiny-imagenet-extract."))
    try:
        try:
            with zipfile.ZipFile(archive) as z:
                for member in z.namelist():
                    parts = Path(member).parts
                    if Path(member).is_absolute() or ".." in parts or not parts or parts[0] != FOLDER:
                        raise DataError(f"{archive}: unexpected member {member!r}; expected only {FOLDER}/... "
                                        f"(the official archive)")
                z.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{archive}: cannot unzip ({e}); expected the official {ARCHIVE}") from None
        if not (tmp / FOLDER / "wnids.txt").is_file():
            raise DataError(f"{archive}: no {FOLDER}/wnids.txt inside; expected the official {ARCHIVE}")
        (tmp / FOLDER).replace(into / FOLDER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return into / FOLDER


def read_wnids(folder: Path) -> list[str]:
    path = folder / "wnids.txt"
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{path}: expected one distinct WordNet id (e.g. n01443537) per line; found "
                        f"{len(wnids)} lines, {len(set(wnids))} distinct")
    return sorted(wnids)


def read_words(folder: Path, wnids: list[str]) -> list[str]:
    """Each WNID's first name in words.txt (`n01443537<TAB>goldfish, Carassius auratus` -> goldfish); the WNID
    itself where words.txt is missing or lacks it."""
    path = folder / "words.txt"
    names = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, words = line.partition("\t")
            if words.strip():
                names[wnid.strip()] = words.split(",")[0].strip()
    return [names.get(w, w) for w in wnids]


def scan_train(folder: Path, wnids: list[str]) -> tuple[list[str], np.ndarray]:
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise DataError(f"{images}: missing; wnids.txt lists {wnid}, so expected train/{wnid}/images/*.JPEG")
        members = files_of_class(images)
        if not members:
            raise DataError(f"{images}: no image files; expected {wnid}'s training images (*.JPEG)")
        files += [p.relative_to(folder).as_posix() for p in members]
        labels += [label] * len(members)
    return files, np.asarray(labels, dtype=np.int64)


def scan_val(folder: Path, wnids: list[str]) -> tuple[list[str], np.ndarray]:
    path = folder / "val" / "val_annotations.txt"
    if not path.is_file():
        raise DataError(f"{path}: missing; expected FILE<TAB>WNID<TAB>x0<TAB>y0<TAB>x1<TAB>y1 lines for val/images/")
    label_of = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{path}, line {number}"
        if len(fields) < 2:
            raise DataError(f"{where}: {line!r}; expected FILE<TAB>WNID<TAB>box")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in label_of:
            raise DataError(f"{where}: WNID {wnid} is not in wnids.txt")
        rel = f"val/images/{name}"
        if not (folder / rel).is_file():
            raise DataError(f"{where}: {folder / rel} does not exist")
        files.append(rel)
        labels.append(label_of[wnid])
    if not files:
        raise DataError(f"{path}: no annotation lines; expected one per validation image")
    return files, np.asarray(labels, dtype=np.int64)


def scan_tiny_imagenet(folder: Path, train_list: str | None = None, test_list: str | None = None) -> FileSplits:
    wnids = read_wnids(folder)
    if train_list is None:
        train_files, train_labels = scan_train(folder, wnids)
    else:
        train_files, train_labels = read_split_file(resolve_list(train_list, folder, "data.train_list"), folder)
    if test_list is None:
        test_files, test_labels = scan_val(folder, wnids)
    else:
        test_files, test_labels = read_split_file(resolve_list(test_list, folder, "data.test_list"), folder)
    for key, labels in (("data.train_list", train_labels), ("data.test_list", test_labels)):
        if labels.max() >= len(wnids):
            raise DataError(f"{key}: label {labels.max()}; Tiny-ImageNet labels index the {len(wnids)} sorted "
                            f"WNIDs of {folder / 'wnids.txt'}")
    return FileSplits(folder, train_files, train_labels, test_files, test_labels, read_words(folder, wnids),
                      "tiny_imagenet")


@register_source("tiny_imagenet", reads_root=True)
def load_tiny_imagenet(path: str | None = None, download: bool = False, train_list: str | None = None,
                       test_list: str | None = None, image_size: int | None = None, resize: int | None = None,
                       workers: int = 0, lazy: bool = False, cache: str | None = None) -> ImageDataset:
    """Tiny-ImageNet's training images and its labelled val images as the test set (module docstring)."""
    if path is None:
        raise DataError(f"data.root: the tiny_imagenet source needs a folder: {EXPECTED}")
    folder = find_folder(Path(path), download)
    return load_splits(scan_tiny_imagenet(folder, train_list, test_list), Decode(image_size, resize), workers, lazy,
                       cache)
