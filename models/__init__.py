"""Plain float CNNs (no quantization code) and a registry: ``build_model(name, dataset)``."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from models.cifar10 import cifar10_cnn, cifar10_cnn_bn
from models.fashion_mnist import fashion_mnist_cnn, fashion_mnist_cnn_bn
from models.mobilenetv2 import mobilenetv2
from models.resnet import resnet8, resnet20

MODELS: dict[str, dict[str, Callable[[], nn.Module]]] = {
    "fashion_mnist": {"cnn": fashion_mnist_cnn, "cnn_bn": fashion_mnist_cnn_bn},
    "cifar10": {"cnn": cifar10_cnn, "cnn_bn": cifar10_cnn_bn,
                "resnet8": resnet8, "resnet20": resnet20, "mobilenetv2": mobilenetv2},
}


def build_model(name: str, dataset: str) -> nn.Module:
    """Return a freshly initialised float model ``name`` for ``dataset``."""
    if dataset not in MODELS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(MODELS)}")
    if name not in MODELS[dataset]:
        raise ValueError(f"unknown model {name!r} for {dataset}; choose one of: {', '.join(MODELS[dataset])}")
    return MODELS[dataset][name]()
