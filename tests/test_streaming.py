"""The streaming loader and the decoded-image cache: the same batches as the in-memory loader, bit-exact resume."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robal.config import load_config
from robal.data import build_train_loader, prepare_data
from robal.data import folder as folder_module
from robal.data.folder import ImageFiles
from robal.data.streaming import StreamingLoader
from robal.train.checkpoint import read_checkpoint


def write_folder(root: Path, train_counts=(40, 30, 24), test_per_class=4, size=8, seed=0) -> Path:
    """Smooth coloured blobs per class (learnable), RGB PNGs, uneven classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, counts in (("train", train_counts), ("test", [test_per_class] * len(train_counts))):
        for c, n in enumerate(counts):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cy, cx = rng.uniform(1, size - 1, 2)
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
                image = rng.integers(0, 40, (size, size, 3)) + (200 * blob)[..., None] * np.eye(3)[c]
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / split / f"class{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("stream") / "images")


def data_cfg(root, *extra):
    return load_config(None, ["data.source=folder", f"data.root={root}", "data.imbalance_ratio=4",
                              "data.crop_padding=2", *extra]).data


def batches(loader, epochs=2):
    return [(x.clone(), y.clone()) for _ in range(epochs) for x, y in loader]


@pytest.mark.parametrize("extra", [
    [],
    ["data.crop=random_resized", "data.crop_scale=[0.3, 1.0]", "data.val_per_class=2"],
    ["data.augment=randaugment", "data.flip=false"],
], ids=["pad-crop", "random-resized", "randaugment"])
@pytest.mark.parametrize("sampler", ["random", "class_balanced", "class_aware"])
def test_streaming_yields_the_in_memory_batches(images, extra, sampler):
    memory = data_cfg(images, *extra)
    streaming = data_cfg(images, "data.loader=streaming", "data.workers=2", *extra)
    a, b = prepare_data(memory), prepare_data(streaming)
    assert isinstance(a.x_train, np.ndarray) and isinstance(b.x_train, ImageFiles)  # files until a batch needs them
    assert a.mean == b.mean and a.std == b.std and a.class_counts == b.class_counts
    assert np.array_equal(a.x_val, b.x_val) and np.array_equal(a.x_test, b.x_test)
    assert np.array_equal(a.x_train, np.asarray(b.x_train)) and np.array_equal(a.y_train, b.y_train)
    ref = build_train_loader(memory, a, 16, "cpu", sampler, seed=3)
    stream = build_train_loader(streaming, b, 16, "cpu", sampler, seed=3)
    assert isinstance(stream, StreamingLoader) and len(stream) == len(ref)
    rng = torch.get_rng_state()
    got, want = batches(stream), batches(ref)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random starts draw from it: left untouched
    assert len(got) == len(want) >= 2 * len(ref)  # class_aware draws more than once per image
    for (x, y), (x0, y0) in zip(got, want):
        assert torch.equal(y, y0) and torch.equal(x, x0)
    assert torch.equal(stream.x[:5], ref.x[:5])  # the trainer's logit-scale probe reads loader.x[:256]
    assert torch.equal(stream.generator.get_state(), ref.generator.get_state())


def test_streaming_decodes_in_worker_processes(images, monkeypatch):
    """With workers the main process decodes no training image; with 0 it decodes each batch itself."""
    cfg, cfg0 = (data_cfg(images, "data.loader=streaming", f"data.workers={n}") for n in (2, 0))
    data, data0 = prepare_data(cfg), prepare_data(cfg0)  # (decodes the test images and the normalisation's)
    calls = []
    real = folder_module.decode_image
    monkeypatch.setattr(folder_module, "decode_image", lambda *a, **k: (calls.append(os.getpid()), real(*a, **k))[1])
    loader = build_train_loader(cfg, data, 16, "cpu", seed=0)
    assert sum(len(y) for _, y in loader) == len(data.y_train)
    assert calls == []  # the workers decoded (their calls went to their own copies of the list)
    assert sum(len(y) for _, y in build_train_loader(cfg0, data0, 16, "cpu", seed=0)) == len(data.y_train)
    assert len(calls) == len(data.y_train) and set(calls) == {os.getpid()}


