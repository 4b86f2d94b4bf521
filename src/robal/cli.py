"""robal train | eval | report | adjust | tune-tau | split | export | zoo | demo  (see README.md)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml


def _add_train(sub):
    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("config", help="YAML config file, or the name of a config packaged with robal, "
                                  "e.g. configs/cifar10_lt/pgd_at.yaml or cifar10_lt/pgd_at")
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
    from .config import config_warnings, load_config
    from . import distributed

    code = _relaunched(args)
    if code is not None:
        return code
    cfg = load_config(args.config, args.overrides)
    for warning in config_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    from .train.trainer import Trainer, train

    if args.dry_run:  # data, model, loss and framework built and tried on one batch; nothing written
        data = Trainer(cfg, None, progress=False).data
        if distributed.current().main:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            print(f"class counts ({sum(data.class_counts)} images): {data.class_counts}")
        distributed.cleanup()
        return 0
    if not args.out:
        raise SystemExit("robal train: --out RUN_DIR is required")

    train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if distributed.current().main:
        print(f"saved {Path(args.out) / 'model.pt'}")
    distributed.cleanup()
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint under attacks")
    p.add_argument("target", nargs="?", help="run directory, checkpoint (.pt) or zoo:NAME (`robal zoo`); or use "
                                             "--model and --data")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="evaluate a model robal did not train: package.module:factory returning an nn.Module that "
                        "maps [0, 1] NCHW images to logits (weights loaded by your code); needs --data and --json")
    p.add_argument("--model-args", default=None, metavar="YAML", help="keyword arguments of the factory, e.g. "
                   "\"{checkpoint: weights.pt}\"")
    p.add_argument("--data", metavar="CONFIG_OR_NPZ", help="with --model: a robal config (its data section) or an "
                   ".npz with x_test and y_test")
    p.add_argument("--class-counts", default=None, metavar="LIST_OR_FILE",
                   help="with --model: training images per class (5000,3237,... or a .json/.yaml list) for the "
                        "many/medium/few groups (a config's own counts are used by default)")
    p.add_argument("--attacks", default="clean,pgd20",
                   help="comma-separated: clean, fgsm, pgd20, mim, cw, aa, aa-paper, aa-10step, aa-plus, "
                        "aa:apgd-ce+square, ...")
    p.add_argument("--n-test", type=int, default=None, help="stratified test subset of N images (N/C per class)")
    p.add_argument("--json", help="where to write the result (default: RUN_DIR/eval.json)")
    p.add_argument("--eps", type=float, default=None, help="L-inf radius (default: the config's eval.eps)")
    p.add_argument("--step-size", type=float, default=None,
                   help="step of PGD-20, MIM and CW (default: the config's eval.step_size; with --eps, eps / 4, "
                        "which is 2/255 at 8/255)")
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
        try:
            inference = yaml.safe_load(inference_yaml) or []
        except yaml.YAMLError as err:
            raise ConfigError(f"--inference {inference_yaml!r} is not YAML ({str(err).splitlines()[0]}); e.g. "
                              f"\"[{{name: tau_norm, tau: 1.0}}]\"") from None
        if not isinstance(inference, list):
            raise ConfigError(f"--inference: expected a YAML list of adjustments, got {inference_yaml!r}")
    if tau_p is not None and not math.isfinite(tau_p):
        raise ConfigError(f"--tau-p {tau_p}: expected a finite number, e.g. 0.1")
    if tau_p is not None:
        from .evaluate.tune import with_tau

        inference = with_tau(inference, tau_p)
    return inference


def eval_step_size(eps: float | None, step_size: float | None, config_step: float) -> float:
    """The PGD step of an evaluation: --step-size, else eps / 4 when --eps changes the radius (the step keeps its
    ratio to eps: 2/255 at 8/255), else the config's."""
    if step_size is not None:
        return step_size
    return config_step if eps is None else eps / 4


def open_run(target, data_path: str | None = None):
    """A run directory or checkpoint: its checkpoint path, meta and training config (data.path overridable)."""
    from .config import Config, from_dict
    from .train.checkpoint import CheckpointError, read_checkpoint, resolve_model_path

    path = resolve_model_path(target)
    meta = read_checkpoint(path)["meta"]
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint {path}: its meta holds no training config, so robal does not know its "
                              f"data; evaluate it with `robal eval --model ... --data CONFIG_OR_NPZ` instead")
    cfg = from_dict(Config, meta["config"])
    if data_path:
        cfg.data.path = data_path
    return path, meta, cfg


