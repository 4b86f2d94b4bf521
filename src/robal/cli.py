"""robal train | eval | report | adjust | tune-tau | split | demo  (see README.md)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def _add_train(sub):
    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("config", help="YAML config, e.g. configs/cifar10_lt/pgd_at.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--out", help="run directory (required unless --dry-run)")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help="continue the run in --out from its last good checkpoint (same config required); "
                        "'--resume auto': continue it if there is one, else start it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory (with --resume: continue it with a changed config)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and class counts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_launcher(p)
    p.set_defaults(func=cmd_train)


def _add_launcher(p):
    p.add_argument("--launcher", default="none", choices=["none", "torchrun"],
                   help="torchrun: start --nproc processes on this machine (torchrun --standalone) and run this "
                        "command data-parallel in them; the same as `torchrun --nproc-per-node N -m robal ...`")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes for --launcher torchrun (default: the number of GPUs)")


def _relaunched(args) -> int | None:
    """With --launcher torchrun (and not already under torchrun): run this command again through torchrun,
    return its exit code."""
    import os
    import subprocess

    if args.launcher != "torchrun" or "WORLD_SIZE" in os.environ:
        return None
    from .distributed import torchrun_command

    command = torchrun_command(args.argv, args.nproc)
    print("running python " + " ".join(command[1:]), flush=True)
    return subprocess.call(command)


def cmd_train(args) -> int:
    from .config import load_config
    from . import distributed

    code = _relaunched(args)
    if code is not None:
        return code
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from .data import prepare_data

        if distributed.env_context().main:
            data = prepare_data(cfg.data)
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            print(f"class counts ({sum(data.class_counts)} images): {data.class_counts}")
        return 0
    if not args.out:
        raise SystemExit("robal train: --out RUN_DIR is required")
    from .train.trainer import train

    train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if distributed.current().main:
        print(f"saved {Path(args.out) / 'model.pt'}")
    distributed.cleanup()
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint under attacks")
    p.add_argument("target", help="run directory or checkpoint (.pt)")
    p.add_argument("--attacks", default="clean,pgd20",
                   help="comma-separated: clean, fgsm, pgd20, mim, cw, aa, aa-paper, aa:apgd-ce+square, ...")
    p.add_argument("--n-test", type=int, default=None, help="stratified test subset of N images (N/C per class)")
    p.add_argument("--json", help="where to write the result (default: RUN_DIR/eval.json)")
    p.add_argument("--eps", type=float, default=None, help="L-inf radius (default: the config's eval.eps)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--data-path", default=None, help="override data.path of the training config")
    p.add_argument("--inference", default=None, metavar="YAML",
                   help="replace the inference-time adjustments, e.g. \"[{name: tau_norm, tau: 1.0}]\"")
    p.add_argument("--tau-p", type=float, default=None,
                   help="boundary adjustment: set tau of the logit_adjust step (added if absent)")
    p.add_argument("--checks", default="basic", choices=["none", "basic", "full"],
                   help="reliability checks: basic (default; PGD steps/eps sanity, logit scale, zero gradients, "
                        "PGD vs AutoAttack), full (adds a black-box Square attack), none")
    p.add_argument("--checks-n", type=int, default=200,
                   help="images in the fixed stratified test subset the checks attack (default 200)")
    _add_launcher(p)
    p.set_defaults(func=cmd_eval)


def inference_overrides(spec_inference: list[dict], inference_yaml: str | None, tau_p: float | None) -> list[dict]:
    """The adjustments to evaluate with: the checkpoint's own, replaced by --inference, then --tau-p applied."""
    from .registry import ConfigError

    inference = [dict(i) for i in spec_inference]
    if inference_yaml is not None:
        inference = yaml.safe_load(inference_yaml) or []
        if not isinstance(inference, list):
            raise ConfigError(f"--inference: expected a YAML list of adjustments, got {inference_yaml!r}")
    if tau_p is not None:
        from .evaluate.tune import with_tau

        inference = with_tau(inference, tau_p)
    return inference


def open_run(target, data_path: str | None = None):
    """A run directory or checkpoint: its checkpoint path, meta and training config (data.path overridable)."""
    from .config import Config, from_dict
    from .train.checkpoint import read_checkpoint, resolve_model_path

    path = resolve_model_path(target)
    meta = read_checkpoint(path)["meta"]
    cfg = from_dict(Config, meta["config"])
    if data_path:
        cfg.data.path = data_path
    return path, meta, cfg


