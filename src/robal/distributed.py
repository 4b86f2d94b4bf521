"""Several processes, one run: training and evaluation under torchrun (torch.distributed).

`torchrun --nproc-per-node N -m robal train CONFIG --out RUN` starts N processes; each finds its rank in the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins one process group: NCCL
when the run's device is CUDA (rank r on cuda:LOCAL_RANK), gloo on the CPU; a one-process torchrun joins a group
of one (so one GPU exercises NCCL; a CPU run draws its random starts as rank 0 of a larger run would). Without
torchrun everything here is a no-op and robal runs as one process.

How one run is spread (see the README section "Several GPUs, several nodes"):
- training: every rank draws the same global epoch order and augmentation from the loader's CPU generator
  (same seed on every rank) and takes the strided slice `batch[rank::world]` of every global batch, so the
  sampler, the re-weighting schedule and the batch size (`train.batch_size` is the global batch) mean what they
  mean in one process. Each rank's loss, a mean over its slice, is weighted by `slice * world / global batch`,
  so the gradient averaged over ranks (`GradientSync`, one all_reduce per step) is the gradient of the global
  batch mean, partial last batch included. BatchNorm: per-rank statistics (running statistics averaged over
  ranks each step), or with `train.sync_bn` the global batch's (`GlobalBatchNorm2d`).
- evaluation: the test set is cut into the batches one process would use; rank r attacks batches r, r + N, ...
  (each batch's random start seeded by the batch index), and the predictions are gathered, so every count
  equals the single-process count.
- files: only rank 0 writes (config.yaml, log.jsonl, checkpoints, model.pt, eval JSON); on resume rank 0 reads
  the checkpoint and sends it to the other ranks, so the run directory need not be visible from other nodes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank of world, local_rank on its node; `launched`: started by torchrun (or
    in an initialised process group), so even a one-process run takes the distributed path (one GPU: NCCL)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1 or self.launched

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


def env_context() -> Context:
    """The rank torchrun gave this process (rank 0 of 1 when not launched by torchrun)."""
    env = os.environ
    return Context(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   launched="TORCHELASTIC_RUN_ID" in env)


def current() -> Context:
    """The context of the initialised process group, else one process."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), launched=True)
    return Context()


def setup(device_name: str) -> tuple[Context, torch.device]:
    """Join torchrun's process group (if launched by it, one process included); this rank's device.

    A CUDA device (`auto` on a GPU machine, `cuda`, `cuda:N`) becomes cuda:LOCAL_RANK: one GPU per process
    (choose the GPUs with CUDA_VISIBLE_DEVICES). Backend: NCCL on CUDA, gloo otherwise.
    """
    from .train.trainer import resolve_device

    ctx = current() if dist.is_available() and dist.is_initialized() else env_context()
    device = resolve_device(device_name)
    if not ctx.distributed:
        return ctx, device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, **kwargs)
    return current(), device


