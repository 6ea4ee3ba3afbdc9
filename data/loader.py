"""In-memory batch loader: normalise once, augment whole batches with tensor ops."""
from __future__ import annotations

import math
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


def batch_erase(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017): with probability ``prob`` per image, set one rectangle
    to 0 (the data set mean after normalisation). Area 2%..40% of the image, aspect ratio 0.3..3.3
    (log-uniform); a rectangle larger than the image is cut to it."""
    n, _, h, w = x.shape
    u = torch.rand(n, 5, generator=gen, device=gen.device).to(x.device)
    area = (0.02 + 0.38 * u[:, 0]) * h * w
    aspect = torch.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * u[:, 1])
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (u[:, 2] * (h - eh + 1)).floor()
    left = (u[:, 3] * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)))
    inside &= (u[:, 4] < prob).view(-1, 1, 1)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def apply_op(x: torch.Tensor, op: str, arg: int, gen: torch.Generator) -> torch.Tensor:
    if op == "flip":
        return batch_flip(x, gen)
    if op == "crop":
        return batch_crop(x, arg, gen)
    return batch_erase(x, arg / 100, gen)


class Loader:
    """``for x, y in loader`` over a data set held in memory.

    images: uint8 (N, C, H, W); labels: int64 (N,). Images are normalised once
    at construction and moved to ``device``. ``augment`` is a string of
    comma-separated ops applied per batch, in order: ``crop<P>`` (random crop with P-pixel
    reflect padding), ``flip`` and ``erase<P>`` (random erasing of one rectangle with
    probability P%); "" for none. Shuffling and augmentation use
    a generator seeded with ``seed * 100003 + epoch`` (``set_epoch``), so a resumed run
    sees the same batches as an uninterrupted one. ``shard(rank, world)``: each batch is still drawn
    and augmented whole (the global batch), and this loader yields only its ``rank``-th of ``world``
    equal slices (a distributed run: ``utils.distributed``).
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
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """Yield only slice ``rank`` of ``world`` of every batch from now on (``shard(0, 1)``: whole batches)."""
        if not 0 <= rank < world or self.batch_size % world or not self.drop_last:
            raise ValueError(f"cannot split batches of {self.batch_size} into {world} equal slices "
                             f"(rank {rank}, drop_last {self.drop_last}); use a batch size divisible by {world}")
        self.rank, self.world = rank, world

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
                x = apply_op(x, op, arg, gen)
            if self.world > 1:
                part = slice(self.rank * (len(y) // self.world), (self.rank + 1) * (len(y) // self.world))
                x, y = x[part], y[part]
            yield x, y


def parse_augment(spec: str) -> list[tuple[str, int]]:
    """'crop4,flip,erase50' -> [('crop', 4), ('flip', 0), ('erase', 50)]; raises ValueError on unknown ops."""
    ops = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "flip":
            ops.append(("flip", 0))
        elif part.startswith("crop") and part[4:].isdigit() and int(part[4:]) > 0:
            ops.append(("crop", int(part[4:])))
        elif part.startswith("erase") and part[5:].isdigit() and 0 < int(part[5:]) <= 100:
            ops.append(("erase", int(part[5:])))
        else:
            raise ValueError(f"unknown augmentation {part!r}; use a comma list of 'flip', 'crop<P>' (pixels) and "
                             f"'erase<P>' (percent, 1..100), e.g. crop4,flip, or ''")
    return ops
