"""The seed's Fashion-MNIST CNNs, input (N, 1, 28, 28)."""
import torch.nn as nn


def _cnn(bn: bool) -> nn.Sequential:
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    layers = [
        nn.Conv2d(1, 40, 3), norm(40), nn.ReLU(), nn.MaxPool2d(2),   # (N, 40, 13, 13)
        nn.Conv2d(40, 40, 3), norm(40), nn.ReLU(), nn.MaxPool2d(2),  # (N, 40, 5, 5)
        nn.Flatten(),                                                # (N, 1000)
        nn.Linear(1000, 10),
    ]
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


def fashion_mnist_cnn() -> nn.Sequential:
    """Conv(1→40, 3×3) ReLU MaxPool2 Conv(40→40, 3×3) ReLU MaxPool2 Flatten Linear(1000→10)."""
    return _cnn(bn=False)


def fashion_mnist_cnn_bn() -> nn.Sequential:
    """``fashion_mnist_cnn`` with BatchNorm2d after each conv."""
    return _cnn(bn=True)
