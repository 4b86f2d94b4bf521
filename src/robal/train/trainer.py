"""The config-driven trainer: one loop for every method (the method is the composition in the config)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from .. import distributed
from ..config import Config, from_dict
from ..data import build_train_loader, prepare_data
from ..losses import LOSSES
from ..models import build_model, explicit_head_args
from ..registry import ConfigError
from ..rundir import RunDirError, RunLock, check_replaceable, contents, discard_replaced, inside, set_aside
from .checkpoint import (CheckpointError, atomic_save, checkpoint_paths, latest_good_checkpoint, model_checkpoint,
                         prune, read_checkpoint, rng_state, set_rng_state)
from .frameworks import FRAMEWORKS, TrainingAttack, eval_mode  # noqa: F401 (re-exported)
from .guard import OverfitGuard
from .preflight import try_one_batch
from .stages import build_framework
from .tensorboard_log import RunBoard
from .weighting import WEIGHTINGS


LARGE_LOSS = 1e6  # a mean training loss above this is worth a warning (usually a learning rate far too large)


class TrainingDiverged(RuntimeError):
    """Non-finite loss or weights; the message names the epoch and batch."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' needs CUDA, which this torch ({torch.__version__}) cannot use here; "
                          f"set device: auto (a GPU when there is one) or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def scale_sample(labels: np.ndarray, n: int) -> np.ndarray:
    """Up to n indices, n // C of each class (all of a class that has fewer), the first ones of each class."""
    classes = np.unique(labels)
    per_class = max(1, n // len(classes))
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])