def torchrun_command(argv: list[str], nproc: int | None) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m robal ARGV` without the launcher flags
    (`robal train ... --launcher torchrun --nproc N`)."""
    import sys

    if nproc is None:
        nproc = torch.cuda.device_count()
        if nproc == 0:
            raise SystemExit("robal: --launcher torchrun without GPUs needs --nproc N (processes on the CPU)")
    if nproc < 1:
        raise SystemExit(f"robal: --nproc must be >= 1; got {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--launcher", "--nproc"):
            skip = True
        elif not arg.startswith(("--launcher=", "--nproc=")):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "robal", *rest]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device_for_collectives() -> torch.device:
    """NCCL moves tensors on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks, in place (returned); `t` itself in one process."""
    if current().distributed:
        dist.all_reduce(t)
    return t


def all_finite(t: torch.Tensor) -> bool:
    """Whether `t` is finite on every rank (one host sync, as `torch.isfinite(loss)` in one process)."""
    bad = (~torch.isfinite(t.detach())).any().float().reshape(1)
    return all_reduce_sum(bad).item() == 0


class RemoteError(RuntimeError):
    """Raised on other ranks when rank 0's part of a `main_first` step failed (rank 0 reports it)."""


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device_for_collectives())
    return box[0]


def main_first(fn, *args, **kwargs):
    """fn(*args) on rank 0, its result on every rank; rank 0's exception is raised on every rank (marked, so that
    only rank 0 reports it), so a user error such as an existing run directory stops all ranks cleanly."""
    ctx = current()
    if not ctx.distributed:
        return fn(*args, **kwargs)
    result, error = None, None
    if ctx.main:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # sent to the other ranks, then raised here too
            error = err
    result, error = broadcast_object((result, error))
    if error is not None:
        error.raised_on_all_ranks = True  # the CLI prints it on rank 0, then all ranks meet and exit
        if not ctx.main:
            error.reported_by_rank0 = True
        raise error
    return result


# ------------------------------------------------------------------------------------------ evaluation


def shard_batches(n: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """Indices of the batches (of `batch_size`, in the order one process takes them) that rank `shard[0]` of
    `shard[1]` handles: r, r + world, r + 2 world, ..."""
    rank, world = shard
    return list(range(rank, -(-n // batch_size), world))


def shard_indices(n: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The item indices of this rank's batches, concatenated in batch order."""
    batches = shard_batches(n, batch_size, shard)
    if not batches:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(b * batch_size, min((b + 1) * batch_size, n)) for b in batches])


def gather_shards(local: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """Per-item results of every rank's batches (`local`: this rank's, in `shard_indices` order), put back in
    item order on every rank. One all_gather of equal-length padded tensors."""
    ctx = current()
    if not ctx.distributed:
        return local
    sizes = [len(shard_indices(n, batch_size, (r, ctx.world))) for r in range(ctx.world)]
    if len(local) != sizes[ctx.rank]:
        raise ValueError(f"rank {ctx.rank} has {len(local)} results for {sizes[ctx.rank]} items")
    device = _device_for_collectives()
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        out[shard_indices(n, batch_size, (r, ctx.world))] = part[:sizes[r]].cpu()
    return out


# ------------------------------------------------------------------------------------------ training


def slice_weight(n_local: int, n_global: int, world: int) -> float:
    """Weight of a rank's mean loss over its `n_local` of a global batch of `n_global`: with the gradients
    averaged over `world` ranks, the result is the gradient of the global batch mean, also when the slices
    differ in size (the last batch) or a slice is empty."""
    return n_local * world / n_global


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of a rank's own random draws (the training attack's random start) in an epoch: different per rank,
    and fixed by (seed, epoch, rank), so a resumed distributed run draws what the uninterrupted one drew."""
    return (seed * 1_000_003 + epoch) * 4_099 + rank


class GradientSync:
    """Data-parallel gradient averaging: after each rank's backward, one all_reduce of one flat buffer holding
    every trainable parameter's gradient, the BatchNorm running statistics (per-rank BatchNorm) and a
    "non-finite loss" flag; then each gradient is the mean over ranks, the running statistics are the mean over
    ranks, and `__call__` says whether every rank's loss was finite (else the step is skipped on every rank).

    This is what DistributedDataParallel does in its backward hooks, done after backward instead: DDP averages
    only gradients that flow through a forward of its wrapper, while an AT framework runs several forwards per
    batch (the attack's, the clean and the adversarial one, or `features` and the head separately), so robal
    syncs the gradients wherever they come from. The cost is that communication does not overlap the backward,
    which is a small part of an AT step (the attack's passes dominate).
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], world: int):
        self.params, self.world = list(params), world
        self.buffers = [b for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, GlobalBatchNorm2d)
                        and m.track_running_stats for b in (m.running_mean, m.running_var)]

    def __call__(self, loss: torch.Tensor) -> bool:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        parts = [g.detach().reshape(-1).float() for g in grads] + [b.reshape(-1).float() for b in self.buffers]
        flags = [float(p.grad is not None) for p in self.params] + [float(not torch.isfinite(loss).all())]
        flat = torch.cat(parts + [torch.tensor(flags, device=loss.device)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            g.copy_(flat[offset:offset + g.numel()].view_as(g).div_(self.world))
            offset += g.numel()
            p.grad = g
        for b in self.buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b).div_(self.world))
            offset += b.numel()
        had_grad = flat[offset:offset + len(self.params)].tolist()
        for p, has in zip(self.params, had_grad):
            if not has:  # no rank computed one: stays None, as in one process (no weight decay, no momentum)
                p.grad = None
        return flat[-1].item() == 0


class _SumOverRanks(torch.autograd.Function):
    """Sum of a tensor over ranks; its backward sums the incoming gradients over ranks (each rank's input feeds
    every rank's output)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch across ranks, for devices that torch's
    SyncBatchNorm does not support (the CPU, with gloo). One all_reduce of (sum, sum of squares, count) per
    layer and forward, differentiable (its backward sums the gradients across ranks); an empty slice takes part
    with count 0. In eval mode, or in one process, it is plain BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = xf.new_full((1,), x.numel() // c if c else 0)
        stats = _SumOverRanks.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def use_global_batchnorm(model: nn.Module) -> nn.Module:
    """train.sync_bn: every BatchNorm2d of `model` becomes a GlobalBatchNorm2d, in place (same state_dict keys,
    so checkpoints load into the plain model). One implementation on every device, instead of torch's
    SyncBatchNorm, which runs on GPUs only."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(child.running_mean.device if child.running_mean is not None else "cpu")
            new.train(child.training)
            setattr(model, name, new)
        else:
            use_global_batchnorm(child)
    return model
