"""Image folders, split files, Tiny-ImageNet and the folder configs, on tiny trees written by the tests."""
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robal.cli import main
from robal.config import load_config
from robal.data import build_train_loader, long_tailed_counts, prepare_data
from robal.data import sources, tiny_imagenet
from robal.data.folder import read_split_file
from robal.data.loader import random_resized_crop
from robal.data.sources import DataError, load_source
from robal.registry import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "src/robal/configs"
TINY_CONFIGS = sorted((CONFIGS / "tiny_imagenet_lt").rglob("*.yaml"))
IMAGENET_LT_CONFIGS = sorted((CONFIGS / "imagenet_lt").glob("*.yaml"))


def pixels(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def save(array, path: Path, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **kw) if mode else Image.fromarray(array).save(path, **kw)
    return path


def smooth(h, w, seed):
    """A smooth colour image (JPEG keeps it within a few levels)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(40 + 8 * yy + seed) % 256, (60 + 8 * xx) % 256, np.full_like(yy, 30 * seed % 256)],
                    -1).astype(np.uint8)


@pytest.fixture
def mixed_folder(tmp_path):
    """train/: 'dog' 3 images (PNG, JPEG, grayscale PNG), 'cat' 2 (RGBA PNG, PNG), 'emu' 1 in a sub-folder;
    test/: one PNG per class. Classes are not written in sorted order."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    made = {}
    made["dog0"] = save(pixels(rng, 6, 5), root / "train/dog/a.png")
    made["dog1_src"] = smooth(6, 5, 1)
    save(made["dog1_src"], root / "train/dog/b.JPG", quality=95)
    made["gray"] = pixels(rng, 6, 5, 1)
    save(made["gray"], root / "train/dog/c_gray.png", "L")
    made["rgba"] = pixels(rng, 6, 5, 4)
    save(made["rgba"], root / "train/cat/rgba.png", "RGBA")
    made["cat1"] = save(pixels(rng, 6, 5), root / "train/cat/z.png")
    save(pixels(rng, 6, 5), root / "train/emu/nested/deeper/x.png")
    (root / "train/dog/notes.txt").write_text("not an image")
    for name in ("dog", "cat", "emu"):
        save(pixels(rng, 6, 5), root / f"test/{name}/t.png")
    return root, made


def test_folder_layout_decodes_every_format_to_rgb_in_sorted_class_order(mixed_folder):
    root, made = mixed_folder
    ds = load_source("folder", str(root))
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.y_train.tolist() == [0, 0, 1, 1, 1, 2] and ds.y_test.tolist() == [0, 1, 2]
    assert ds.x_train.shape == (6, 6, 5, 3) and ds.x_train.dtype == np.uint8
    assert ds.train_files == ["train/cat/rgba.png", "train/cat/z.png", "train/dog/a.png", "train/dog/b.JPG",
                              "train/dog/c_gray.png", "train/emu/nested/deeper/x.png"]
    assert np.array_equal(ds.x_train[0], made["rgba"][..., :3])          # alpha dropped, colours kept
    assert np.array_equal(ds.x_train[2], np.asarray(Image.open(made["dog0"])))
    assert np.abs(ds.x_train[3].astype(int) - made["dog1_src"]).max() <= 6   # JPEG: close, not exact
    assert all(np.array_equal(ds.x_train[4][..., c], made["gray"]) for c in range(3))  # gray repeated


def test_worker_processes_decode_the_same_arrays(mixed_folder):
    from robal.data.folder import Decode, decode_files, scan_splits

    splits = scan_splits(mixed_folder[0])
    alone = decode_files(splits.root, splits.train_files, Decode(4), workers=0)
    pooled = decode_files(splits.root, splits.train_files, Decode(4), workers=2, chunk=2)
    assert pooled.shape == (6, 4, 4, 3) and np.array_equal(alone, pooled)
    (mixed_folder[0] / "train/emu/nested/deeper/x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"deeper/x.png: cannot decode"):  # a worker's error, named
        decode_files(splits.root, splits.train_files, Decode(4), workers=2, chunk=2)


def test_val_folder_is_the_test_split_without_test_and_unknown_classes_are_named(mixed_folder):
    root, _ = mixed_folder
    (root / "test").rename(root / "val")
    assert load_source("folder", str(root)).x_test.shape[0] == 3
    save(np.zeros((6, 5, 3), np.uint8), root / "val/yak/y.png")
    with pytest.raises(DataError, match=r"val: class folder\(s\) yak are not training classes"):
        load_source("folder", str(root))


def test_a_corrupt_or_truncated_file_is_named(mixed_folder):
    root, _ = mixed_folder
    bad = root / "train/cat/broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match=rf"{bad}: cannot decode as an image"):
        load_source("folder", str(root))
    bad.unlink()
    buffer = io.BytesIO()
    Image.fromarray(smooth(40, 40, 2)).save(buffer, "PNG")
    cut = root / "train/cat/cut.png"
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match=rf"{cut}: cannot decode"):
        load_source("folder", str(root))


def test_images_of_different_sizes_need_image_size(mixed_folder):
    root, _ = mixed_folder
    odd = save(np.zeros((9, 7, 3), np.uint8), root / "train/dog/odd.png")
    with pytest.raises(DataError, match=rf"{odd}: image is 7x9 .*set data.image_size"):
        load_source("folder", str(root))
    assert load_source("folder", str(root), image_size=4).x_train.shape == (7, 4, 4, 3)


def test_resize_and_center_crop(tmp_path):
    """Shorter side to `resize` (bilinear), then the central square; an image of the target size is untouched."""
    from robal.data.folder import Decode, decode_image

    wide = np.zeros((10, 20, 3), np.uint8)
    wide[:, :, 0] = np.arange(20)[None, :] * 10       # red encodes the column
    wide[:, :, 1] = np.arange(10)[:, None] * 20       # green the row
    path = save(wide, tmp_path / "wide.png")
    crop = decode_image(path, Decode(image_size=10))
    assert np.array_equal(crop, wide[:, 5:15])
    assert np.array_equal(decode_image(path, Decode()), wide)
    half = decode_image(path, Decode(image_size=4, resize=5))  # 20x10 -> 10x5, then the central 4x4
    assert half.shape == (4, 4, 3)
    assert np.all(np.diff(half[0, :, 0].astype(int)) > 0) and np.all(np.diff(half[:, 0, 1].astype(int)) > 0)
    assert 60 <= half[:, :, 0].mean() <= 130          # the middle of 0..190, not an edge


def write_list(path: Path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_split_files_relative_to_root(mixed_folder, tmp_path):
    root, _ = mixed_folder
    train = write_list(tmp_path / "train.txt", ["# a comment", "", "train/dog/a.png 0", "train/cat/z.png 1",
                                                "train/emu/nested/deeper/x.png 1"])
    write_list(root / "test.txt", ["test/dog/t.png 0", "test/emu/t.png 1"])
    ds = load_source("folder", str(root), train_list=str(train), test_list="test.txt")  # test.txt: in the root
    assert ds.y_train.tolist() == [0, 1, 1] and ds.y_test.tolist() == [0, 1]
    assert ds.class_names == ["0", "1"]  # label 1's images lie in two folders: named by their label
    assert np.array_equal(ds.x_train[0], np.asarray(Image.open(root / "train/dog/a.png")))
    by_folder = write_list(tmp_path / "lt.txt", ["train/dog/a.png 1", "train/cat/z.png 0"])
    with pytest.raises(DataError, match=r"test: class folder\(s\) emu are not training classes"):
        load_source("folder", str(root), train_list=str(by_folder))
    for f in (root / "test/emu").iterdir():
        f.unlink()
    (root / "test/emu").rmdir()
    mixed = load_source("folder", str(root), train_list=str(by_folder))  # test/ folders named as the classes
    assert mixed.class_names == ["cat", "dog"]
    assert mixed.y_test.tolist() == [0, 1] and mixed.test_files == ["test/cat/t.png", "test/dog/t.png"]


@pytest.mark.parametrize("line, message", [
    ("train/dog/a.png", r"line 2: 'train/dog/a.png'; expected 'relative/path label'"),
    ("train/dog/a.png dog", r"line 2: label 'dog'; expected an integer label"),
    ("train/dog/gone.png 0", r"line 2: .*gone.png does not exist; paths in a split file are relative to data.root"),
])
def test_bad_split_file_lines_are_named(mixed_folder, tmp_path, line, message):
    root, _ = mixed_folder
    path = write_list(tmp_path / "bad.txt", ["train/cat/z.png 0", line])
    with pytest.raises(DataError, match=rf"{path}, {message}"):
        load_source("folder", str(root), train_list=str(path))


def test_a_label_without_training_images_is_refused(mixed_folder, tmp_path):
    root, _ = mixed_folder
    path = write_list(tmp_path / "gap.txt", ["train/cat/z.png 0", "train/dog/a.png 2"])
    with pytest.raises(DataError, match=r"label 1\) have no training image"):
        load_source("folder", str(root), train_list=str(path), test_list=str(path))


# ---------------------------------------------------------------- the same images as .npz and as a folder

def write_arrays_as_folder(root: Path, x, y, split, names):
    for i, (image, label) in enumerate(zip(x, y)):
        save(image, root / split / names[label] / f"{i:05d}.png")  # file order = array order within a class


def cfg_for(kind, where, extra=()):
    common = ["data.subset=long_tailed", "data.imbalance_ratio=4", "data.crop_padding=2", "data.val_per_class=1"]
    place = [f"data.path={where}"] if kind == "npz" else ["data.source=folder", f"data.root={where}"]
    return load_config(None, [f"data.source={kind}"] + place + common + list(extra))


def test_a_folder_of_the_same_arrays_gives_the_same_tensors_as_the_npz(tmp_path):
    rng = np.random.default_rng(3)
    names = np.array(["c0", "c1", "c2"])
    y_train = rng.permutation(np.repeat(np.arange(3), 12))      # interleaved labels, as CIFAR's
    x_train = rng.integers(0, 256, (36, 8, 8, 3), dtype=np.uint8)
    y_test = np.repeat(np.arange(3), 2)
    x_test = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names)
    write_arrays_as_folder(tmp_path / "f", x_train, y_train, "train", names)
    write_arrays_as_folder(tmp_path / "f", x_test, y_test, "test", names)
    cfg_a, cfg_b = cfg_for("npz", tmp_path / "d.npz").data, cfg_for("folder", tmp_path / "f").data
    a, b = prepare_data(cfg_a), prepare_data(cfg_b)
    assert a.class_counts == b.class_counts == [11, 5, 2]  # long_tailed_counts(12, 3, 4) less one for val
    for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    assert a.mean == b.mean and a.std == b.std and a.class_names == b.class_names
    batches_a = list(build_train_loader(cfg_a, a, 8, "cpu", seed=5))
    batches_b = list(build_train_loader(cfg_b, b, 8, "cpu", seed=5))
    assert len(batches_a) == len(batches_b) == 3
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(batches_a, batches_b))


