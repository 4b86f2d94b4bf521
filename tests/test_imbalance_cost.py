"""The cost of imbalance: balanced subsets with a matched total, and plain (non-adversarial) training."""
import numpy as np
import pytest
import torch

from robal.config import load_config
from robal.data import prepare_data, subsample_indices
from robal.demo import builtin_config


def _npz(tmp_path, per_class=30, classes=4):
    rng = np.random.RandomState(0)
    y = np.repeat(np.arange(classes), per_class)
    x = rng.randint(0, 256, (len(y), 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    return path, x, y


def test_matched_balanced_subset_has_the_long_tailed_total_spread_evenly(tmp_path):
    path, x, y = _npz(tmp_path)
    sets = [f"data.path={path}", "data.n_max=20", "data.imbalance_ratio=4"]
    lt = prepare_data(load_config(None, ["data.source=npz", *sets]).data)
    bal = prepare_data(load_config(None, ["data.source=npz", *sets, "data.subset=matched_balanced"]).data)
    assert lt.class_counts == [20, 12, 7, 5] and sum(lt.class_counts) == 44
    assert bal.class_counts == [11, 11, 11, 11]
    # the images are the seeded recipe's picks for those counts
    expected = subsample_indices(y, [11] * 4, seed=0)
    assert np.array_equal(bal.x_train, x[expected])
    full = prepare_data(load_config(None, ["data.source=npz", *sets, "data.subset=full"]).data)
    assert full.class_counts == [30] * 4


def test_cifar10_matched_balanced_counts():
    from robal.data import matched_balanced_counts, long_tailed_counts

    assert matched_balanced_counts(sum(long_tailed_counts(5000, 10, 50)), 10) == [1400] * 10


def test_unknown_subset_names_the_key():
    from robal.registry import ConfigError

    with pytest.raises(ConfigError, match=r"data.subset: unknown subset 'balanced'"):
        load_config(None, ["data.source=digits", "data.subset=balanced"])


def test_plain_training_has_no_robustness_on_digits(tmp_path):
    from robal.attacks import pgd
    from robal.train.trainer import train

    cfg = load_config(builtin_config("digits_lt/plain.yaml"),
                      ["train.epochs=15", "train.lr_milestones=[]", "model.backbone_args.width=16"])
    model = train(cfg, tmp_path / "plain", progress=False).eval()
    data = prepare_data(cfg.data)
    x = torch.from_numpy(data.x_test).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data.y_test)
    eps = 2 * cfg.eval.eps
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, eps, eps / 4, 20)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    assert clean > 0.8
    assert robust < 0.03


def test_per_class_comparison_orders_classes_by_long_tailed_counts(tmp_path):
    """scripts/compare_per_class.py: head-3 / tail-3 are the classes with the most / fewest long-tailed training
    images, whatever their index, also for a balanced run listed first."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "compare_per_class.py"
    spec = importlib.util.spec_from_file_location("compare_per_class", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def result(counts, clean, pgd):
        return {"class_counts": counts, "n_test": 60, "class_names": list("abcdef"),
                "attacks": {"clean": {"accuracy": float(np.mean(clean)), "per_class": clean},
                            "pgd20": {"accuracy": float(np.mean(pgd)), "per_class": pgd}}}

    balanced = result([10] * 6, [60, 50, 40, 30, 20, 10], [6, 5, 4, 3, 2, 1])
    long_tailed = result([5, 50, 20, 100, 1, 2], [10, 80, 40, 90, 0, 20], [1, 8, 4, 9, 0, 2])
    files = []
    for name, r in (("bal", balanced), ("lt", long_tailed)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        files.append(f"{name}={tmp_path / name}.json")
    runs = script.load_runs(files)
    order, counts = script.class_order(runs)
    assert list(order) == [3, 1, 2, 0, 5, 4] and counts == long_tailed["class_counts"]
    rows = [[c.strip() for c in line.strip("| ").split("|")] for line in script.table(runs, order).splitlines()[2:]]
    # balanced: head = classes 3,1,2 -> clean (30+50+40)/3, tail = classes 0,5,4 -> (60+10+20)/3
    assert rows[0][3:5] == ["40.00", "30.00"] and rows[0][6:8] == ["4.00", "3.00"]
    assert rows[1][3:5] == ["70.00", "10.00"] and rows[1][6:8] == ["7.00", "1.00"]
    script.write_plot(runs, order, counts, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    clean_only = [[c.strip() for c in line.strip("| ").split("|")]
                  for line in script.table(runs, order, attacks=("clean",)).splitlines()]
    assert clean_only[0] == ["run", "n_test", "clean overall", "clean head-3", "clean tail-3"]
    assert clean_only[3][2:] == [f"{np.mean(long_tailed['attacks']['clean']['per_class']):.2f}", "70.00", "10.00"]
    with pytest.raises(SystemExit, match="no \\['aa'\\] results"):
        script.load_runs(files, attacks=("clean", "aa"))
    with pytest.raises(SystemExit, match="LABEL=EVAL_JSON"):
        script.load_runs([str(tmp_path / "bal.json")])
