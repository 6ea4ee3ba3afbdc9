"""One training epoch and one evaluation pass, shared by train.py and QAT.py."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


#: train.py --precision: the dtype the forward and backward passes autocast to (None: float32 throughout).
#: Weights, optimizer state and evaluation stay float32; bf16 needs no loss scaling.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to ``device`` in channels-last layout (faster convolutions on CPU)."""
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device,
                label_smoothing: float = 0.0, desc: str = "train",
                after_step: Callable[[], None] | None = None, sam_rho: float = 0.0,
                teacher: nn.Module | None = None, kd_weight: float = 0.0, kd_temp: float = 4.0,
                progress: bool = True, autocast: torch.dtype | None = None) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean loss, accuracy (%) and seconds.

    ``autocast`` (a ``PRECISIONS`` value) runs the forward passes (and so their backward) in that dtype.

    sam_rho > 0 takes sharpness-aware minimisation steps (SAM, Foret et al. 2021): the gradient
    that ``optimizer`` applies is the one at the weights moved by rho along the normalised gradient.
    With a ``teacher`` (in eval mode, never trained) and kd_weight > 0 the loss is ``distill_loss``.
    """
    model.train()
    t0, total, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=not progress)
    for x, y in bar:
        x, y = to_input(x, device), y.to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(x)
            if teacher is not None and kd_weight > 0:
                with torch.no_grad():
                    target = teacher(x)
            out = out.float()
        if teacher is not None and kd_weight > 0:
            loss = distill_loss(out, target.float(), y, kd_weight, kd_temp, label_smoothing)
        else:
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sam_rho > 0:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                sam_second_pass(model, x, y, sam_rho, label_smoothing)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        n = y.numel()
        total += n
        loss_sum += loss.item() * n
        correct += (out.argmax(1) == y).sum().item()
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100 * correct / total:.2f}", refresh=False)
    return {"train_loss": loss_sum / max(total, 1), "train_acc": 100 * correct / max(total, 1),
            "seconds": time.perf_counter() - t0}


def distill_loss(out: torch.Tensor, teacher_out: torch.Tensor, y: torch.Tensor, weight: float, temp: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): (1 - weight) * CE(out, y) + weight * T^2 *
    KL(softmax(teacher_out / T) || softmax(out / T)); the T^2 keeps the soft term's gradient size
    independent of the temperature T."""
    soft = F.kl_div(F.log_softmax(out / temp, 1), F.log_softmax(teacher_out / temp, 1), reduction="batchmean",
                    log_target=True)
    hard = F.cross_entropy(out, y, label_smoothing=label_smoothing) if weight < 1 else out.new_zeros(())
    return (1 - weight) * hard + weight * temp ** 2 * soft


class Ensemble(nn.Module):
    """Mean logits of several models (a distillation teacher); always in eval mode."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.eval()

    def train(self, mode: bool = True) -> "Ensemble":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def sam_second_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float,
                    label_smoothing: float) -> None:
    """Replace the gradients in ``model`` by those at w + rho * g / ||g|| (then restore w)."""
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm() for p in params])) + 1e-12
        moves = [p.grad * (rho / norm) for p in params]
        for p, e in zip(params, moves):
            p.add_(e)
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), y, label_smoothing=label_smoothing).backward()
    with torch.no_grad():
        for p, e in zip(params, moves):
            p.sub_(e)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    """Mean cross-entropy and accuracy (%) of ``model`` in eval mode over ``loader``."""
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = to_input(x, device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += y.numel()
    return {"test_loss": loss_sum / max(total, 1), "test_acc": 100 * correct / max(total, 1)}