def cmd_eval(args) -> int:
    from .data import prepare_data
    from .evaluate.attacks import is_known_attack, known_attacks
    from .evaluate.checks import format_checks, run_checks
    from .evaluate.report import write_eval_outputs
    from .evaluate.resume import clear_state, state_dir_for
    from .evaluate.runner import evaluate_model
    from .evaluate.settings import check_eval_settings, check_output_file, default_eval_json
    from .evaluate.table import format_table
    from .registry import ConfigError
    from .train.checkpoint import load_model
    from . import distributed

    code = _relaunched(args)
    if code is not None:
        return code
    if args.model or args.data:
        return eval_outside_model(args)
    if not args.target:
        raise ConfigError("robal eval: give a run directory or checkpoint, or --model MODULE:FACTORY --data ...")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    for a in attacks:
        if not is_known_attack(a):
            raise ConfigError(f"--attacks: unknown attack '{a}'; known: {', '.join(known_attacks())}")
    path, meta, cfg = open_run(args.target, args.data_path)
    # under torchrun: this rank's device; each rank attacks its batches of the test set, rank 0 writes
    ctx, device = distributed.setup(args.device or cfg.device)
    model = load_model(path, device)
    if args.inference is not None or args.tau_p is not None:
        model.set_inference(inference_overrides(model.spec["inference"], args.inference, args.tau_p))
    data = distributed.main_first(prepare_data, cfg.data)
    eps = cfg.eval.eps if args.eps is None else args.eps
    batch = cfg.eval.batch_size if args.batch_size is None else args.batch_size
    step = eval_step_size(args.eps, args.step_size, cfg.eval.step_size)
    for warning in check_eval_settings(eps, step, batch, args.n_test, len(model.spec["class_counts"]),
                                       len(data.y_test), args.checks_n):
        print(f"warning: {warning}")
    out = check_output_file(args.json or default_eval_json(args.target, path), "--json")
    for also in (out.with_suffix(".md"), out.parent / f"{out.stem}_per_class.png"):
        check_output_file(also, "--json (beside it)")
    state = state_dir_for(out)  # a killed evaluation, rerun with the same arguments, continues from here
    result = evaluate_model(model, data.x_test, data.y_test, attacks, eps, step,
                            model.spec["class_counts"], batch, device, args.n_test, cfg.eval.seed,
                            progress=ctx.main, shard=ctx.shard, state_dir=state,
                            fingerprint={"spec": model.spec})
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    written = write_eval_outputs(result, out)
    from .train.tensorboard_log import log_eval
    board = log_eval(path, cfg, meta, result, out)  # a run trained with train.tensorboard: its log gets these
    written += [board] if board else []
    clear_state(state)
    print(f"wrote {out}, " + ", ".join(p.name for p in written))
    distributed.cleanup()
    return 0


