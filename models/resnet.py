"""CIFAR-10 ResNets, input (N, 3, 32, 32): ResNet-8 of MLPerf Tiny and He et al. 2016's ResNet-20.

Both use 1x1 projection shortcuts where a block changes shape. ResNet-20's paper shortcut (option A:
strided slicing and zero-padded channels) has no clean int8 form, so its two stride-2 blocks project
with conv 1x1 + BN instead (option B). ResNet-8 follows the MLPerf Tiny reference: the projection is
a plain 1x1 conv (with bias, no BN), the head an 8x8 average pool and one fully connected layer.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (or its projection), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut_bn: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            proj = nn.Conv2d(cin, cout, 1, stride, bias=not shortcut_bn)
            self.shortcut = nn.Sequential(proj, nn.BatchNorm2d(cout)) if shortcut_bn else proj

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv3x3(16)-BN-ReLU, three stages of ``blocks`` basic blocks at 16 / 32 / 64 filters
    (the 2nd and 3rd start with stride 2), global average pooling, fully connected to 10 classes."""

    def __init__(self, blocks: int, shortcut_bn: bool = True, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, shortcut_bn))
                cin = cout
        self.layers = nn.Sequential(*layers)        # (N, 64, 8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)         # (N, 64, 1, 1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def resnet8() -> CifarResNet:
    """MLPerf Tiny's image-classification ResNet-8 (one block per stage, 1x1 conv projections;
    78k parameters)."""
    return CifarResNet(blocks=1, shortcut_bn=False)


def resnet20() -> CifarResNet:
    """He et al. 2016's CIFAR ResNet-20 (three blocks per stage), 1x1 conv + BN projections on the two
    stride-2 blocks (0.27M parameters)."""
    return CifarResNet(blocks=3, shortcut_bn=True)
