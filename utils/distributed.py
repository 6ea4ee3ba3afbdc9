"""Training on several processes: ``torchrun --nproc_per_node N train.py ...`` (or QAT.py).

One process group per run (nccl on GPUs, gloo on CPUs), set up by ``setup`` from torchrun's
environment; without it (``WORLD_SIZE`` unset or 1) every helper here is a no-op and a run is exactly
a single-process one. What keeps N processes equal to one process with the same global batch:

* the data: every rank builds the same shuffled, augmented global batch and trains on its slice of it
  (``data.Loader.shard``); ``--batch-size`` stays the global batch;
* the gradients: ``DistributedDataParallel`` averages them (each rank's loss is the mean over its
  equal slice, so the average is the global batch's mean);
* BatchNorm: ``GlobalBatchNorm2d`` normalises with the statistics of the global batch (sums
  all-reduced with autograd, so the gradient through the statistics is the global one too) and updates
  the running statistics with them: the running statistics, which QAT folds into the conv weights,
  stay identical on every rank, where per-rank statistics would differ;
* activation ranges: ``reduce_range`` (``quant.sync_act_ranges``) takes every batch's min / max over
  the ranks before an EMA observer moves;
* calibration runs unsharded on every rank over the same batches, so its ranges (histogram
  calibrators included, whose counts cannot be min/max-reduced) are identical by construction.

``check_same_state`` verifies after each epoch that every rank holds bit-identical weights, buffers
(BN statistics, observer ranges) and quantizer state. Rank 0 alone prints, saves and appends rows.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from utils.cli import CLIError, resolve_device


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints, saves checkpoints and appends result rows."""
        return self.rank == 0


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (if any) and pick this rank's device ('auto': its GPU, else CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise CLIError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                           f"start at most {torch.cuda.device_count()} processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ctx = Dist(rank, world, local)
    if not ctx.main:
        _quiet()
    return ctx, device


def _quiet() -> None:
    """Ranks other than 0 print nothing to stdout (errors still reach stderr; the scripts turn their progress
    bars off there)."""
    plain = builtins.print

    def print_errors_only(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("file") is sys.stderr:
            plain(*args, **kwargs)

    builtins.print = print_errors_only


def cleanup(finished: bool) -> None:
    """Leave the process group. ``finished`` (the run returned, no exception): wait for every rank first.
    Rank 0 evaluates and writes after the others are done; a rank that tore its connections down while
    rank 0 was still at work aborted now and then ("terminate called without an active exception"). After
    an exception nothing waits, so a failing rank cannot hang the others."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def leaving_group() -> Iterator[None]:
    """Around a script's run: ``cleanup`` on the way out, waiting for the other ranks unless it raised."""
    try:
        yield
    except BaseException:
        cleanup(finished=False)
        raise
    cleanup(finished=True)


def check_global_batch(batch_size: int, ctx: Dist) -> None:
    if batch_size % ctx.world_size:
        raise CLIError(f"--batch-size {batch_size} is the global batch and must divide among the {ctx.world_size} "
                       f"processes; pass a multiple of {ctx.world_size}")


def wrap(model: nn.Module, ctx: Dist, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel (gradients averaged over the ranks); itself when alone.

    Buffers are not broadcast from rank 0 at each forward: they are kept equal by the global batch
    statistics and ranges, and ``check_same_state`` would catch them drifting instead of hiding it."""
    if not ctx.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               broadcast_buffers=False)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient of each rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch of a distributed run
    (PyTorch's SyncBatchNorm does the same on GPUs only). Each rank takes its slice's per-channel mean and
    variance (float32, two-pass), one all-reduce gathers every rank's (count, mean, variance), and they are
    combined in float64 (Chan et al.'s parallel formula, no E[x^2] - E[x]^2 cancellation); differentiable,
    so the gradient is the global batch's.
    Without a process group, or in eval mode, it is an ordinary BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c, world, rank = x.shape[1], dist.get_world_size(), dist.get_rank()
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)  # this rank's slice, float32, two-pass
        mine = torch.stack([torch.full_like(mean, x.numel() // c), mean, var]).double()[None]
        pad = lambda k: mine.new_zeros(k, 3, c)  # noqa: E731
        rows = _AllReduceSum.apply(torch.cat([pad(rank), mine, pad(world - rank - 1)]))  # every rank's row
        counts, means, variances = rows[:, 0], rows[:, 1], rows[:, 2]
        n = counts.sum(0)
        mean = (counts * means).sum(0) / n                     # Chan et al.: combine the slices' moments
        var = (counts * (variances + (means - mean).square())).sum(0) / n
        n = n[0]
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1)).to(self.running_var.dtype))
        y = (x - mean.to(x.dtype).view(1, -1, 1, 1)) * torch.rsqrt(var.to(x.dtype) + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y


def global_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``model`` (those inside fused QAT layers too) by a
    ``GlobalBatchNorm2d`` holding the same state; the state dict's keys do not change."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                new = GlobalBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                        affine=child.affine, track_running_stats=child.track_running_stats)
                new.load_state_dict(child.state_dict())
                new.train(child.training)
                setattr(parent, name, new.to(next(child.buffers(), torch.empty(0)).device))
    return model


def reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's (min, max) over every rank's slice of it: the global batch's range."""
    lo, hi = lo.clone(), hi.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo, hi


def mean_over_ranks(metrics: dict[str, float], keys: tuple[str, ...], ctx: Dist) -> dict[str, float]:
    """``metrics[k]`` averaged over the ranks (equal slices: the global batch's mean)."""
    if not ctx.enabled:
        return metrics
    # nccl reduces only CUDA tensors (setup made this rank's GPU the current device); gloo CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {**metrics, **{k: float(v) / ctx.world_size for k, v in zip(keys, t)}}


def state_digests(module: nn.Module) -> dict[str, str]:
    """SHA-256 of every entry of ``module``'s state dict (tensors by their bytes, extra state by repr)."""
    out = {}
    for name, value in module.state_dict().items():
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() \
                if value.numel() else b""
            out[name] = hashlib.sha256(str(value.dtype).encode() + str(tuple(value.shape)).encode() + data).hexdigest()
        else:
            out[name] = hashlib.sha256(repr(value).encode()).hexdigest()
    return out


def check_same_state(module: nn.Module, ctx: Dist, when: str) -> None:
    """Raise if any rank's weights, buffers or quantizer state differ from rank 0's in any bit."""
    if not ctx.enabled:
        return
    mine = state_digests(module)
    every: list[dict[str, str] | None] = [None] * ctx.world_size
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            keys = sorted(k for k in set(theirs) | set(every[0]) if theirs.get(k) != every[0].get(k))
            raise RuntimeError(f"{when}: rank {rank}'s state differs from rank 0's in {len(keys)} entries "
                               f"({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