# ---------------------------------------------------------------- robal split

def test_split_command_writes_the_long_tailed_subset_that_trains_the_same_images(tmp_path, capsys):
    rng = np.random.default_rng(4)
    root = tmp_path / "f"
    for c, n in enumerate([10, 9, 12]):
        for i in range(n):
            save(pixels(rng, 4, 4), root / f"train/k{c}/{i:02d}.png")
        save(pixels(rng, 4, 4), root / f"test/k{c}/t.png")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{source: folder, root: {root}, subset: long_tailed, imbalance_ratio: 3, "
                      f"subset_seed: 7}}\n")
    out = tmp_path / "splits/train_lt.txt"
    assert main(["split", str(config), "--out", str(out)]) == 0
    counts = long_tailed_counts(9, 3, 3)
    assert f"wrote {out}: {sum(counts)} training images, per class {counts}" in capsys.readouterr().out
    files, labels = read_split_file(out, root)
    assert np.bincount(labels).tolist() == counts
    assert all(f.startswith(f"train/k{y}/") for f, y in zip(files, labels))
    original = prepare_data(load_config(config).data)
    again = prepare_data(load_config(config, [f"data.train_list={out}", "data.subset=full"]).data)
    assert again.class_counts == original.class_counts == counts
    rows = sorted(x.tobytes() for x in original.x_train)
    assert sorted(x.tobytes() for x in again.x_train) == rows
    other_seed = prepare_data(load_config(config, ["data.subset_seed=8"]).data)
    assert sorted(x.tobytes() for x in other_seed.x_train) != rows  # the file fixes a seed's choice