def eval_outside_model(args) -> int:
    """`robal eval --model module:factory --data CONFIG_OR_NPZ --json OUT`: the same outputs and checks as for a
    robal run, for a model robal did not train."""
    from .evaluate.api import evaluate, model_from_factory, parse_class_counts, write_report
    from .evaluate.resume import state_dir_for
    from .evaluate.settings import check_output_file
    from .evaluate.table import format_table
    from .evaluate.checks import format_checks
    from .registry import ConfigError

    if args.target or not (args.model and args.data and args.json):
        raise ConfigError("robal eval --model MODULE:FACTORY needs --data CONFIG_OR_NPZ and --json OUT.json, and "
                          "no run directory")
    out = check_output_file(args.json, "--json")
    try:
        model_args = yaml.safe_load(args.model_args) if args.model_args else {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--model-args {args.model_args!r} is not YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(model_args, dict):
        raise ConfigError(f"--model-args {args.model_args!r}: expected a mapping, e.g. \"{{depth: 18}}\"")
    model = model_from_factory(args.model, model_args)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    eps = 8 / 255 if args.eps is None else args.eps
    result = evaluate(model, args.data, attacks, parse_class_counts(args.class_counts), args.n_test, eps,
                      step_size=args.step_size, batch_size=500 if args.batch_size is None else args.batch_size, device=args.device,
                      checks=args.checks, checks_n=args.checks_n, state_dir=state_dir_for(out), progress=True)
    result.update({"checkpoint": f"{args.model}({model_args or ''})", "inference": [],
                   "inference_overridden": False})
    print(format_table(result, result.get("class_names")))
    print(format_checks(result["checks"]))
    written = write_report(result, out.parent, out.stem)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _add_report(sub):
    p = sub.add_parser("report", help="one table across evaluated runs (Clean, PGD-20, AA, gap, flags)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (their eval.json) or eval JSON files")
    p.add_argument("--out", help="write the table to this Markdown file, and a clean-vs-AA plot beside it (.png)")
    p.add_argument("--baseline", metavar="RUN_DIR",
                   help="a baseline run (or eval JSON), e.g. PGD-AT: add each row's PGD-20 and AA gains over it and "
                        "flag PGD-20 gains that AutoAttack does not confirm")
    p.add_argument("--leaderboard", action="store_true",
                   help="a leaderboard instead: model, data, eps, AutoAttack version and settings, n_test, clean, AA, "
                        "balanced robustness, worst class, tail-third AA, sorted by AA (--out FILE.md: also FILE.json)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from .evaluate.report import write_report

    if args.leaderboard:
        from .evaluate.leaderboard import write_leaderboard

        if args.baseline:
            raise SystemExit("robal report: --baseline does not apply to --leaderboard")
        print(write_leaderboard(args.runs, args.out), end="")
        if args.out:
            print(f"wrote {Path(args.out).with_suffix('.md')} and {Path(args.out).with_suffix('.json')}")
        return 0
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
    from .registry import ConfigError
    from .train.checkpoint import load_model
    from .train.trainer import resolve_device

    path, _, cfg = open_run(args.run)
    device = resolve_device(cfg.device)
    model = load_model(path, device)
    data = prepare_data(cfg.data)
    try:
        candidates = [float(c) for c in args.candidates.split(",")]
    except ValueError:
        candidates = []
    if not candidates or not all(math.isfinite(c) for c in candidates):
        raise ConfigError(f"--candidates {args.candidates!r}: expected comma-separated finite numbers, e.g. "
                          f"0,0.1,0.5,1.0")
    try:
        result = tune_tau(model, data.x_val, data.y_val, candidates, args.attack, cfg.eval.eps,
                          cfg.eval.step_size, cfg.eval.batch_size, device, args.criterion)
    except ValueError as err:
        raise ConfigError(str(err)) from None
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

    from .evaluate.settings import check_output_file

    out = check_output_file(args.out, "--out")
    path = resolve_model_path(args.target)
    meta = dict(read_checkpoint(path)["meta"])
    model = load_model(path)
    model.set_inference(read_inference_file(args.inference_file))
    meta["adjusted_from"] = str(path)
    if isinstance(meta.get("config"), dict):
        meta["config"] = {**meta["config"], "inference": model.spec["inference"]}
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


def _add_export(sub):
    p = sub.add_parser("export", help="a model as DIR/model.safetensors + DIR/model.json (loads without pickle)")
    p.add_argument("target", help="run directory, checkpoint (.pt) or zoo:NAME")
    p.add_argument("--format", default="safetensors", choices=["safetensors"])
    p.add_argument("--out", required=True, metavar="DIR", help="folder for model.safetensors and model.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/model.safetensors")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_model

    print("wrote " + ", ".join(map(str, export_model(args.target, args.out, args.format, args.overwrite))))
    return 0


def _add_zoo(sub):
    p = sub.add_parser("zoo", help="the models zoo:NAME names, their results and the JSONs those come from")
    p.set_defaults(func=cmd_zoo)


def cmd_zoo(args) -> int:
    from .zoo import format_table  # the index, the fetching and the table: robal/zoo.py

    print(format_table())
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="long-tailed digits: PGD-AT vs RoBal in about a minute on a CPU")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--epochs", type=int, default=None, help="override the configs' epochs (for a quicker look)")
    p.add_argument("--overwrite", action="store_true", help="replace the demo's runs in --out (robal runs only)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .registry import ConfigError

    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs}: expected at least 1")
    run_demo(args.out, args.epochs, args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="robal", description=__doc__)
    parser.add_argument("--version", action="version", version=f"robal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_report, _add_tune_tau, _add_adjust, _add_split, _add_export, _add_zoo,
                _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.sources import DataError
    from .evaluate.report import EvalFileError
    from .registry import ConfigError
    from .train.checkpoint import CheckpointError
    from .train.trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --launcher torchrun
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, EvalFileError, TrainingDiverged, FileExistsError,
            FileNotFoundError, NotADirectoryError) as err:
        if not getattr(err, "reported_by_rank0", False):  # under torchrun, rank 0's errors are printed once
            print(f"robal {args.command}: error: {err}", file=sys.stderr, flush=True)
        if getattr(err, "raised_on_all_ranks", False):  # every rank stops here, after rank 0 has printed it
            from . import distributed

            distributed.barrier()
            distributed.cleanup()
        return 2


if __name__ == "__main__":
    sys.exit(main())
