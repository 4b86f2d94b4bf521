"""Every bad input a hostile new user tried gets a named error: each case runs the CLI in a subprocess and must exit
with status 2, name the key or file at fault, print no traceback, and leave the files it was given as they were."""
import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs/digits_lt/pgd_at.yaml")
TINY = ["--set", "model.backbone_args.width=8", "--set", "train.epochs=1", "--set", "train.lr_milestones=[]"]


def train(*extra):
    return ["train", DIGITS, *TINY, *extra]


NPZ = ["--set", "data.source=npz", "--set", "data.source_args={{}}", "--set", "data.n_max=null"]


def npz_train(path_key):
    return train(*NPZ, "--set", f"data.path={{{path_key}}}", "--out", "{tmp}/npz_run")


# (id, argv with {placeholders} for fixture paths, text the error must contain)
CASES = [
    # ---- train: the config file and --set
    ("config-missing", ["train", "{tmp}/nope.yaml", "--out", "{tmp}/r"], "nope.yaml"),
    ("config-not-utf8", ["train", "{latin1_yaml}", "--out", "{tmp}/r"], "latin1.yaml"),
    ("config-bad-yaml", ["train", "{bad_yaml}", "--out", "{tmp}/r"], "bad.yaml"),
    ("config-not-mapping", ["train", "{list_yaml}", "--out", "{tmp}/r"], "list.yaml"),
    ("set-unclosed-list", train("--set", "train.lr_milestones=[1,", "--out", "{tmp}/r"), "train.lr_milestones"),
    ("set-no-equals", train("--set", "train.epochs", "--out", "{tmp}/r"), "train.epochs"),
    ("set-unknown-key", train("--set", "train.epoch=3", "--out", "{tmp}/r"), "train.epoch"),
    ("set-epochs-text", train("--set", "train.epochs=abc", "--out", "{tmp}/r"), "train.epochs"),
    ("epochs-zero", train("--set", "train.epochs=0", "--out", "{tmp}/r"), "train.epochs"),
    ("batch-size-zero", train("--set", "train.batch_size=0", "--out", "{tmp}/r"), "train.batch_size"),
    ("lr-overflow", train("--set", "train.lr=1e400", "--out", "{tmp}/r"), "train.lr"),
    ("lr-negative", train("--set", "train.lr=-0.1", "--out", "{tmp}/r"), "train.lr"),
    ("seed-too-large", train("--set", "seed=4294967296", "--out", "{tmp}/r"), "seed"),
    ("seed-negative", train("--set", "seed=-1", "--out", "{tmp}/r"), "seed"),
    ("momentum-one", train("--set", "train.momentum=1.0", "--out", "{tmp}/r"), "train.momentum"),
    ("unknown-loss", train("--set", "train.loss=focall", "--out", "{tmp}/r"), "train.loss"),
    ("unknown-head", train("--set", "model.head=cosinus", "--out", "{tmp}/r"), "model.head"),
    ("unknown-framework", train("--set", "train.framework=pgd", "--out", "{tmp}/r"), "train.framework"),
    ("loss-arg-unknown", train("--set", "train.loss_args={{gama: 2}}", "--out", "{tmp}/r"), "train.loss_args.gama"),
    ("loss-arg-text", train("--set", "train.loss=robal", "--set", "train.loss_args={{s: abc}}", "--out", "{tmp}/r"),
     "train.loss_args"),
    ("framework-arg-text", train("--set", "train.framework=trades", "--set", "train.framework_args={{beta: x}}",
                                 "--out", "{tmp}/r"), "train.framework_args"),
    ("backbone-width-negative", train("--set", "model.backbone_args.width=-4", "--out", "{tmp}/r"),
     "model.backbone_args"),
    ("backbone-arg-unknown", train("--set", "model.backbone_args.depth=3", "--out", "{tmp}/r"),
     "model.backbone_args.depth"),
    ("channels-mismatch", train("--set", "model.backbone_args.in_channels=3", "--out", "{tmp}/r"), "in_channels"),
    ("device-cuda", train("--set", "device=cuda", "--out", "{tmp}/r"), "device"),
    ("device-unknown", train("--set", "device=tpu9", "--out", "{tmp}/r"), "device"),
    ("attack-eps-nan", train("--set", "train.attack.eps=.nan", "--out", "{tmp}/r"), "train.attack.eps"),
    ("attack-eps-negative", train("--set", "train.attack.eps=-0.1", "--out", "{tmp}/r"), "train.attack.eps"),
    ("attack-steps-text", train("--set", "train.attack.steps=many", "--out", "{tmp}/r"), "train.attack.steps"),
    ("milestone-outside", train("--set", "train.lr_milestones=[5]", "--out", "{tmp}/r"), "train.lr_milestones"),
    ("inference-nan", train("--set", "inference=[{{name: logit_adjust, tau: .nan}}]", "--out", "{tmp}/r"),
     "inference"),
    ("inference-unknown", train("--set", "inference=[{{name: tau_nrom}}]", "--out", "{tmp}/r"), "tau_nrom"),
    ("ratio-empties-a-class", train("--set", "data.imbalance_ratio=1e6", "--out", "{tmp}/r"),
     "data.imbalance_ratio"),
    ("init-from-missing", train("--set", "train.init_from={tmp}/none.pt", "--out", "{tmp}/r"), "train.init_from"),
    ("init-from-not-checkpoint", train("--set", "train.init_from={latin1_yaml}", "--out", "{tmp}/r"),
     "latin1.yaml"),
    ("out-is-a-file", train("--out", "{a_file}"), "a_file.txt"),
    ("out-not-a-run", train("--out", "{decoy}", "--overwrite"), "not a robal run directory"),
    ("resume-nothing", train("--out", "{tmp}/empty_run", "--resume"), "nothing to resume"),
    ("existing-run", train("--out", "{run}"), "already exists"),
    # ---- train: data files
    ("npz-missing", train(*NPZ, "--set", "data.path={tmp}/none.npz", "--out", "{tmp}/npz_run"), "none.npz"),
    ("npz-not-zip", npz_train("latin1_yaml"), "latin1.yaml"),
    ("npz-crc-corrupt", npz_train("crc_npz"), "crc.npz"),
    ("npz-pickled-members", npz_train("object_npz"), "object.npz"),
    ("npz-missing-key", npz_train("nokey_npz"), "x_test"),
    ("npz-wrong-shape", npz_train("flat_npz"), "x_train"),
    ("npz-float-pixels", npz_train("float_npz"), "x_train"),
    ("npz-class-absent", npz_train("absent_npz"), "class 2"),
    ("npz-tiny-images", npz_train("tiny_npz"), "model"),
    ("cifar-crafted-pickle", train("--set", "data.source=cifar10", "--set", "data.source_args={{}}",
                                   "--set", "data.n_max=null", "--set", "data.path={crafted_cifar}",
                                   "--out", "{tmp}/r"), "data_batch_1"),
    # ---- eval
    ("eval-missing-target", ["eval", "{tmp}/no_run"], "no_run"),
    ("eval-corrupt-checkpoint", ["eval", "{corrupt_pt}"], "corrupt.pt"),
    ("eval-meta-without-config", ["eval", "{noconfig_pt}"], "config"),
    ("eval-unknown-attack", ["eval", "{run}", "--attacks", "clean,pgd7"], "pgd7"),
    ("eval-n-test-negative", ["eval", "{run}", "--n-test", "-10"], "--n-test"),
    ("eval-n-test-zero", ["eval", "{run}", "--n-test", "0"], "--n-test"),
    ("eval-n-test-not-multiple", ["eval", "{run}", "--n-test", "7"], "--n-test"),
    ("eval-n-test-too-many", ["eval", "{run}", "--n-test", "100000"], "--n-test"),
    ("eval-eps-negative", ["eval", "{run}", "--eps", "-1"], "--eps"),
    ("eval-eps-nan", ["eval", "{run}", "--eps", "nan"], "--eps"),
    ("eval-eps-inf", ["eval", "{run}", "--eps", "inf"], "--eps"),
    ("eval-tau-p-nan", ["eval", "{run}", "--tau-p", "nan"], "--tau-p"),
    ("eval-batch-size-zero", ["eval", "{run}", "--batch-size", "0"], "--batch-size"),
    ("eval-checks-n-zero", ["eval", "{run}", "--checks-n", "0"], "--checks-n"),
    ("eval-inference-bad-yaml", ["eval", "{run}", "--inference", "{{bad"], "--inference"),
    ("eval-inference-not-list", ["eval", "{run}", "--inference", "5"], "--inference"),
    ("eval-inference-nan", ["eval", "{run}", "--inference", "[{{name: tau_norm, tau: .nan}}]"], "tau"),
    ("eval-json-unwritable", ["eval", "{run}", "--json", "{a_file}/out.json"], "out.json"),
    ("eval-json-is-directory", ["eval", "{run}", "--json", "{decoy}"], "my_project"),
    ("eval-data-path-missing", ["eval", "{npz_run}", "--data-path", "{tmp}/gone.npz"], "gone.npz"),
    ("eval-empty-test-set", ["eval", "{npz_run}", "--data-path", "{empty_test_npz}"], "x_test"),
    # ---- report, adjust, tune-tau, demo
    ("report-missing", ["report", "{tmp}/no_run"], "no_run"),
    ("report-not-json", ["report", "{latin1_yaml}"], "latin1.yaml"),
    ("report-malformed-json", ["report", "{bad_eval_json}"], "bad_eval.json"),
    ("report-out-directory", ["report", "{good_eval_json}", "--out", "{decoy}"], "my_project"),
    ("adjust-inference-missing", ["adjust", "{run}", "--inference-file", "{tmp}/none.yaml", "--out", "{tmp}/a.pt"],
     "none.yaml"),
    ("adjust-inference-nan", ["adjust", "{run}", "--inference-file", "{nan_inference}", "--out", "{tmp}/a.pt"],
     "tau"),
    ("adjust-inference-not-list", ["adjust", "{run}", "--inference-file", "{bad_yaml}", "--out", "{tmp}/a.pt"],
     "bad.yaml"),
    ("adjust-out-directory", ["adjust", "{run}", "--inference-file", "{good_inference}", "--out", "{decoy}"],
     "my_project"),
    ("tune-tau-candidates-text", ["tune-tau", "{run}", "--candidates", "abc"], "--candidates"),
    ("tune-tau-candidates-nan", ["tune-tau", "{run}", "--candidates", "0,nan"], "--candidates"),
    ("tune-tau-no-validation-split", ["tune-tau", "{run}"], "val_per_class"),
    ("demo-epochs-zero", ["demo", "--epochs", "0"], "--epochs"),
    ("demo-out-file", ["demo", "--out", "{a_file}"], "a_file.txt"),
]