def cmd_eval(args) -> int:
    from .data import prepare_data
    from .evaluate.attacks import is_known_attack, known_attacks
    from .evaluate.checks import format_checks, run_checks
    from .evaluate.report import write_eval_outputs
    from .evaluate.runner import evaluate_model
    from .evaluate.table import format_table
    from .train.checkpoint import load_model
    from . import distributed

    code = _relaunched(args)
    if code is not None:
        return code
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    for a in attacks:
        if not is_known_attack(a):
            raise SystemExit(f"robal eval: unknown attack '{a}'; known: {', '.join(known_attacks())}")
    path, meta, cfg = open_run(args.target, args.data_path)
    # under torchrun: this rank's device; each rank attacks its batches of the test set, rank 0 writes
    ctx, device = distributed.setup(args.device or cfg.device)
    model = load_model(path, device)
    if args.inference is not None or args.tau_p is not None:
        model.set_inference(inference_overrides(model.spec["inference"], args.inference, args.tau_p))
    data = distributed.main_first(prepare_data, cfg.data)
    eps = cfg.eval.eps if args.eps is None else args.eps
    batch = args.batch_size or cfg.eval.batch_size
    result = evaluate_model(model, data.x_test, data.y_test, attacks, eps, cfg.eval.step_size,
                            model.spec["class_counts"], batch, device, args.n_test, cfg.eval.seed,
                            progress=ctx.main, shard=ctx.shard)
    if not ctx.main:  # the reliability checks and the files: rank 0 alone
        distributed.cleanup()
        return 0
    result.update({"checkpoint": str(path), "inference": model.spec["inference"],
                   "inference_overridden": args.inference is not None or args.tau_p is not None,
                   "class_names": model.spec.get("class_names"), "train_logit_scale": meta.get("logit_scale")})
    if args.checks != "none":
        print(f"running the {args.checks} reliability checks ({args.checks_n} images) ...")
    result["checks"] = run_checks(model, data.x_test, data.y_test, result, args.checks, args.checks_n, batch, device)
    result["checks_level"] = args.checks
    print(format_table(result, model.spec.get("class_names")))
    print(format_checks(result["checks"]))
    out = Path(args.json) if args.json else (Path(args.target) if Path(args.target).is_dir() else path.parent) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    written = write_eval_outputs(result, out)
    print(f"wrote {out}, " + ", ".join(p.name for p in written))
    distributed.cleanup()
    return 0


def _add_report(sub):
    p = sub.add_parser("report", help="one table across evaluated runs (Clean, PGD-20, AA, gap, flags)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (their eval.json) or eval JSON files")
    p.add_argument("--out", help="write the table to this Markdown file, and a clean-vs-AA plot beside it (.png)")
    p.add_argument("--baseline", metavar="RUN_DIR",
                   help="a baseline run (or eval JSON), e.g. PGD-AT: add each row's PGD-20 and AA gains over it and "
                        "flag PGD-20 gains that AutoAttack does not confirm")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from .evaluate.report import write_report

    print(write_report(args.runs, args.out, args.baseline), end="")
    if args.out:
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def _add_tune_tau(sub):
    p = sub.add_parser("tune-tau", help="choose RoBal's tau_p on the run's held-out validation split")
    p.add_argument("run", help="run directory trained with data.val_per_class > 0")
    p.add_argument("--candidates", default="0,0.05,0.1,0.2,0.3,0.5,0.75,1.0,1.5,2.0",
                   help="comma-separated tau_p values")
    p.add_argument("--attack", default="pgd20", help="robust accuracy under this attack (default pgd20)")
    p.add_argument("--criterion", default="mean", choices=["mean", "robust", "clean"],
                   help="pick the tau_p maximising (clean + robust) / 2, robust or clean accuracy")
    p.add_argument("--json", help="where to write the table (default: RUN/tune_tau.json)")
    p.set_defaults(func=cmd_tune_tau)


