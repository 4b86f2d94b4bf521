"""Evaluate any model: `robal.evaluate(model, data)` and `robal eval --model module:factory --data ...` give the
numbers robal's own path gives for the same weights, take data in every documented form, and name bad input."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robal
from robal.cli import main
from robal.evaluate.runner import evaluate_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits_lt/pgd_at.yaml"
EPS, STEP = 0.1, 0.025


class Outside(nn.Module):
    """A plain module around the weights: no spec, no num_classes, no robal head attributes; it needs NCHW-
    contiguous input (it flattens with .view, as many user models do)."""

    def __init__(self, inner):
        super().__init__()
        self.layers = nn.ModuleList([inner])

    def forward(self, x):
        assert x.is_contiguous(), "robal handed a channels_last tensor to a model that calls .view"
        return self.layers[0](x.view(x.shape))


@pytest.fixture(scope="module")
def robal_way(digits_run, digits_data):
    """The digits model evaluated the robal way (evaluate_model on its checkpoint's counts)."""
    _, _, model = digits_run
    return evaluate_model(model, digits_data.x_test, digits_data.y_test, ["pgd20"], EPS, STEP,
                          digits_data.class_counts, batch_size=100, progress=False)


def same_numbers(a, b, attacks=("clean", "pgd20")):
    for name in attacks:
        assert a["attacks"][name]["predictions"] == b["attacks"][name]["predictions"], name
        assert a["attacks"][name]["per_class"] == b["attacks"][name]["per_class"]


def test_outside_model_through_the_api_equals_the_robal_way(digits_run, digits_data, robal_way):
    _, cfg, model = digits_run
    outside = Outside(model)
    result = robal.evaluate(outside, cfg, attacks=("clean", "pgd20"), eps=EPS, step_size=STEP, batch_size=100,
                            checks="none")
    same_numbers(result, robal_way)
    assert result["class_counts"] == digits_data.class_counts and result["groups_rule"] == robal_way["groups_rule"]
    # a plain callable, uint8 arrays without counts: the same predictions, groups left out and said so
    bare = robal.evaluate(lambda x: model(x), (digits_data.x_test, digits_data.y_test), attacks=("pgd20",),
                          eps=EPS, step_size=STEP, batch_size=100, checks="none")
    same_numbers(bare, robal_way)
    assert bare["class_counts"] is None and bare["attacks"]["pgd20"]["groups"] is None
    assert "groups left out" in bare["groups_rule"]
    # float NCHW tensors and a torch Dataset of (image, label)
    x = torch.from_numpy(digits_data.x_test).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(digits_data.y_test)
    for data in ((x, y), torch.utils.data.TensorDataset(x, y)):
        r = robal.evaluate(outside, data, attacks=("clean",), checks="none", eps=EPS, class_counts=
                           digits_data.class_counts)
        same_numbers(r, robal_way, ("clean",))


def test_write_report_writes_json_markdown_and_plots(digits_run, digits_data, tmp_path):
    _, _, model = digits_run
    result = robal.evaluate(Outside(model), (digits_data.x_test, digits_data.y_test), attacks=("clean",),
                            n_test=100, checks="none", eps=EPS)
    written = robal.write_report(result, tmp_path)
    assert {p.name for p in written} >= {"eval.json", "eval.md", "eval_per_class.png"}
    assert json.loads((tmp_path / "eval.json").read_text())["n_test"] == 100
    assert "Per class" in (tmp_path / "eval.md").read_text()


@pytest.mark.parametrize("model, data, message", [
    (lambda x: x.flatten(1)[:, :3], None, "3 logits per image but the test labels span 10"),
    (lambda x: x.sum(), None, "expected logits of shape"),
    (lambda x: 1 / 0, None, "ZeroDivisionError"),
    (None, "text", "expected a config path"),
    (None, (np.zeros((4, 8, 8, 1), np.float64) + 2, np.zeros(4, np.int64)), "expected [0, 1]"),
    (None, (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(3, np.int64)), "for 3 labels"),
])
def test_bad_models_and_data_are_named(digits_run, digits_data, model, data, message):
    from robal.registry import ConfigError

    model = model or digits_run[2]
    data = (digits_data.x_test, digits_data.y_test) if data is None else (5 if data == "text" else data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        robal.evaluate(model, data, attacks=("clean",), checks="none")


FACTORY = '''
import torch
from torch import nn

def load(path, width=8):
    model = torch.load(path, weights_only=False)
    assert isinstance(model, nn.Module)
    return model.eval()

def not_a_module():
    return 5
'''


def test_cli_model_factory_equals_the_robal_way(digits_run, digits_data, robal_way, tmp_path, monkeypatch,
                                                capsys):
    _, _, model = digits_run
    (tmp_path / "my_models.py").write_text(FACTORY)
    torch.save(Outside(model), tmp_path / "outside.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "my_models:load", "--model-args", "{path: outside.pt}", "--data", str(DIGITS),
                 "--attacks", "clean,pgd20", "--eps", str(EPS), "--batch-size", "100", "--checks", "none",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    same_numbers(result, robal_way)
    assert (tmp_path / "eval.md").is_file() and not (tmp_path / "eval.json.partial").exists()
    for argv, message in ((["--model", "no_such_module:load"], "cannot import module 'no_such_module'"),
                          (["--model", "my_models:missing"], "has no attribute 'missing'"),
                          (["--model", "my_models:not_a_module"], "returned a int, not a torch.nn.Module"),
                          (["--model", "my_models"], "expected package.module:factory"),
                          (["--model", "my_models:load", "--model-args", "[1"], "--model-args")):
        assert main(["eval", *argv, "--data", str(DIGITS), "--json", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_readme_user_loop_and_outside_model_example(tmp_path):
    """The README shows examples/train_my_model.py as written and the eval command on examples/my_model.py."""
    readme = (ROOT / "README.md").read_text()
    loop = (ROOT / "examples/train_my_model.py").read_text()
    body = loop.split('"""', 2)[2].strip()
    assert body in readme, "README's user-loop example differs from examples/train_my_model.py"
    work = tmp_path / "work"
    (work / "examples").mkdir(parents=True)
    for name in ("train_my_model.py", "my_model.py"):
        (work / "examples" / name).write_text((ROOT / "examples" / name).read_text())
    done = subprocess.run([sys.executable, "examples/train_my_model.py", "1"], cwd=work, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (work / "examples/digits_cnn.pt").is_file()
    command = re.search(r"^(robal eval --model examples\.my_model:load .*)$", readme, re.M).group(1)
    argv = command.split()[1:]
    argv[argv.index("--json") + 1] = str(tmp_path / "out.json")
    argv[argv.index("--attacks") + 1] = "clean"
    argv[argv.index("--data") + 1] = str(DIGITS)
    ev = subprocess.run([sys.executable, "-m", "robal", *argv, "--checks", "none"], cwd=work, capture_output=True,
                        text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "out.json").read_text())["n_test"] == 500