def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8),
              "y_train": np.repeat(np.arange(3), 20), "x_test": rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8),
              "y_test": np.repeat(np.arange(3), 10)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    f = {"tmp": str(tmp)}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp / "run"
    subprocess.run([sys.executable, "-m", "robal", *train("--out", str(run), "--quiet")], check=True, env=env,
                   capture_output=True)
    f["run"] = str(run)
    good_npz = write_npz(tmp / "good.npz")
    npz_run = tmp / "npz_run_ok"
    subprocess.run([sys.executable, "-m", "robal", *train(*[a.format() for a in NPZ], "--set", f"data.path={good_npz}",
                                                          "--set", "data.imbalance_ratio=2", "--out", str(npz_run),
                                                          "--quiet")], check=True, env=env, capture_output=True)
    f["npz_run"] = str(npz_run)
    (tmp / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp / "bad.yaml").write_text("train: {epochs: 3\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "a_file.txt").write_text("keep me")
    decoy = tmp / "my_project"
    decoy.mkdir()
    (decoy / "notes.txt").write_text("notes")
    good = tmp / "crc.npz"
    write_npz(good)
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("x_train.npy")
    start = info.header_offset + 30 + len(info.filename) + 200  # inside x_train's pixel bytes
    raw[start:start + 8] = bytes(8 * [0x5A])
    good.write_bytes(bytes(raw))
    np.savez(tmp / "object.npz", x_train=np.array([object(), 1], dtype=object), y_train=np.zeros(2, int),
             x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.zeros(2, int))
    write_npz(tmp / "nokey.npz", x_test=None)
    write_npz(tmp / "flat.npz", x_train=np.zeros((60, 64), np.uint8))
    write_npz(tmp / "float.npz", x_train=np.zeros((60, 8, 8, 1), np.float32))
    write_npz(tmp / "absent.npz", y_train=np.repeat([0, 1, 3], 20), y_test=np.repeat(np.arange(4), 10)[:30])
    write_npz(tmp / "tiny.npz", x_train=np.zeros((60, 1, 1, 1), np.uint8), x_test=np.zeros((30, 1, 1, 1), np.uint8))
    write_npz(tmp / "empty_test.npz", x_test=np.zeros((0, 8, 8, 1), np.uint8), y_test=np.zeros(0, np.int64))
    for name in ("crc", "object", "nokey", "flat", "float", "absent", "tiny", "empty_test"):
        f[f"{name}_npz"] = str(tmp / f"{name}.npz")
    cifar = tmp / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)

    class Crafted:
        def __reduce__(self):
            return (os.system, (f"touch {tmp}/pwned",))
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (cifar / name).write_bytes(pickle.dumps({b"data": Crafted()} if name == "data_batch_1" else {}, protocol=2))
    f["crafted_cifar"] = str(tmp / "cifar")
    (tmp / "corrupt.pt").write_bytes((run / "model.pt").read_bytes()[:3000])
    f["corrupt_pt"] = str(tmp / "corrupt.pt")
    import torch
    ckpt = torch.load(run / "model.pt", weights_only=True)
    del ckpt["meta"]["config"]
    torch.save(ckpt, tmp / "noconfig.pt")
    f["noconfig_pt"] = str(tmp / "noconfig.pt")
    (tmp / "bad_eval.json").write_text(json.dumps({"attacks": {"clean": {"accuracy": "high"}}}))
    f["bad_eval_json"] = str(tmp / "bad_eval.json")
    subprocess.run([sys.executable, "-m", "robal", "eval", str(run), "--attacks", "clean", "--checks", "none",
                    "--json", str(tmp / "good_eval.json")], check=True, env=env, capture_output=True)
    f["good_eval_json"] = str(tmp / "good_eval.json")
    (tmp / "nan_inference.yaml").write_text("inference: [{name: logit_adjust, tau: .nan}]\n")
    (tmp / "good_inference.yaml").write_text("inference: [{name: logit_adjust, tau: 0.5}]\n")
    for key in ("latin1_yaml", "bad_yaml", "list_yaml", "nan_inference", "good_inference"):
        f[key] = str(tmp / key.replace("_yaml", ".yaml").replace("_inference", "_inference.yaml"))
    f["a_file"], f["decoy"] = str(tmp / "a_file.txt"), str(decoy)
    return f