def test_split_command_refuses_array_sources(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 2, 2, 3), np.uint8), y_train=np.array([0, 0, 1, 1]),
             x_test=np.zeros((2, 2, 2, 3), np.uint8), y_test=np.array([0, 1]))
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{source: npz, path: {tmp_path / 'd.npz'}, subset: full}}\n")
    assert main(["split", str(config), "--out", str(tmp_path / "s.txt")]) == 2
    assert "data.source: 'npz' holds arrays, not image files" in capsys.readouterr().err


# ---------------------------------------------------------------- config keys

@pytest.mark.parametrize("overrides, message", [
    (["data.source=folder"], r"data.root: source 'folder' reads a folder of images from data.root"),
    (["data.source=folder", "data.path=x", "data.root=x"], r"data.path: source 'folder' reads data.root"),
    (["data.source=npz", "data.path=x", "data.root=x"], r"data.root: only the folder, tiny_imagenet sources"),
    (["data.source=npz", "data.path=x", "data.image_size=32"], r"data.image_size: only the folder"),
    (["data.source=folder", "data.root=R", "data.image_size=0"], r"data.image_size: must be >= 1"),
    (["data.source=folder", "data.root=R", "data.resize=40"], r"data.resize: needs data.image_size"),
    (["data.source=folder", "data.root=R", "data.image_size=32", "data.resize=30"], r"data.resize: the shorter"),
    (["data.source=folder", "data.root=R", "data.crop=rrc"], r"data.crop: must be one of pad, random_resized"),
    (["data.source=folder", "data.root=R", "data.crop_scale=[0.5, 0.2]"], r"data.crop_scale: must be \[min, max\]"),
    (["data.source=folder", "data.root=R", "data.workers=-1"], r"data.workers: must be >= 0"),
    (["data.source=folder", "data.root=R", "data.train_list=nope.txt"], r"data.train_list: split file nope.txt"),
    (["data.source=folder", "data.root=R/missing"], r"data.root: .*missing is not a directory"),
])
def test_folder_config_keys_are_validated_by_name(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "R").mkdir()
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ---------------------------------------------------------------- random-resized crop

