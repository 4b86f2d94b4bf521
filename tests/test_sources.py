"""Data sources, on tiny files written by the tests in the official formats (nothing is downloaded)."""
import dataclasses
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from robal.data import sources
from robal.data.sources import SOURCES, DataError, ImageDataset, load_source

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared/data/cifar10.npz"


# ---------------------------------------------------------------- tiny CIFAR files

def _batch(n, label_key, num_classes, offset):
    data = (np.arange(n * 3072) + offset).astype(np.uint8).reshape(n, 3072)
    labels = [(offset + i) % num_classes for i in range(n)]
    return {b"batch_label": b"test", label_key: labels, b"data": data}


def _mark(batch, row, channel, y, x, value):
    """Put `value` at one channel/row/col of image `row`, in the official CHW flat layout."""
    batch[b"data"][row, channel * 1024 + y * 32 + x] = value


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    sizes = [2, 3, 1, 2, 2]  # the reader must not expect 10,000 rows per batch
    for i, n in enumerate(sizes, start=1):
        batch = _batch(n, b"labels", 10, offset=i)
        if i == 2:
            _mark(batch, row=1, channel=2, y=5, x=7, value=201)
        _dump(batch, folder / f"data_batch_{i}")
    _dump(_batch(3, b"labels", 10, offset=50), folder / "test_batch")
    names = [f"class{c}".encode() for c in range(10)]
    _dump({b"label_names": names, b"num_cases_per_batch": 2, b"num_vis": 3072}, folder / "batches.meta")
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = _batch(4, b"fine_labels", 100, offset=97)
    train[b"coarse_labels"] = [0, 1, 2, 3]
    _mark(train, row=3, channel=0, y=31, x=2, value=77)
    _dump(train, folder / "train")
    test = _batch(2, b"fine_labels", 100, offset=10)
    test[b"coarse_labels"] = [4, 5]
    _dump(test, folder / "test")
    _dump({b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
           b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]}, folder / "meta")
    return folder


def make_tar(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def check_cifar10(d: ImageDataset):
    assert d.name == "cifar10"
    assert d.x_train.shape == (10, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert d.x_test.shape == (3, 32, 32, 3)
    assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    assert d.y_train.tolist() == [1, 2, 2, 3, 4, 3, 4, 5, 5, 6]
    assert d.y_test.tolist() == [0, 1, 2]
    assert d.x_train[3, 5, 7, 2] == 201  # image 1 of data_batch_2 comes after 2 images of data_batch_1
    assert d.x_train[0, 0, 1, 0] == 2  # flat index 1 + offset 1: row 0, col 1, red
    assert d.x_train[0, 1, 0, 1] == (1024 + 32 + 1) % 256  # row 1, col 0, green
    assert d.class_names == [f"class{c}" for c in range(10)] and d.num_classes == 10


def test_cifar10_from_directory(tmp_path):
    write_cifar10(tmp_path)
    check_cifar10(load_source("cifar10", path=str(tmp_path)))


def test_cifar10_from_extracted_folder_itself(tmp_path):
    check_cifar10(load_source("cifar10", path=write_cifar10(tmp_path)))


def test_cifar10_from_archive_file_and_its_directory(tmp_path):
    archive = make_tar(write_cifar10(tmp_path / "src"), tmp_path / "cifar-10-python.tar.gz")
    check_cifar10(load_source("cifar10", path=archive))
    check_cifar10(load_source("cifar10", path=tmp_path))
    assert not (tmp_path / "cifar-10-batches-py").exists()  # read in place, nothing extracted


def test_cifar100_fine_labels(tmp_path):
    folder = write_cifar100(tmp_path)
    archive = make_tar(folder, tmp_path / "cifar-100-python.tar.gz")
    for path in (tmp_path, archive):
        d = load_source("cifar100", path=path)
        assert d.x_train.shape == (4, 32, 32, 3) and d.x_test.shape == (2, 32, 32, 3)
        assert d.y_train.tolist() == [97, 98, 99, 0] and d.y_test.tolist() == [10, 11]
        assert d.x_train[3, 31, 2, 0] == 77
        assert d.class_names[0] == "fine0" and d.num_classes == 100


def test_truncated_pickle_names_the_file(tmp_path):
    folder = write_cifar10(tmp_path)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3"):
        load_source("cifar10", path=tmp_path)


def test_truncated_pickle_inside_archive_names_the_member(tmp_path):
    folder = write_cifar10(tmp_path / "src")
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:300])
    archive = make_tar(folder, tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="test_batch"):
        load_source("cifar10", path=archive)


