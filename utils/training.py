"""One training epoch and one evaluation pass, shared by train.py and QAT.py."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to ``device`` in channels-last layout (faster convolutions on CPU)."""
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device,
                label_smoothing: float = 0.0, desc: str = "train",
                after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean loss, accuracy (%) and seconds."""
    model.train()
    t0, total, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
    for x, y in bar:
        x, y = to_input(x, device), y.to(device)
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