def snapshot(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def run_case(case, files):
    name, argv, expected = case
    argv = [a.format(**files) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "robal", *argv], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=files["tmp"])
    return name, argv, expected.format(**files), proc


def test_at_least_sixty_distinct_bad_inputs():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_every_bad_input_gets_a_named_error_and_loses_nothing(files):
    watched = [Path(files[k]) for k in ("run", "npz_run", "decoy")]
    before = [snapshot(p) for p in watched] + [Path(files["a_file"]).read_text()]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda c: run_case(c, files), CASES))
    failures = []
    for name, argv, expected, proc in outcomes:
        out = proc.stdout + proc.stderr
        if proc.returncode != 2 or "Traceback" in out or expected not in proc.stderr:
            failures.append(f"{name}: exit {proc.returncode}, expected '{expected}' in stderr\n  robal "
                            f"{' '.join(argv)}\n  {out.strip()[-600:]}")
    rejected = len(CASES) - len(failures)
    print(f"bad inputs rejected with a named error: {rejected} of {len(CASES)}")
    assert not failures, f"{len(failures)} of {len(CASES)} bad inputs not named:\n" + "\n".join(failures)
    assert [snapshot(p) for p in watched] + [Path(files["a_file"]).read_text()] == before
    assert not (Path(files["tmp"]) / "pwned").exists()