@pytest.mark.parametrize("bad, message", [
    ({b"data": np.zeros((2, 3072), np.uint8)}, "labels"),  # wrong keys
    ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, "3072"),  # wrong shape
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "labels"),  # length mismatch
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, r"\[0, 10\)"),  # label out of range
    ([1, 2, 3], "dict"),
])
def test_bad_batch_content(tmp_path, bad, message):
    folder = write_cifar10(tmp_path)
    _dump(bad, folder / "data_batch_4")
    with pytest.raises(DataError, match=message) as info:
        load_source("cifar10", path=tmp_path)
    assert "data_batch_4" in str(info.value)


def test_missing_batch_file(tmp_path):
    (write_cifar10(tmp_path) / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5"):
        load_source("cifar10", path=tmp_path)


def test_missing_data_without_download(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="download") as info:
        load_source("cifar10", path=missing)
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_md5_mismatch_deletes_the_download(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_fetch_url", lambda url, dest: Path(dest).write_bytes(b"not cifar"))
    target = tmp_path / "data"
    with pytest.raises(DataError) as info:
        load_source("cifar100", path=target, download=True)
    message = str(info.value)
    assert "cifar-100-python.tar.gz" in message
    assert sources.CIFAR100.md5 in message and hashlib.md5(b"not cifar").hexdigest() in message
    assert list(target.iterdir()) == []


def test_download_keeps_a_matching_file(tmp_path, monkeypatch):
    folder = write_cifar10(tmp_path / "src")
    good = make_tar(folder, tmp_path / "good.tar.gz").read_bytes()
    monkeypatch.setattr(sources, "_fetch_url", lambda url, dest: Path(dest).write_bytes(good))
    dest = sources.download_file("https://example.invalid/x", tmp_path / "dl" / "x.tar.gz",
                                 hashlib.md5(good).hexdigest())
    assert dest.read_bytes() == good and [p.name for p in dest.parent.iterdir()] == ["x.tar.gz"]


def test_download_then_read(tmp_path, monkeypatch):
    good = make_tar(write_cifar10(tmp_path / "src"), tmp_path / "good.tar.gz").read_bytes()
    monkeypatch.setattr(sources, "_fetch_url", lambda url, dest: Path(dest).write_bytes(good))
    monkeypatch.setattr(sources, "CIFAR10", dataclasses.replace(sources.CIFAR10, md5=hashlib.md5(good).hexdigest()))
    check_cifar10(load_source("cifar10", path=tmp_path / "new", download=True))
    assert (tmp_path / "new" / "cifar-10-python.tar.gz").is_file()


# ---------------------------------------------------------------- registry

def test_registry_and_unknown_name():
    assert {"cifar10", "cifar100", "npz", "digits"} <= set(SOURCES)
    with pytest.raises(DataError, match="cifar10") as info:
        load_source("cifar11")
    assert "digits" in str(info.value) and "npz" in str(info.value)


def test_unknown_option_is_a_data_error():
    with pytest.raises(DataError, match="test_per_class"):
        load_source("digits", test_per_klass=5)


# ---------------------------------------------------------------- npz

def _npz_arrays(**changes):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8),
                  y_train=np.array([0, 1, 2, 0, 1, 2], dtype=np.int64),
                  x_test=rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8),
                  y_test=np.array([2, 1, 0], dtype=np.int64),
                  class_names=np.array(["a", "b", "c"]))
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def _write_npz(tmp_path, **changes):
    path = tmp_path / "set.npz"
    np.savez(path, **_npz_arrays(**changes))
    return path


def test_npz_round_trip(tmp_path):
    arrays = _npz_arrays()
    d = load_source("npz", path=_write_npz(tmp_path))
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(d, key), arrays[key])
    assert d.class_names == ["a", "b", "c"] and d.num_classes == 3 and d.name == "set"