def test_random_resized_crop_is_seeded_and_full_scale_is_the_identity():
    x = torch.rand(6, 3, 16, 16)
    same = random_resized_crop(x, (1.0, 1.0), torch.Generator().manual_seed(0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-6)
    a = random_resized_crop(x, (0.1, 0.5), torch.Generator().manual_seed(1))
    b = random_resized_crop(x, (0.1, 0.5), torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(6, 3, 16, 16).contiguous()
    zoomed = random_resized_crop(ramp, (0.1, 0.3), torch.Generator().manual_seed(2))
    spread = zoomed[:, 0, 0, -1] - zoomed[:, 0, 0, 0]    # a crop of <= 0.3 of the area spans fewer columns
    assert (spread < 15 * 0.3 ** 0.5 * (4 / 3) ** 0.5 + 1e-4).all() and (spread > 0).all()
    assert len({round(v, 3) for v in zoomed[:, 0, 0, 0].tolist()}) > 1  # each image its own box


# ---------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n02124075", "n01443537", "n09246464"]  # wnids.txt is not sorted; classes are
WORDS = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat", "n09246464": "cliff, drop"}


def write_tiny_imagenet(root: Path, per_class: int = 3, val_per_class: int = 2, size: int = 64) -> Path:
    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(5)
    (folder / "val/images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in
                                              list(WORDS.items()) + [("n00000001", "entity")]))
    for w in WNIDS:
        boxes = []
        for i in range(per_class):
            name = f"{w}_{i}.JPEG"
            save(pixels(rng, size, size), folder / f"train/{w}/images/{name}", format="JPEG")
            boxes.append(f"{name}\t0\t0\t{size - 1}\t{size - 1}")
        (folder / f"train/{w}/{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    annotations = []
    for i in range(val_per_class * len(WNIDS)):
        w = WNIDS[(i * 2) % len(WNIDS)]
        save(pixels(rng, size, size), folder / f"val/images/val_{i}.JPEG", format="JPEG")
        annotations.append(f"val_{i}.JPEG\t{w}\t1\t2\t30\t40")
    (folder / "val/val_annotations.txt").write_text("\n".join(annotations) + "\n")
    save(pixels(rng, size, size), folder / "test/images/test_0.JPEG", format="JPEG")
    return folder


def test_tiny_imagenet_reads_the_official_layout(tmp_path):
    folder = write_tiny_imagenet(tmp_path)
    for root in (tmp_path, folder):  # the folder holding tiny-imagenet-200/, or that folder itself
        ds = load_source("tiny_imagenet", str(root))
        assert ds.class_names == ["goldfish", "Egyptian cat", "cliff"]  # sorted WNIDs, words.txt's first name
        assert ds.x_train.shape == (9, 64, 64, 3) and ds.x_test.shape == (6, 64, 64, 3)
        assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert ds.train_files[0] == "train/n01443537/images/n01443537_0.JPEG"
        sorted_wnids = sorted(WNIDS)
        expected = [sorted_wnids.index(WNIDS[(i * 2) % 3]) for i in range(6)]
        assert ds.y_test.tolist() == expected and ds.test_files[1] == "val/images/val_1.JPEG"
        decoded = np.asarray(Image.open(folder / "val/images/val_1.JPEG").convert("RGB"))
        assert np.array_equal(ds.x_test[1], decoded)
    assert load_source("tiny_imagenet", str(folder), image_size=32).x_train.shape == (9, 32, 32, 3)


def test_tiny_imagenet_errors_name_the_file(tmp_path):
    folder = write_tiny_imagenet(tmp_path)
    notes = folder / "val/val_annotations.txt"
    notes.write_text(notes.read_text() + "val_99.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=rf"{notes}, line 7: .*val_99.JPEG does not exist"):
        load_source("tiny_imagenet", str(folder))
    notes.write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=rf"{notes}, line 1: WNID n99999999 is not in wnids.txt"):
        load_source("tiny_imagenet", str(folder))
    with pytest.raises(DataError, match=r"holds no Tiny-ImageNet.*data.download: true"):
        load_source("tiny_imagenet", str(tmp_path / "empty"))


def zip_tree(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder.parent).as_posix())
    return archive


def test_tiny_imagenet_zip_is_extracted_and_downloaded_with_its_md5(tmp_path, monkeypatch):
    archive = zip_tree(write_tiny_imagenet(tmp_path / "made"), tmp_path / "tiny-imagenet-200.zip")
    given = tmp_path / "given"
    given.mkdir()
    (given / "tiny-imagenet-200.zip").write_bytes(archive.read_bytes())
    assert load_source("tiny_imagenet", str(given)).x_train.shape == (9, 64, 64, 3)
    assert (given / "tiny-imagenet-200/wnids.txt").is_file()
    fetched = []
    monkeypatch.setattr(sources, "_fetch_url", lambda url, dest: (fetched.append(url), dest.write_bytes(
        archive.read_bytes())))
    monkeypatch.setattr(tiny_imagenet, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    ds = load_source("tiny_imagenet", str(tmp_path / "new"), download=True)
    assert fetched == ["http://cs231n.stanford.edu/tiny-imagenet-200.zip"] and len(ds.y_test) == 6
    monkeypatch.setattr(tiny_imagenet, "MD5", "0" * 32)
    with pytest.raises(DataError, match=r"md5 of the download .* expected 0{32}"):
        load_source("tiny_imagenet", str(tmp_path / "other"), download=True)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    """Two classes of 100 8x8 training images (ratio 100 keeps 100 and 1, ratio 10 100 and 10), two test images
    each; the configs resize them to 64x64."""
    root = tmp_path_factory.mktemp("tiny")
    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(6)
    wnids = ["n01443537", "n01629819"]
    (folder / "val/images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        for i in range(100):
            save(pixels(rng, 8, 8), folder / f"train/{w}/images/{w}_{i}.JPEG", format="JPEG")
    lines = []
    for i in range(4):
        save(pixels(rng, 8, 8), folder / f"val/images/val_{i}.JPEG", format="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % 2]}\t0\t0\t7\t7")
    (folder / "val/val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_the_tiny_imagenet_lt_configs_are_the_expected_grid():
    names = {p.relative_to(CONFIGS / "tiny_imagenet_lt").as_posix() for p in TINY_CONFIGS}
    methods = ["pgd_at", "trades", "robal_n", "at_bsl"]
    assert names == {f"r{r}/{m}{e}.yaml" for r in (10, 100) for m in methods for e in ("", "_eps4")}
    for path in TINY_CONFIGS:
        cfg = load_config(path, validate_files=False)
        assert cfg.data.source == "tiny_imagenet" and cfg.model.backbone == "preact_resnet18"
        assert cfg.data.imbalance_ratio == int(path.parent.name[1:])
        eps = 4 / 255 if path.stem.endswith("_eps4") else 8 / 255
        assert cfg.train.attack.eps == cfg.eval.eps == pytest.approx(eps)
        assert cfg.train.attack.step_size == pytest.approx(eps / 4)


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_tiny_imagenet_lt_config_dry_runs_on_a_fake_tree(path, tiny_tree, capsys):
    """Width 16, not 8: oneDNN 3.12 (torch 2.13's CPU build) crashes on AVX-512 CPUs in the weight gradient of a
    stride-2 1x1 convolution in channels_last with 8 input channels on 64x64 maps (docs/performance.md)."""
    args = ["train", str(path), "--dry-run", "--set", f"data.root={tiny_tree}", "--set", "model.backbone_args.width=16"]
    assert main(args) == 0, capsys.readouterr().err
    counts = long_tailed_counts(100, 2, int(path.parent.name[1:]))  # [100, 10] or [100, 1]
    assert f"class counts ({sum(counts)} images): {counts}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    """ImageNet's folder layout with ImageNet-LT style split files (two classes, 12x10 JPEGs)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(7)
    wnids = ["n01440764", "n01443537"]
    train, test = [], []
    for label, w in enumerate(wnids):
        for i in range(6 - 4 * label):
            save(pixels(rng, 12, 10), root / f"train/{w}/{w}_{i}.JPEG", format="JPEG")
            train.append(f"train/{w}/{w}_{i}.JPEG {label}")
        save(pixels(rng, 10, 12), root / f"val/{w}/ILSVRC2012_val_{label:08d}.JPEG", format="JPEG")
        test.append(f"val/{w}/ILSVRC2012_val_{label:08d}.JPEG {label}")
    write_list(root / "ImageNet_LT_train.txt", train)
    write_list(root / "ImageNet_LT_test.txt", test)
    return root


@pytest.mark.parametrize("path", IMAGENET_LT_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_imagenet_lt_configs_dry_run_on_a_fake_tree_with_split_files(path, imagenet_tree, capsys):
    """At 224 px as configured; only the ResNet-50's width is cut (8 instead of 64) to keep the CPU step short."""
    args = ["train", str(path), "--dry-run", "--set", f"data.root={imagenet_tree}", "--set", "data.workers=0",
            "--set", "model.backbone_args={width: 8}"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "class counts (8 images): [6, 2]" in out and "image_size: 224" in out


def test_resnet50_is_the_standard_one():
    from robal.models.backbones import BACKBONES

    model = BACKBONES.get("resnet50")()
    assert sum(p.numel() for p in model.parameters()) == 23_508_032  # torchvision's resnet50 less its fc layer
    assert model.feature_dim == 2048
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2048)


# ---------------------------------------------------------------- README "Your own images"

def readme_block(title: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0]


def test_readme_your_own_images_runs_as_written(tmp_path):
    """The section's commands, run by bash in an empty directory with this environment's robal and python."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               ROBAL_TEST_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block("Your own images")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "wrote my_split.txt: 84 training images, per class [60, 18, 6]" in out
    assert "saved runs/my_images/model.pt" in out and (tmp_path / "runs/my_images/eval.json").is_file()
    assert out.rstrip().endswith("class counts (84 images): [60, 18, 6]")
    result = json.loads((tmp_path / "runs/my_images/eval.json").read_text())
    assert set(result["attacks"]) == {"clean", "pgd20"} and result["class_counts"] == [60, 18, 6]
    assert len(list((tmp_path / "my_images/train/blue").glob("*.jpg"))) == 60
