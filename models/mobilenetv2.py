"""A MobileNetV2 (Sandler et al. 2018) for CIFAR-10, input (N, 3, 32, 32).

Width 0.5 of the paper's table 2, stride-1 stem, stage strides 1, 2, 2, 2, 1, 2, 1 (the paper's
ImageNet strides after the stem, so the 32x32 input reaches 2x2 before the last 1x1 conv), the last
1x1 conv scaled with the width too (640 rather than the paper's 1280): 0.59M parameters.
"""
from __future__ import annotations

import torch.nn as nn

# (expansion t, channels c, repeats n, stride s) of the paper's table 2.
STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _divisible(v: float, d: int = 8) -> int:
    """Round a channel count to a multiple of ``d``, never more than 10% down (the reference rule)."""
    r = max(d, int(v + d / 2) // d * d)
    return r + d if r < 0.9 * v else r


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    """Expand 1x1 (ReLU6), depthwise 3x3 (ReLU6), linear project 1x1; the input added where shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 0.5, stem_stride: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        layers = [_conv_bn_relu6(3, cin, 3, stem_stride)]                  # (N, 16, 32, 32)
        for t, c, n, s in STAGES:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _divisible(1280 * width)
        layers.append(_conv_bn_relu6(cin, last, 1))                        # (N, 640, 2, 2)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(x.flatten(1))


def mobilenetv2() -> MobileNetV2:
    """Width 0.5, stride-1 stem, strides 1, 2, 2, 2, 1, 2, 1 over the seven stages (0.59M parameters)."""
    return MobileNetV2()