def test_npz_defaults_and_grayscale(tmp_path):
    path = _write_npz(tmp_path, class_names=None, x_train=np.zeros((6, 4, 5), np.uint8),
                      x_test=np.zeros((3, 4, 5), np.uint8), y_train=np.array([0, 1, 3, 0, 1, 2], np.int32))
    d = load_source("npz", path=path)
    assert d.x_train.shape == (6, 4, 5, 1) and d.x_test.shape == (3, 4, 5, 1)
    assert d.class_names == ["0", "1", "2", "3"] and d.y_train.dtype == np.int64


@pytest.mark.parametrize("changes, message", [
    (dict(y_test=None), "y_test"),
    (dict(x_train=np.zeros((6, 4, 5, 3), np.float32)), "x_train.*uint8"),
    (dict(x_test=np.zeros((3, 20), np.uint8)), "x_test.*shape"),
    (dict(x_test=np.zeros((3, 3, 4, 5), np.uint8)), "x_test.*channels last"),
    (dict(y_train=np.array([0.0, 1, 2, 0, 1, 2])), "y_train.*integer"),
    (dict(y_train=np.zeros((6, 1), np.int64)), "y_train.*1-D"),
    (dict(y_train=np.array([0, 1, 2, 0, 1], np.int64)), "y_train.*5 labels for 6 images"),
    (dict(y_test=np.array([2, 1, 3], np.int64)), r"y_test.*\[0, 3\)"),
    (dict(y_test=np.array([2, -1, 0], np.int64)), "y_test.*>= 0"),
    (dict(x_test=np.zeros((3, 5, 5, 3), np.uint8)), "x_test"),
    (dict(class_names=np.array([1, 2, 3])), "class_names"),
])
def test_npz_validation(tmp_path, changes, message):
    path = _write_npz(tmp_path, **changes)
    with pytest.raises(DataError, match=message) as info:
        load_source("npz", path=path)
    assert str(path) in str(info.value)


def test_npz_object_array_is_refused_without_pickle(tmp_path):
    path = _write_npz(tmp_path, class_names=np.array(["a", "b", None], dtype=object))
    with pytest.raises(DataError, match="class_names"):
        load_source("npz", path=path)


def test_npz_missing_or_not_a_zip(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_source("npz", path=tmp_path / "absent.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"hello")
    with pytest.raises(DataError, match="bad.npz"):
        load_source("npz", path=bad)


@pytest.mark.skipif(not SHARED_CIFAR10.is_file(), reason="shared CIFAR-10 copy not available")
def test_shared_cifar10_npz():
    d = load_source("npz", path=SHARED_CIFAR10)
    assert d.x_train.shape == (50000, 32, 32, 3) and d.x_test.shape == (10000, 32, 32, 3)
    assert d.num_classes == 10 and d.class_names[0] == "airplane"


# ---------------------------------------------------------------- digits

def test_digits_split():
    d = load_source("digits")
    assert d.x_train.shape[1:] == (8, 8, 1) and d.x_train.dtype == np.uint8
    assert len(d.x_train) + len(d.x_test) == 1797 and len(d.y_train) == len(d.x_train)
    assert np.bincount(d.y_test, minlength=10).tolist() == [50] * 10
    assert d.x_train.max() == 255 and d.class_names == [str(c) for c in range(10)]

    again = load_source("digits", seed=0)
    np.testing.assert_array_equal(d.x_test, again.x_test)
    np.testing.assert_array_equal(d.y_train, again.y_train)
    other = load_source("digits", seed=1, test_per_class=20)
    assert len(other.x_test) == 200 and not np.array_equal(other.x_test, d.x_test[:200])


def test_digits_split_covers_every_image_once():
    from sklearn.datasets import load_digits
    images = [img.tobytes() for img in np.rint(load_digits().images * 255 / 16).astype(np.uint8)]
    d = load_source("digits", test_per_class=30, seed=3)
    train = [x[..., 0].tobytes() for x in d.x_train]
    test = [x[..., 0].tobytes() for x in d.x_test]
    assert sorted(train + test) == sorted(images)  # disjoint, and together the whole set
    remaining = iter(images)
    assert all(img in remaining for img in train)  # training set keeps the original order


def test_digits_bad_test_per_class():
    with pytest.raises(DataError, match="test_per_class"):
        load_source("digits", test_per_class=10_000)
