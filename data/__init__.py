"""Data sets as in-memory uint8 tensors and a batched loader.

    train, test = get_loaders("cifar10", batch_size=256, augment="crop4,flip")
    for x, y in train: ...
"""
from __future__ import annotations

from pathlib import Path

import torch

from data.errors import DataError
from data.loader import STATS, Loader, normalise, parse_augment
from data.sources import CIFAR10_CLASSES, Split, default_data_root, load_split

DATASETS = tuple(STATS)
DEFAULT_AUGMENT = {"fashion_mnist": "", "cifar10": "crop4,flip"}
#: test batches: on a CPU, evaluation passes are memory-bound, and a fake-quant ResNet-20 / MobileNetV2 ran
#: 4.3x / 3.3x faster over 1,000 images in batches of 100 than in one batch (each image's logits do not
#: depend on the batch in eval mode)
EVAL_BATCH_SIZE = 100


def get_loaders(dataset: str, batch_size: int, root: str | Path | None = None, augment: str | None = None,
                device: str | torch.device = "cpu", seed: int = 0, eval_batch_size: int = EVAL_BATCH_SIZE,
                verbose: bool = True) -> tuple[Loader, Loader]:
    """(train loader with shuffling and augmentation, test loader) for ``dataset``."""
    train = load_split(dataset, "train", root, verbose)
    test = load_split(dataset, "test", root, verbose)
    aug = DEFAULT_AUGMENT[dataset] if augment is None else augment
    return (Loader(train.images, train.labels, dataset, batch_size, train=True, augment=aug, device=device, seed=seed,
                   source=train.source),
            Loader(test.images, test.labels, dataset, eval_batch_size, device=device, source=test.source))


def synthetic_split(dataset: str, n: int, seed: int = 0) -> Split:
    """Random uint8 images with balanced labels, for dry runs and tests without data."""
    g = torch.Generator().manual_seed(seed)
    c, hw = (1, 28) if dataset == "fashion_mnist" else (3, 32)
    images = torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)
    return Split(images, torch.arange(n) % 10, "synthetic")


__all__ = ["CIFAR10_CLASSES", "DATASETS", "DEFAULT_AUGMENT", "EVAL_BATCH_SIZE", "DataError", "Loader", "STATS", "Split",
           "default_data_root", "get_loaders", "load_split", "normalise", "parse_augment", "synthetic_split"]
