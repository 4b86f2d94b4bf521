"""Sharing and watching runs (issue 29): the model zoo (zoo:NAME, cache, sha256, `robal zoo`), `robal export
--format safetensors` (loads without pickle, same logits) and train.tensorboard (event files read back)."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import robal
from robal import zoo
from robal.cli import main
from robal.export import export_model
from robal.train.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model, shape=(6, 3, 32, 32), seed=0):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty ROBAL_HOME (the zoo's cache) for this test only."""
    monkeypatch.setenv("ROBAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def digits_zoo(digits_run, tmp_path, monkeypatch, home):
    """A private zoo index (ROBAL_ZOO_INDEX) whose one model, digits_lt/pgd_at, is served by a file:// URL."""
    remote = tmp_path / "remote"
    remote.mkdir()
    served = remote / "digits_pgd_at.pt"
    shutil.copy(digits_run[0] / "model.pt", served)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"format": zoo.FORMAT, "models": {"digits_lt/pgd_at": {
        "file": served.name, "url": served.as_uri(), "sha256": _sha(served), "size": served.stat().st_size}}}))
    monkeypatch.setenv("ROBAL_ZOO_INDEX", str(index))
    return served, home / "zoo" / "digits_lt" / "pgd_at.pt"


# ---------------------------------------------------------------- the zoo

def test_zoo_index_is_what_docs_results_say():
    """Every committed checkpoint has an entry whose sha256, size and numbers are those of docs/results now."""
    committed = json.loads(zoo.INDEX.read_text())
    fresh = zoo.build_index(RESULTS)
    assert committed == fresh, "zoo_index.json is stale: regenerate it with `python -m robal.zoo --write-index`"
    models = committed["models"]
    assert sorted(e["file"] for e in models.values()) == sorted(p.name for p in (RESULTS / "models").glob("*.pt"))
    e = models["cifar10_lt/robal_n"]
    full = json.loads((RESULTS / "robal_n.eval_full.json").read_text())
    aa = json.loads((RESULTS / "robal_n.eval_aa.json").read_text())
    assert e["results"]["clean"] == {"accuracy": full["attacks"]["clean"]["accuracy"], "n_test": 10000,
                                     "file": "robal_n.eval_full.json"}
    assert e["results"]["aa"] == {"accuracy": aa["attacks"]["aa"]["accuracy"], "n_test": 1000,
                                  "file": "robal_n.eval_aa.json"}
    assert e["url"] == zoo.REMOTE + "robal_n.pt" and e["config"] == "cifar10_lt/robal_n"
    assert models["cifar10_lt/pgd_at_seed1"]["config"] == "cifar10_lt/pgd_at" and \
        models["cifar10_lt/pgd_at_seed1"]["seed"] == 1


def test_zoo_name_is_served_offline_by_the_repository_copy(home, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the repository's own verified file should have been used")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    model = robal.load_model("zoo:cifar10_lt/robal_n")
    reference = robal.load_model(RESULTS / "models" / "robal_n.pt")
    assert torch.equal(_logits(model), _logits(reference))
    assert not home.exists()  # nothing downloaded, nothing cached


def test_zoo_downloads_through_the_cache_and_checks_sha256(digits_run, digits_zoo):
    served, cached = digits_zoo
    model = robal.load_model("zoo:digits_lt/pgd_at")
    assert cached.is_file() and _sha(cached) == _sha(served)
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary file left
    x_shape = (5, 1, 8, 8)
    assert torch.equal(_logits(model, x_shape), _logits(digits_run[2], x_shape))
    served.rename(served.with_suffix(".gone"))  # the cache serves it now
    assert zoo.fetch("digits_lt/pgd_at") == cached
    cached.write_bytes(cached.read_bytes()[:-10])  # a damaged cache file is not used: downloaded again
    served.with_suffix(".gone").rename(served)
    assert zoo.fetch("zoo:digits_lt/pgd_at") == cached and _sha(cached) == _sha(served)


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "longer"])
def test_a_corrupted_download_is_refused_and_removed(digits_zoo, damage):
    served, cached = digits_zoo
    data = bytearray(served.read_bytes())
    if damage == "flipped_byte":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncated":
        data = data[:-100]
    else:
        data += b"\0" * 100
    served.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match="does not match the zoo index .*refused and removed"):
        robal.load_model("zoo:digits_lt/pgd_at")
    assert not cached.exists() and list(cached.parent.iterdir()) == []
    # the CLI says so and exits 2
    assert main(["export", "zoo:digits_lt/pgd_at", "--out", str(served.parent / "x")]) == 2


def test_zoo_unknown_name_and_bad_index(tmp_path, monkeypatch, home):
    with pytest.raises(zoo.ZooError, match=r"zoo:cifar10_lt/robal_x is not in the model zoo.*did you mean "
                                           r"cifar10_lt/robal_"):
        robal.load_model("zoo:cifar10_lt/robal_x")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": zoo.FORMAT, "models": {"x/y": {"file": "y.pt", "url": "file:///y"}}}))
    monkeypatch.setenv("ROBAL_ZOO_INDEX", str(bad))
    with pytest.raises(zoo.ZooError, match=f"{bad}: models.x/y lacks sha256, size"):
        robal.load_model("zoo:x/y")


