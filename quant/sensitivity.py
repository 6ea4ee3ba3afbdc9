"""Per-layer sensitivity and a greedy mixed-precision search on a calibrated fake-quant model.

    report = quant.layer_sensitivity(qmodel, batches)         # each layer alone, and layers 1..k together
    steps = quant.greedy_weight_bits(qmodel, batches, bits=(8, 6, 4))

SQNR (dB) = 10 log10(sum y^2 / sum (y - y~)^2) of the logits y of the float network (every quantizer
off) and y~ of the network with only some quantizers on: "alone" turns on one conv / linear's weight
and output quantizers, "cumulative" those of the first k layers in graph order (the model input's
quantizer is off in both, so each figure is the layers' own).

``greedy_weight_bits`` starts with every layer's weights at the highest of ``bits`` and, step by step,
lowers the one layer whose next lower width costs the least logit SQNR per weight byte saved (every
activation keeps its calibrated range and bits); each step's per-layer bits are a
``QuantConfig.layers`` setting, so a chosen point can be quantized, converted and exported as it is.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from quant.methods import _inputs, frozen_observers, refit_weight_range, weighted_layers
from quant.modules import _QWeighted
from quant.transforms import quantizers


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).double().pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(ref.double().pow(2).sum() / noise))


@torch.no_grad()
def _logits(qmodel: nn.Module, xs: list[torch.Tensor], on: set[int]) -> torch.Tensor:
    """Logits with exactly the quantizers whose id is in ``on`` enabled (eval mode, ranges frozen)."""
    saved = [(fq, fq.enabled) for fq in quantizers(qmodel)]
    for fq, _ in saved:
        fq.enabled = id(fq) in on
    was = qmodel.training
    qmodel.eval()
    try:
        with frozen_observers(qmodel):
            return torch.cat([qmodel(x) for x in xs])
    finally:
        for fq, e in saved:
            fq.enabled = e
        qmodel.train(was)


def _own(layer: _QWeighted) -> set[int]:
    return {id(layer.weight_quant), id(layer.act_quant)}


def accuracy(qmodel: nn.Module, labelled: Iterable[Any], on: set[int]) -> float:
    """Top-1 accuracy (%) over (x, y) batches with the quantizers in ``on`` enabled."""
    hits = total = 0
    for x, y in labelled:
        hits += int((_logits(qmodel, [x], on).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * hits / max(total, 1)


def layer_sensitivity(qmodel: nn.Module, batches: Iterable[Any], num_batches: int | None = 4,
                      labelled: Iterable[Any] | None = None) -> list[dict[str, Any]]:
    """Per conv / linear in graph order: path, weight count, weight and output bits, SQNR alone and
    cumulative (see the module docstring) and, given ``labelled`` (x, y) batches, the accuracy with
    that layer alone quantized."""
    xs = list(_inputs(batches, num_batches))
    ref = _logits(qmodel, xs, set())
    rows, cumulative = [], set()
    for path, layer in weighted_layers(qmodel):
        cumulative |= _own(layer)
        row = {"layer": path, "weights": layer.weight.numel(), "weight_bits": layer.weight_quant.observer.bits,
               "act_bits": layer.act_quant.observer.bits,
               "sqnr_alone_db": round(sqnr_db(ref, _logits(qmodel, xs, _own(layer))), 2),
               "sqnr_cumulative_db": round(sqnr_db(ref, _logits(qmodel, xs, set(cumulative))), 2)}
        if labelled is not None:
            row["acc_alone"] = round(accuracy(qmodel, labelled, _own(layer)), 2)
        rows.append(row)
    return rows


def set_weight_bits(layer: _QWeighted, bits: int) -> None:
    """Quantize the layer's weights at ``bits`` from now on (their range follows the weights)."""
    layer.weight_quant.observer.bits = bits
    refit_weight_range(layer)


def weight_bytes(qmodel: nn.Module) -> float:
    """Bytes of the conv / linear weights at their current bits (as packed b-bit values)."""
    return sum(layer.weight.numel() * layer.weight_quant.observer.bits / 8 for _, layer in weighted_layers(qmodel))


def greedy_weight_bits(qmodel: nn.Module, batches: Iterable[Any], bits: Sequence[int] = (8, 6, 4),
                       num_batches: int | None = 4) -> list[dict[str, Any]]:
    """The greedy search (module docstring) in place; returns one row per step: per-layer bits
    (``{path: bits}``), weight bytes and logit SQNR with every quantizer on. Leaves the model at the
    last step (the lowest bits everywhere)."""
    widths = sorted(set(bits), reverse=True)
    xs = list(_inputs(batches, num_batches))
    every = {id(fq) for fq in quantizers(qmodel)}
    ref = _logits(qmodel, xs, set())
    layers = weighted_layers(qmodel)
    for _, layer in layers:
        set_weight_bits(layer, widths[0])

    def row() -> dict[str, Any]:
        return {"bits": {p: l.weight_quant.observer.bits for p, l in layers}, "weight_bytes": weight_bytes(qmodel),
                "sqnr_db": round(sqnr_db(ref, _logits(qmodel, xs, every)), 2)}

    steps = [row()]
    while True:
        best = None
        for path, layer in layers:
            cur = layer.weight_quant.observer.bits
            lower = [w for w in widths if w < cur]
            if not lower:
                continue
            set_weight_bits(layer, lower[0])
            s = sqnr_db(ref, _logits(qmodel, xs, every))
            set_weight_bits(layer, cur)
            saved = layer.weight.numel() * (cur - lower[0]) / 8
            cost = (steps[-1]["sqnr_db"] - s) / saved
            if best is None or cost < best[0]:
                best = (cost, layer, lower[0])
        if best is None:
            return steps
        set_weight_bits(best[1], best[2])
        steps.append(row())


def layer_settings(bits: dict[str, int]) -> tuple[tuple[str, dict[str, int]], ...]:
    """``QuantConfig.layers`` for a step's per-layer weight bits."""
    return tuple((path, {"weight_bits": b}) for path, b in bits.items())
