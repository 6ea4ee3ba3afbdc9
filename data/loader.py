"""In-memory batch loader: normalise once, augment whole batches with tensor ops."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

# Per-channel statistics of the training splits (pixel values in [0, 1]).
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def normalise(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x/255 - mean) / std, per channel."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in STATS[dataset])
    return (images.float().div_(255) - mean.to(images.device)) / std.to(images.device)


def batch_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def batch_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop of each image from its ``pad``-pixel reflect-padded copy (same H, W)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[n_idx, c_idx, rows, cols]


class Loader:
    """``for x, y in loader`` over a data set held in memory.

    images: uint8 (N, C, H, W); labels: int64 (N,). Images are normalised once
    at construction and moved to ``device``. ``augment`` is a string of
    comma-separated ops applied per batch: ``crop<P>`` (random crop with P-pixel
    reflect padding) and ``flip``; "" for none. Shuffling and augmentation use
    a generator seeded with ``seed + epoch`` (``set_epoch``), so a resumed run
    sees the same batches as an uninterrupted one.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, dataset: str, batch_size: int,
                 train: bool = False, augment: str = "", device: str | torch.device = "cpu",
                 seed: int = 0, drop_last: bool | None = None, source: str = "unknown"):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = normalise(images.to(self.device), dataset)
        self.y = labels.to(self.device)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        self.drop_last = train if drop_last is None else drop_last
        self.ops = parse_augment(augment) if train else []
        self.source = source  # where the images came from, e.g. "debian", "jpeg-copy", "synthetic"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        n = len(self.y)
        order = torch.randperm(n, generator=gen).to(self.device) if self.train else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            if order is None:
                x, y = self.x[sl], self.y[sl]
            else:
                idx = order[sl]
                x, y = self.x[idx], self.y[idx]
            for op, arg in self.ops:
                x = batch_flip(x, gen) if op == "flip" else batch_crop(x, arg, gen)
            yield x, y


def parse_augment(spec: str) -> list[tuple[str, int]]:
    """'crop4,flip' -> [('crop', 4), ('flip', 0)]; raises ValueError on unknown ops."""
    ops = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "flip":
            ops.append(("flip", 0))
        elif part.startswith("crop") and part[4:].isdigit() and int(part[4:]) > 0:
            ops.append(("crop", int(part[4:])))
        else:
            raise ValueError(f"unknown augmentation {part!r}; use a comma list of 'flip' and 'crop<P>' (e.g. crop4,flip) or ''")
    return ops