def test_robal_zoo_table_shows_the_json_numbers_and_their_files(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("cifar10_lt/robal_n "))
    full = json.loads((RESULTS / "robal_n.eval_full.json").read_text())["attacks"]
    aa = json.loads((RESULTS / "robal_n.eval_aa.json").read_text())["attacks"]
    for number in (f"{full['clean']['accuracy']:.2f} (10000)", f"{full['pgd20']['accuracy']:.2f} (10000)",
                   f"{aa['aa']['accuracy']:.2f} (1000)"):
        assert number in row
    assert "clean, PGD-20: robal_n.eval_full.json; AA-paper, AA: robal_n.eval_aa.json" in row
    assert "cifar10-LT rho 50" in row and "trades, robal, cosine" in row
    assert len([line for line in out.splitlines() if line.startswith("cifar10_lt/")]) == \
        len(list((RESULTS / "models").glob("*.pt")))


def test_robal_eval_takes_a_zoo_name(digits_run, digits_zoo, tmp_path, capsys):
    out = tmp_path / "eval_zoo.json"
    args = ["eval", "zoo:digits_lt/pgd_at", "--attacks", "clean", "--n-test", "50", "--checks", "none"]
    assert main(args) == 2 and "give --json OUT.json" in capsys.readouterr().err
    assert main([*args, "--json", str(out)]) == 0
    zoo_result = json.loads(out.read_text())
    assert zoo_result["checkpoint"] == str(digits_zoo[1])
    run_json = tmp_path / "eval_run.json"
    assert main(["eval", str(digits_run[0]), *args[2:], "--json", str(run_json)]) == 0
    assert zoo_result["attacks"] == json.loads(run_json.read_text())["attacks"]


# ---------------------------------------------------------------- safetensors export

def test_export_round_trip_gives_equal_logits_without_pickle(digits_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors")
    run = digits_run[0]
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    info = json.loads((out / "model.json").read_text())
    spec = torch.load(run / "model.pt", weights_only=True)["spec"]
    assert info["spec"]["inference"] == spec["inference"] and info["spec"]["class_counts"] == spec["class_counts"]
    assert info["meta"]["config"]["data"]["source"] == "digits"
    reference = robal.load_model(run)

    def no_pickle(*args, **kwargs):
        raise AssertionError("an export must load without torch.load (pickle)")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = robal.load_model(out)
    assert not loaded.training
    shape = (7, 1, 8, 8)
    assert torch.equal(_logits(loaded, shape), _logits(reference, shape))


def test_export_keeps_inference_adjustments_of_a_zoo_model(tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "robal_n"
    export_model("zoo:cifar10_lt/robal_n", out)
    loaded, reference = robal.load_model(out), robal.load_model("zoo:cifar10_lt/robal_n")
    assert [a["name"] for a in loaded.spec["inference"]] == ["scale", "logit_adjust"]
    assert torch.equal(_logits(loaded), _logits(reference))


def test_export_refuses_to_overwrite_and_detects_changed_weights(digits_run, tmp_path, capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / "export"
    target = str(digits_run[0] / "model.pt")
    assert main(["export", target, "--out", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main(["export", target, "--out", str(out)]) == 2
    assert "model.safetensors already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", target, "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]  # no temporaries
    data = bytearray(before)
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256 in"):
        robal.load_model(out)


def test_export_without_safetensors_names_the_extra(digits_run, tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    out = tmp_path / "export"
    export_model(digits_run[0], out)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r"needs the safetensors package.*pip install 'robal\[safetensors\]'"):
        robal.load_model(out)
    with pytest.raises(CheckpointError, match=r"robal\[safetensors\]"):
        export_model(digits_run[0], tmp_path / "other")


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_logs_training_and_eval(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from robal.config import load_config
    from robal.demo import builtin_config
    from robal.train.trainer import train
    from conftest import DIGITS_TINY

    run = tmp_path / "run"
    cfg = load_config(builtin_config("digits_lt/pgd_at.yaml"),
                      [*DIGITS_TINY, "train.epochs=2", "train.tensorboard=true"])
    train(cfg, run, progress=False)
    assert main(["eval", str(run), "--attacks", "clean,pgd20", "--n-test", "100", "--checks", "none"]) == 0

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "clean_acc", "adv_acc"):
        logged = events.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [1, 2]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in log], rel=1e-6)
    final = sorted(t for t in tags if t.startswith("final/test_clean_acc/") and not t.endswith("balanced"))
    assert final == [f"final/test_clean_acc/{c:02d}_{c}" for c in range(10)]
    evaluation = json.loads((run / "eval.json").read_text())
    for attack in ("clean", "pgd20"):
        e, = events.Scalars(f"eval/{attack}")
        assert e.step == 2 and e.value == pytest.approx(evaluation["attacks"][attack]["accuracy"])
        per_class = [events.Scalars(f"eval_per_class/{attack}/{c:02d}_{c}")[0].value for c in range(10)]
        assert per_class == pytest.approx(evaluation["attacks"][attack]["per_class"])
    # the event folder is robal's: the run can still be replaced with --overwrite
    train(load_config(builtin_config("digits_lt/pgd_at.yaml"), [*DIGITS_TINY, "train.epochs=1"]), run,
          overwrite=True, progress=False)


def test_tensorboard_missing_is_a_config_error_naming_key_and_extra(monkeypatch):
    from robal.config import load_config
    from robal.demo import builtin_config
    from robal.registry import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"train.tensorboard: true needs the tensorboard package.*"
                                          r"pip install 'robal\[tensorboard\]'"):
        load_config(builtin_config("digits_lt/pgd_at.yaml"), ["train.tensorboard=true"])
    load_config(builtin_config("digits_lt/pgd_at.yaml"), ["train.tensorboard=false"])  # off: not needed
