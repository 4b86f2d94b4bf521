"""scripts/gpu_check.sh --device cpu --tiny: the prepared GPU check runs every step on the CPU (issue 30), so the
script a scarce GPU session runs has run before. About two minutes."""
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["gpu_tests", "torchrun_train", "torchrun_eval", "bench_train_fp32", "bench_train_bf16", "bf16_tiny"]


def test_gpu_check_tiny_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBAL_TEST_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(out), "--device", "cpu", "--tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    lines = {line.split()[0]: line for line in summary.splitlines()}
    assert list(lines) == STEPS and all(" ok " in line for line in lines.values()), summary

    suite = ET.parse(out / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 7 and suite.get("failures") == suite.get("errors") == suite.get("skipped") == "0"
    evaluation = json.loads((out / "torchrun_eval.json").read_text())
    assert evaluation["n_test"] == 500 and {"clean", "pgd20"} <= set(evaluation["attacks"])
    assert evaluation["attacks"]["pgd20"]["accuracy"] <= evaluation["attacks"]["clean"]["accuracy"]
    bf16 = json.loads((out / "bf16_tiny.json").read_text())
    assert 0.5 < bf16["gradients"]["sign_agreement"] <= 1 and -1 <= bf16["gradients"]["cosine_min"] <= 1
    for precision in ("fp32", "bf16"):
        assert {"clean", "pgd20", "aa-paper"} <= set(bf16[precision])
    for name in ("bench_train_fp32", "bench_train_bf16"):
        text = (out / f"{name}.txt").read_text()
        assert "images/s" in text and "robal/reference" in text
    assert "amp=bf16" in (out / "bench_train_bf16.txt").read_text()
    assert "torch" in (out / "env.txt").read_text()
