"""The seed's CIFAR-10 CNNs (LeNet-5 style), input (N, 3, 32, 32)."""
import torch.nn as nn


def _cnn(bn: bool) -> nn.Sequential:
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    layers = [
        nn.Conv2d(3, 16, 5), norm(16), nn.ReLU(), nn.MaxPool2d(2),   # (N, 16, 14, 14)
        nn.Conv2d(16, 32, 5), norm(32), nn.ReLU(), nn.MaxPool2d(2),  # (N, 32, 5, 5)
        nn.Flatten(),                                                # (N, 800)
        nn.Linear(800, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    ]
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


def cifar10_cnn() -> nn.Sequential:
    """Conv(3→16, 5×5) ReLU MaxPool2 Conv(16→32, 5×5) ReLU MaxPool2 Flatten
    Linear(800→120) ReLU Linear(120→84) ReLU Linear(84→10)."""
    return _cnn(bn=False)


def cifar10_cnn_bn() -> nn.Sequential:
    """``cifar10_cnn`` with BatchNorm2d after each conv."""
    return _cnn(bn=True)