def cmd_tune_tau(args) -> int:
    from .data import prepare_data
    from .evaluate.tune import tune_tau
    from .train.checkpoint import load_model
    from .train.trainer import resolve_device

    path, _, cfg = open_run(args.run)
    device = resolve_device(cfg.device)
    model = load_model(path, device)
    data = prepare_data(cfg.data)
    candidates = [float(c) for c in args.candidates.split(",")]
    try:
        result = tune_tau(model, data.x_val, data.y_val, candidates, args.attack, cfg.eval.eps,
                          cfg.eval.step_size, cfg.eval.batch_size, device, args.criterion)
    except ValueError as err:
        raise SystemExit(f"robal tune-tau: {err}")
    print(f"validation split: {result['n_val']} held-out training images; attack {args.attack}")
    print(f"{'tau_p':>6} {'clean':>7} {args.attack:>7} {'score':>7}")
    for row in result["candidates"]:
        print(f"{row['tau_p']:>6.2f} {row['clean']:>7.2f} {row[args.attack]:>7.2f} {row['score']:>7.2f}")
    print(f"best tau_p = {result['best_tau_p']} (criterion: {args.criterion}); evaluate with "
          f"`robal eval {args.run} --tau-p {result['best_tau_p']}`")
    out = Path(args.json) if args.json else path.parent / "tune_tau.json"
    out.write_text(json.dumps(result, indent=1))
    return 0


def _add_adjust(sub):
    p = sub.add_parser("adjust", help="write a checkpoint with new inference-time adjustments (post-hoc methods)")
    p.add_argument("target", help="run directory or checkpoint (.pt), e.g. runs/cifar10_lt/pgd_at")
    p.add_argument("--inference-file", required=True, metavar="YAML",
                   help="YAML file holding an `inference:` list (or a bare list) that replaces the checkpoint's, "
                        "e.g. configs/cifar10_lt/posthoc/tau_norm.yaml")
    p.add_argument("--out", required=True, help="the new checkpoint (.pt)")
    p.set_defaults(func=cmd_adjust)


def read_inference_file(path) -> list[dict]:
    """The `inference:` list of a YAML file; a file holding a bare list is taken as it is."""
    from .registry import ConfigError

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--inference-file {path}: cannot read it ({err})") from None
    inference = data.get("inference") if isinstance(data, dict) else data
    if not isinstance(inference, list):
        raise ConfigError(f"--inference-file {path}: expected an `inference:` list of adjustments")
    return inference


def cmd_adjust(args) -> int:
    """Same weights, new adjustments in the spec: `robal.load_model(OUT)` predicts with them. The meta keeps
    the trained model's logit scale, so `robal eval`'s logit_scale check flags a post-hoc rescaling."""
    from .train.checkpoint import atomic_save, load_model, model_checkpoint, read_checkpoint, resolve_model_path

    path = resolve_model_path(args.target)
    meta = dict(read_checkpoint(path)["meta"])
    model = load_model(path)
    model.set_inference(read_inference_file(args.inference_file))
    meta["adjusted_from"] = str(path)
    if isinstance(meta.get("config"), dict):
        meta["config"] = {**meta["config"], "inference": model.spec["inference"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(model_checkpoint(model, meta), out)
    print(f"wrote {out}: {path} predicting with inference {model.spec['inference']}")
    return 0


def _add_split(sub):
    p = sub.add_parser("split", help="write the training images a config chooses as a split file (folder data)")
    p.add_argument("config", help="YAML config (data.source: folder or tiny_imagenet), or a packaged config's name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.root=DIR (repeatable)")
    p.add_argument("--out", required=True, help="the split file to write (`relative/path label` lines)")
    p.set_defaults(func=cmd_split)


def cmd_split(args) -> int:
    from .config import load_config
    from .data.split_command import write_training_split

    path, counts = write_training_split(load_config(args.config, args.overrides).data, args.out, args.config)
    print(f"wrote {path}: {sum(counts)} training images, per class {counts}")
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="long-tailed digits: PGD-AT vs RoBal in about a minute on a CPU")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--epochs", type=int, default=None, help="override the configs' epochs (for a quicker look)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_report, _add_tune_tau, _add_adjust, _add_split, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.sources import DataError
    from .registry import ConfigError
    from .train.checkpoint import CheckpointError
    from .train.trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --launcher torchrun
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, FileExistsError, FileNotFoundError) as err:
        if not getattr(err, "reported_by_rank0", False):  # under torchrun, rank 0's errors are printed once
            print(f"robal {args.command}: error: {err}", file=sys.stderr, flush=True)
        if getattr(err, "raised_on_all_ranks", False):  # every rank stops here, after rank 0 has printed it
            from . import distributed

            distributed.barrier()
            distributed.cleanup()
        return 2


if __name__ == "__main__":
    sys.exit(main())
