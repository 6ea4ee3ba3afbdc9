"""Models written the way researchers write them (classes with ``forward``), for the graph-mode tests.

Each entry of ``GRAPH_MODELS``: name -> (constructor, input shape (C, H, W)); ``MODELS`` adds the PTQ methods'
``DepthwiseReLU``. ``build`` / ``calibrated`` and ``model_and_data``: one of them with random BN statistics,
calibrated on random data, or with its calibration batches and test images.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from models.resnet import BasicBlock  # conv-BN-ReLU-conv-BN + shortcut (1x1 conv + BN projection), ReLU
from quant import QuantConfig
from tests.conftest import randomise_bn


class SeedStyle(nn.Module):
    """The seed repository's style: layers in __init__, F.relu / F.max_pool2d / x.view in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 5 * 5, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)   # (N, 8, 13, 13)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)   # (N, 8, 5, 5)
        x = x.view(x.size(0), -1)
        return self.fc(x)


class SequentialWithForward(nn.Sequential):
    """An nn.Sequential subclass whose own forward differs from running its children in order."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8 * 11 * 11, 10))

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self[0](x)), 2)  # (N, 8, 13, 13)
        x = self[1](x).relu()                        # (N, 8, 11, 11)
        x = x.reshape(x.shape[0], -1)
        return self[2](x)


class FeaturesClassifier(nn.Module):
    """torchvision style: ``features`` and ``classifier`` Sequentials, torch.flatten in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        x = self.features(x)                         # (N, 16, 6, 6)
        return self.classifier(torch.flatten(x, 1))


class TinyResNet(nn.Module):
    """ResNet basic blocks, one with a stride-2 1x1 projection shortcut, global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)            # 16x16 -> 8x8: stride 2, padding 1 on an even input
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DepthwiseSeparable(nn.Module):
    """Depthwise-separable block with ReLU6 and average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(16)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu6(self.conv(x))
        x = F.relu6(self.dw_bn(self.dw(x)))
        x = nn.functional.hardtanh(self.pw_bn(self.pw(x)), 0.0, 6.0)
        return self.fc(self.pool(x).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: expand 1x1, depthwise 3x3, project 1x1, add; mean over H, W."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32),
                                nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.clamp(self.stem(x), 0, 6)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(x.mean((2, 3)))


class TwoBranchCat(nn.Module):
    """Two branches concatenated on the channel axis (an Inception-style block)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 10, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        x = F.relu(self.c(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def stride2_pad1() -> nn.Module:
    """A stride-2 conv with padding 1 on an even (28x28) input: TFLite's SAME pads differently."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))


class Dilated(nn.Module):
    """A conv with dilation 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=2, dilation=2)
        self.conv2 = nn.Conv2d(8, 8, 3, dilation=2)
        self.fc = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv(x)))).flatten(1))


class HardswishSigmoid(nn.Module):
    """MobileNetV3-style activations: Hardswish after a conv (module form) and after a 1x1 conv
    (functional form), a sigmoid after a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.hs = nn.Hardswish()
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.gate = nn.Sigmoid()
        self.conv2 = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.gate(self.dw(self.hs(self.conv(x))))
        return self.fc(F.hardswish(self.conv2(x)).flatten(1))


GRAPH_MODELS = {
    "seed_style": (SeedStyle, (1, 28, 28)),
    "sequential_forward": (SequentialWithForward, (1, 28, 28)),
    "features_classifier": (FeaturesClassifier, (3, 16, 16)),
    "resnet": (TinyResNet, (3, 16, 16)),
    "depthwise_separable": (DepthwiseSeparable, (3, 16, 16)),
    "inverted_residual": (InvertedResidual, (3, 16, 16)),
    "two_branch_cat": (TwoBranchCat, (3, 16, 16)),
    "stride2_pad1": (stride2_pad1, (1, 28, 28)),
    "dilated": (Dilated, (3, 16, 16)),
    "hardswish_sigmoid": (HardswishSigmoid, (3, 16, 16)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, int, int]]:
    make, shape = GRAPH_MODELS[name]
    torch.manual_seed(seed)
    return randomise_bn(make(), torch.Generator().manual_seed(seed + 1)), shape


def calibrated(model: nn.Module, shape, bits: int, rounding: str = "ref", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = quant.quantize(model, QuantConfig(weight_bits=bits, act_bits=bits, rounding=rounding))
    quant.calibrate(q, [torch.randn(32, *shape, generator=g) for _ in range(4)])
    x = torch.randn(64, *shape, generator=g)
    return q, torch.cat([x, 4 * x])  # 4x: far outside the calibrated ranges, every clamp is exercised


class DepthwiseReLU(nn.Module):
    """conv -> dw -> pw with BN and ReLU (CLE's case: ReLU6 would end every pair)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.pw(self.dw(self.conv(x))).flatten(1))


MODELS = {**GRAPH_MODELS, "depthwise_relu": (DepthwiseReLU, (3, 16, 16))}


def model_and_data(name: str, seed: int = 0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = randomise_bn(make(), torch.Generator().manual_seed(seed + 1)).eval()
    g = torch.Generator().manual_seed(seed + 2)
    batches = [torch.randn(32, *shape, generator=g) for _ in range(4)]
    return model, shape, batches, torch.randn(64, *shape, generator=g)
