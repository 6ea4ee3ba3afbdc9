"""BatchNorm folding: one pure function."""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.errors import QuantError


def fold_bn_params(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                   gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta into one conv.

    w' = w * gamma / sqrt(var + eps)            (per output channel, dim 0 of w)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta
    (the seed passed var where the standard deviation belongs). gamma/beta None mean 1/0.
    Differentiable (QAT can fold with batch statistics through the same function).
    """
    inv_std = torch.rsqrt(var + eps)
    factor = inv_std if gamma is None else gamma * inv_std
    b = torch.zeros_like(mean) if bias is None else bias
    new_bias = (b - mean) * factor + (0.0 if beta is None else beta)
    new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    return new_weight, new_bias


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the conv that equals ``bn(conv(x))`` with ``bn`` in eval mode (running stats)."""
    if bn.running_mean is None or bn.running_var is None:
        raise QuantError("cannot fold a BatchNorm2d without running statistics (track_running_stats=False); "
                         "train with track_running_stats=True")
    if bn.num_features != conv.out_channels:
        raise QuantError(f"BatchNorm2d has {bn.num_features} features but the conv before it has "
                         f"{conv.out_channels} output channels")
    return fold_bn_params(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