def step_lr(base_lr: float, epoch: int, milestones: list[int], gamma: float) -> float:
    """lr of 1-based `epoch`: base * gamma^(milestones reached); x0.1 at 60 and 75 means epochs 60-74 use 0.01."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def autocast_for(device: torch.device, amp: str):
    use = amp == "bf16"  # fp32 unless asked: no fp32-vs-bf16 evidence yet for the cosine head's KL term
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 fast (CUDA: as torch reports; CPU: oneDNN's check, true from AVX-512 on,
    avx512_bf16 / AMX in hardware). Without it autocast emulates bf16: on an AVX2 CPU a PreAct-ResNet-18 step ran
    13x slower than in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


def model_spec(cfg: Config, data) -> dict:
    return {"backbone": cfg.model.backbone, "backbone_args": dict(cfg.model.backbone_args),
            "head": cfg.model.head, "head_args": explicit_head_args(cfg.model.head, cfg.model.head_args),
            "class_counts": list(data.class_counts), "class_names": list(data.class_names),
            "mean": data.mean, "std": data.std, "inference": [dict(i) for i in cfg.inference]}


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        flat.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return flat


def config_differences(old: dict, new: dict) -> list[str]:
    """`key.path: old -> new` for every value that differs; options added since `old` was written take defaults."""
    try:
        old = from_dict(Config, old).to_dict()
    except ConfigError:
        pass  # it has an option removed since: compare as written
    old, new = (_flatten(yaml.safe_load(yaml.safe_dump(d))) for d in (old, new))
    unset = "<unset>"
    return [f"{k}: {old.get(k, unset)!r} -> {new.get(k, unset)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k, unset) != new.get(k, unset)]


def check_new_run_dir(out: Path, overwrite: bool) -> bool:
    """A new run may go into `out`: it is empty (False), or it is a robal run to replace with --overwrite (True)."""
    if not contents(out):
        return False
    if not overwrite:
        raise FileExistsError(f"run directory {out} already exists and is not empty; pass --resume to continue "
                              f"it or --overwrite to replace it")
    check_replaceable(out)
    return True


def prepare_run_dir(out: Path, config: dict, resume: bool | str, overwrite: bool, lock: RunLock | None = None) -> bool:
    """Check the run directory (and take its lock) before anything is written there; True when the run in it is
    to be continued.

    resume=False starts a new run: a non-empty `out` needs overwrite=True and must be a robal run holding only
    robal's files (rundir.py); it is set aside until the new run's first checkpoint. resume=True continues the run
    in `out`, which must exist; resume="auto" continues it if there is one, else starts a new one. A run is
    continued only with the config it was started with, unless overwrite=True.
    """
    out = Path(out)
    saved = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose a directory for the run")
    if resume is True and not saved.is_file():
        raise FileNotFoundError(f"nothing to resume: {out} holds no run (no config.yaml); leave out --resume "
                                f"to start one")
    continuing = bool(resume) and saved.is_file()
    if not continuing and out.is_dir():
        check_new_run_dir(out, overwrite)  # before the lock file goes into a folder that is not a run
    out.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire()
    if resume and saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{saved} is not valid YAML ({err}); pass --overwrite to start the run again") from None
        differences = config_differences(old if isinstance(old, dict) else {}, config)
        if differences and not overwrite:
            raise ConfigError(f"{out} was started with a different config ({'; '.join(differences)}); pass "
                              f"--overwrite to continue it with the new config, or choose another --out")
        if differences:
            print(f"warning: continuing {out} with a changed config: {'; '.join(differences)}")
        return True
    if check_new_run_dir(out, overwrite):
        aside = set_aside(out)
        print(f"replacing the run in {out}; the old run is kept in {aside} until the new run's first checkpoint")
    return False


def init_from_checkpoint(model, path: str, reset_head: bool = False) -> None:
    """Fine-tuning start: copy every matching tensor (an LWS head takes a linear head's weight and bias);
    with reset_head the head keeps its fresh initialisation (classifier re-training, cRT)."""
    state = read_checkpoint(path)["state_dict"]
    if reset_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not (k.endswith("class_scale") or (reset_head and k.startswith("head."))) for k in missing):
        raise ConfigError(f"train.init_from: {path} does not fit this model (missing {missing}, "
                          f"unexpected {unexpected})")


TRAINABLE = {
    "all": lambda model: model.parameters(),
    "head": lambda model: model.head.parameters(),
    "class_scale": lambda model: [model.head.class_scale],
}


class Trainer:
    def __init__(self, cfg: Config, out: str | Path | None, resume: bool | str = False, overwrite: bool = False,
                 progress: bool = True):
        """Builds everything and tries one training step on a copy of the model before the run directory `out`
        is touched; out=None (a dry run) stops there and writes nothing."""
        self.cfg, self.out = cfg, Path(out) if out is not None else None
        t = cfg.train
        if self.out is not None and overwrite and not resume and t.init_from and inside(t.init_from, self.out):
            raise ConfigError(f"train.init_from: {t.init_from} lies inside --out {self.out}, which --overwrite "
                              f"would replace; write the new run to another directory")
        # under torchrun: join the process group, this rank's device (robal/distributed.py)
        self.ctx, self.device = distributed.setup(cfg.device)
        self.progress = progress and self.ctx.main
        if t.amp == "bf16" and self.ctx.main and not native_bf16(self.device):
            print(f"warning: train.amp: bf16 on a {self.device.type} without bf16 support (a CPU needs AVX-512, best "
                  f"avx512_bf16 or AMX): autocast emulates it, slower than fp32 (13x on an AVX2 CPU); train.amp: off "
                  f"trains in fp32")
        seed_everything(cfg.seed)
        # rank 0 loads (or downloads) the data and sends it
        self.data = distributed.main_first(prepare_data, cfg.data)
        try:
            self.model = build_model(model_spec(cfg, self.data))
        except (RuntimeError, ValueError, TypeError) as err:
            raise ConfigError(f"model: the {cfg.model.backbone} backbone with the '{cfg.model.head}' head cannot be "
                              f"built from model.backbone_args {cfg.model.backbone_args} and model.head_args "
                              f"{cfg.model.head_args}: {type(err).__name__}: {err}") from None
        if t.init_from:
            init_from_checkpoint(self.model, t.init_from, t.reset_head)
        self.model.to(self.device)
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        try_one_batch(self.model, t, self.data.class_counts, self.data.x_train, self.data.y_train, self.device,
                      lambda: autocast_for(self.device, t.amp))
        if self.ctx.distributed and t.sync_bn:
            distributed.use_global_batchnorm(self.model)
        if t.compile:  # in place: state_dict keys and checkpoints stay as they are
            self.model.backbone.compile()
        params = list(TRAINABLE[t.trainable](self.model))
        if t.trainable == "class_scale" and not hasattr(self.model.head, "class_scale"):
            raise ConfigError("train.trainable: class_scale needs the 'lws' head")
        trainable_ids = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        # framework + loss + attack (with its eps budget), and the epoch-ranged train.stages (stages.py)
        self.framework = build_framework(t, self.data.class_counts, self.device)
        self.loss = self.framework.loss
        self.loader = build_train_loader(cfg.data, self.data, t.batch_size, self.device, t.sampler, seed=cfg.seed,
                                         channels_last=t.channels_last,
                                         shard=self.ctx.shard)  # each rank: its slice of every global batch
        self.guard = OverfitGuard.build(cfg, self.data, self.device, self.out, self.ctx.main)  # None unless set
        self.sync = distributed.GradientSync(self.model, params, self.ctx.world) if self.ctx.distributed else None
        self.start_epoch = 0
        self.skipped = 0  # non-finite batches skipped so far in this run (train.skip_nonfinite)
        self.lock = RunLock(self.out) if self.out is not None and self.ctx.main else None
        self.board = None  # train.tensorboard: RUN/tensorboard/ (tensorboard_log.py), on rank 0
        if self.out is None:
            return
        try:
            self._open(resume, overwrite)
            self.board = RunBoard.for_run(cfg, self.out, self.start_epoch) if self.ctx.main else None
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _open(self, resume: bool | str, overwrite: bool) -> None:
        """Lock the run directory, check or set aside what is there, resume, write the resolved config."""
        resume = distributed.main_first(prepare_run_dir, self.out, self.cfg.to_dict(), resume, overwrite, self.lock)
        if resume:
            self._resume()
        if self.ctx.main:  # only rank 0 writes in the run directory
            tmp = self.out / ".config.yaml.tmp"
            tmp.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            os.replace(tmp, self.out / "config.yaml")

    # ------------------------------------------------------------ state

    def _resume(self) -> None:
        """Model, optimiser, epoch (hence lr schedule), RNG and sampler state from the newest good checkpoint."""
        if self.ctx.main:
            for stale in self.out.glob(".*.tmp*"):  # left behind by a run killed while writing
                stale.unlink()
        found = distributed.main_first(latest_good_checkpoint, self.out)  # read by rank 0, sent to the others
        if found is None:
            if self.ctx.main:
                print(f"no checkpoint in {self.out} yet: starting the run from the beginning")
        else:
            path, ckpt = found
            try:
                self.model.load_state_dict(ckpt["state_dict"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
                set_rng_state(ckpt["rng"], self.loader.generator)
                self.start_epoch = int(ckpt["meta"]["epoch"])
                self.skipped = int(ckpt["meta"].get("skipped", 0))
            except (KeyError, RuntimeError, TypeError, ValueError) as err:
                raise CheckpointError(f"checkpoint {path} cannot be resumed from ({type(err).__name__}: "
                                      f"{str(err)[:300]})") from None
            if self.ctx.main:
                print(f"resuming from {path} (epoch {self.start_epoch} done)")
        if self.ctx.main:
            self._truncate_log(self.start_epoch)

    def _truncate_log(self, epoch: int) -> None:
        """Drop log records of epochs after `epoch` (and a line cut short by a kill): they are trained again."""
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        kept = []
        for line in log.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] <= epoch:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
        log.write_text("".join(kept))

    def meta(self, epoch: int) -> dict:
        return {"epoch": epoch, "config": self.cfg.to_dict(), "class_counts": self.data.class_counts,
                "class_names": self.data.class_names, "logit_scale": self.logit_scale(), "skipped": self.skipped}

    def save_epoch(self, epoch: int) -> None:
        ckpt = model_checkpoint(self.model, self.meta(epoch))
        ckpt["optimizer"] = self.optimizer.state_dict()
        ckpt["rng"] = rng_state(self.loader.generator)
        try:
            atomic_save(ckpt, self.out / f"epoch_{epoch:03d}.pt")
        except CheckpointError as err:
            raise CheckpointError(f"{err}; {self._kept()}") from None
        prune(self.out, self.cfg.train.keep_last)
        discard_replaced(self.out)  # the new run can be resumed now: the run it replaced goes

    @torch.no_grad()
    def logit_scale(self) -> float:
        """Mean std of the predicted logits over up to 256 training images, the same number of each class (the
        first ones of a class-ordered set are all of class 0): the scale attacks see."""
        idx = scale_sample(self.data.y_train, 256)
        x = torch.from_numpy(np.ascontiguousarray(self.data.x_train[idx])).permute(0, 3, 1, 2).float().div(255)
        with eval_mode(self.model):
            return self.model(x.to(self.device)).float().std(1).mean().item()

    def log(self, record: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:  # a view of log.jsonl, the record of truth
            self.board.epoch(record)

    # ------------------------------------------------------------ loop

    def train_epoch(self, epoch: int) -> dict:
        t = self.cfg.train
        lr = step_lr(t.lr, epoch + 1, t.lr_milestones, t.lr_gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        class_weight = WEIGHTINGS.build(t.weighting, t.weighting_args, "train.weighting_args",
                                        class_counts=self.data.class_counts, epoch=epoch)
        if class_weight is not None:
            class_weight = class_weight.to(self.device)
        self.framework.set_epoch(epoch)  # stages, class-wise eps budget, per-epoch state
        if self.ctx.distributed:  # each rank its own random starts, fixed by (seed, epoch, rank) for exact resume
            torch.manual_seed(distributed.epoch_seed(self.cfg.seed, epoch, self.ctx.rank))
        self.model.train()
        if t.frozen_bn:  # the fine-tune's backbone keeps its BatchNorm statistics
            self.model.backbone.eval()
        totals = torch.zeros(5, device=self.device)  # loss sum, clean right, clean seen, adv right, adv seen
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not self.progress, leave=False)
        start, skipped_before = time.perf_counter(), self.skipped
        for step, (x, y) in enumerate(bar):
            with autocast_for(self.device, t.amp):
                loss, z_clean, z_adv = self.framework(self.model, x, y, class_weight)
            if self.sync is not None:  # several ranks
                if len(y) == 0:  # an empty slice (a last global batch smaller than the world): mean over nothing
                    loss = torch.nan_to_num(loss)
                if not self._distributed_backward(loss, len(y)):
                    self._skip_or_stop(epoch, step)
                    continue
            elif not torch.isfinite(loss):
                self._skip_or_stop(epoch, step)
                continue
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()
            totals += self._batch_stats(loss, z_clean, z_adv, x, y, step)
            if step % t.stats_every == 0 and self.progress:
                bar.set_postfix(self._summary(totals), refresh=False)
        distributed.all_reduce_sum(totals)  # the global batches' statistics on every rank
        seconds = time.perf_counter() - start
        if not self._weights_finite():
            raise TrainingDiverged(f"non-finite weights at epoch {epoch + 1}, batch {len(self.loader)} (its last); "
                                   f"{self._kept()}")
        return {"epoch": epoch + 1, "lr": lr, **self._summary(totals), "skipped": self.skipped - skipped_before,
                "seconds": round(seconds, 2), "images_per_s": round(len(self.loader.y) / seconds, 1)}

    def _distributed_backward(self, loss, n_local: int) -> bool:
        """Backward of this rank's share of the global batch loss, then gradients averaged over ranks; False
        (gradients dropped on every rank) when any rank's loss is non-finite."""
        # each rank's mean over its slice, weighted so that the averaged gradient is the global batch mean's
        objective = loss * distributed.slice_weight(n_local, self.loader.global_batch, self.ctx.world)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if self.sync(objective):
            return True
        self.optimizer.zero_grad(set_to_none=True)
        return False

    def _kept(self) -> str:
        saved = checkpoint_paths(self.out)
        return f"the last good checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint was written yet"

    def _weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.model.parameters())

    def _skip_or_stop(self, epoch: int, step: int) -> None:
        """A batch with a non-finite loss: skipped (no optimiser step) while train.skip_nonfinite allows."""
        where = f"epoch {epoch + 1}, batch {step + 1}"
        if not self._weights_finite():
            raise TrainingDiverged(f"non-finite weights at {where}; {self._kept()}")
        limit = self.cfg.train.skip_nonfinite
        if self.skipped >= limit:
            budget = (f"all {limit} skips allowed by train.skip_nonfinite used" if limit else
                      "set train.skip_nonfinite to skip a few such batches")
            raise TrainingDiverged(f"non-finite loss at {where} ({budget}); {self._kept()}")
        self.skipped += 1
        if self.ctx.main:
            print(f"warning: non-finite loss at {where}: batch skipped ({self.skipped} of {limit} allowed)")

    def _batch_stats(self, loss, z_clean, z_adv, x, y, step):
        stats = torch.zeros(5, device=self.device)
        stats[0] = loss.detach() * len(y)
        if z_clean is None and step % self.cfg.train.stats_every == 0:
            with eval_mode(self.model), torch.no_grad():
                z_clean = self.model.training_logits(x)
        if z_clean is not None:
            stats[1], stats[2] = (z_clean.argmax(1) == y).sum(), len(y)
        if z_adv is not None:
            stats[3], stats[4] = (z_adv.argmax(1) == y).sum(), len(y)
        return stats

    @staticmethod
    def _summary(totals) -> dict:
        loss, c_right, c_seen, a_right, a_seen = totals.tolist()
        seen = max(a_seen, c_seen, 1)
        out = {"loss": round(loss / seen, 4) if seen else math.nan}
        if c_seen:
            out["clean_acc"] = round(100 * c_right / c_seen, 2)
        if a_seen:
            out["adv_acc"] = round(100 * a_right / a_seen, 2)
        return out

    def fit(self):
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self):
        t = self.cfg.train
        for epoch in range(self.start_epoch, t.epochs):
            record = self.train_epoch(epoch)
            if self.guard is not None and self.guard.after_epoch(self.model, epoch, record):
                break  # catastrophic overfitting: the last good checkpoint's weights restored (train/guard.py)
            if not self.ctx.main:  # only rank 0 writes logs and checkpoints
                continue
            self.log(record)
            if record["loss"] > LARGE_LOSS:
                print(f"warning: epoch {epoch + 1}: mean training loss {record['loss']:.3g} is above {LARGE_LOSS:g}; "
                      f"check train.lr ({record['lr']:g}) and the loss settings", file=sys.stderr)
            if self.progress:
                print(" ".join(f"{k}={v}" for k, v in record.items()))
            if (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs:
                self.save_epoch(epoch + 1)
        if self.ctx.main:
            atomic_save(model_checkpoint(self.model, self.meta(t.epochs)), self.out / "model.pt")
            discard_replaced(self.out)
            if self.board is not None:  # per-class clean test accuracy of the final model
                self.board.final(self.model, self.data, t.epochs, self.cfg.eval.batch_size, self.device)
        distributed.barrier()  # on every rank, model.pt exists once fit returns
        return self.model


def train(cfg: Config, out: str | Path, resume: bool | str = False, overwrite: bool = False,
          progress: bool = True):
    return Trainer(cfg, out, resume, overwrite, progress).fit()