def test_the_cache_decodes_once_and_follows_changed_files(images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = prepare_data(data_cfg(images, f"data.cache={cache}"))
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(f.startswith("images-") and f.endswith(".npy") for f in files)  # train, test

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder_module, "decode_image", no_decoding)
    again = prepare_data(data_cfg(images, f"data.cache={cache}"))
    assert np.array_equal(first.x_train, again.x_train) and np.array_equal(first.x_test, again.x_test)
    streaming = data_cfg(images, f"data.cache={cache}", "data.loader=streaming", "data.workers=2")
    streamed = batches(build_train_loader(streaming, prepare_data(streaming), 16, "cpu", seed=1), epochs=1)
    in_memory = batches(build_train_loader(data_cfg(images), first, 16, "cpu", seed=1), epochs=1)
    assert all(torch.equal(x, x0) and torch.equal(y, y0) for (x, y), (x0, y0) in zip(streamed, in_memory))
    monkeypatch.undo()
    test_image = images / "test/class0/000.png"
    os.utime(test_image, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file: a new cache entry
    prepare_data(data_cfg(images, f"data.cache={cache}"))
    assert len(list(cache.iterdir())) == 3


def test_a_damaged_cache_file_is_named(images, tmp_path):
    cache = tmp_path / "cache"
    prepare_data(data_cfg(images, f"data.cache={cache}"))
    victim = sorted(cache.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(Exception, match=rf"{victim.name}: cannot read the decoded-image cache .* delete the file"):
        prepare_data(data_cfg(images, f"data.cache={cache}"))


def test_streaming_and_cache_keys_are_validated(tmp_path):
    from robal.registry import ConfigError

    with pytest.raises(ConfigError, match=r"data.loader: must be one of memory, streaming; got 'disk'"):
        load_config(None, ["data.source=folder", f"data.root={tmp_path}", "data.loader=disk"])
    with pytest.raises(ConfigError, match=r"data.cache: only the folder, tiny_imagenet sources decode images"):
        load_config(None, ["data.source=digits", "data.cache=/tmp/x"])


# ---------------------------------------------------------------- a killed streaming run resumes bit for bit

RUN = """
name: stream_resume
device: cpu
data: {{source: folder, root: {root}, subset: long_tailed, imbalance_ratio: 4, crop_padding: 1, loader: {loader},
        workers: {workers}}}
model: {{backbone: small_cnn, backbone_args: {{width: 8, in_channels: 3}}}}
train:
  attack: {{eps: 0.1, step_size: 0.05, steps: 2}}
  epochs: 4
  lr_milestones: [2]
  batch_size: 4
  checkpoint_every: 1
  channels_last: false
"""


def start(config, out, *extra, kill_at_fsync=None):
    """robal train in its own process group; with kill_at_fsync=N, SIGKILLed inside its N-th fsync (the N-th
    checkpoint write, before the rename: tests/kill_wrapper.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBAL_TEST_THREADS": "1"}
    cli = [sys.executable, "-m", "robal"]
    if kill_at_fsync is not None:
        env.update(KILL_TARGET="os:fsync", KILL_AT=str(kill_at_fsync))
        cli = [sys.executable, str(Path(__file__).with_name("kill_wrapper.py"))]
    return subprocess.Popen([*cli, "train", str(config), "--out", str(out), "--quiet", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc):
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    return output


def test_a_killed_streaming_run_resumes_bit_for_bit(images, tmp_path):
    configs = {}
    for loader, workers in (("memory", 0), ("streaming", 2)):
        configs[loader] = tmp_path / f"{loader}.yaml"
        configs[loader].write_text(RUN.format(root=images, loader=loader, workers=workers))
    ref = start(configs["memory"], tmp_path / "ref")
    killed = start(configs["streaming"], tmp_path / "killed", kill_at_fsync=3)  # writing epoch 3's checkpoint
    output = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, output
    try:
        os.killpg(killed.pid, signal.SIGKILL)  # its loader workers, if any outlived it
    except ProcessLookupError:
        pass
    finish(ref)
    assert sorted(p.name for p in (tmp_path / "killed").glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt"]
    resumed = finish(start(configs["streaming"], tmp_path / "killed", "--resume"))
    assert "resuming from" in resumed
    a = read_checkpoint(tmp_path / "ref/model.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "killed/model.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # = the in-memory run, uninterrupted
