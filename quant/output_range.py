"""The output's range chosen for the float model's top-1 class (PTQ method ``output_range``).

A classifier is read by the arg-max of its logits, and the logits are quantized like every other
tensor. At 4 bits they get 16 levels over the range the calibrator chose for their values. Two classes
whose logits fall on one level tie, and the arg-max takes the lower index. Only the top of each image's
logits decides the class, so a range that gives the low logits no levels and the top ones fine ones
reads the class right more often than one that fits every value.

``output_range`` searches the model output quantizer's range [lo, hi] on a grid (lo from the lowest
logit up to 0, hi from 0 up to the highest, ``grid`` values each) and keeps the range whose quantized
logits give the float network's top-1 class on the most calibration images (no labels used); among
equal counts, the least squared error to the unquantized logits. The calibrated range competes too: it
stays unless a grid range does better. The logits it quantizes are those the
quantized network computes before its last rounding (every earlier quantizer as it is), so it runs
last, after AdaRound and ``act_tune``. The range is written as the quantizer's observer range, frozen:
the model converts and exports as any calibrated one (quantized with ``fake_quantize``, which the
engine's requantization matches up to its fixed-point rounding).

Only the output quantizer changes. A model whose output quantizer also feeds another layer, or has
constant qparams (a sigmoid's), or whose output has no class dimension, is refused.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from quant.errors import QuantError
from quant.methods import calibration_samples, fake_quant_off, frozen_observers, hold_range
from quant.modules import FakeQuantize, LSQQuantize, QCat, QModule
from quant.qparams import choose_qparams, fake_quantize


def output_quantizer(qmodel: nn.Module) -> FakeQuantize:
    """The quantizer of the model's output tensor (the last one with its own quantizer on the way back
    from the graph's output through ops that keep their input's qparams: pooling, flatten)."""
    if not isinstance(qmodel, fx.GraphModule) or getattr(qmodel, "quant_config", None) is None:
        raise QuantError("output_range needs a model made by quant.quantize")
    out = next(n for n in qmodel.graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, fx.Node):
        m = qmodel.get_submodule(node.target) if node.op == "call_module" else None
        fq = getattr(m, "act_quant", None)
        if fq is not None:
            break
        srcs = [a for a in node.args if isinstance(a, fx.Node)]
        if isinstance(m, QCat):
            raise QuantError("output_range: the model's output is a concatenation, whose quantizer the tensors it "
                             "joins share; changing it would change the network, not only its output")
        if len(srcs) != 1:
            raise QuantError(f"output_range: cannot follow the model's output back through {node.name!r}")
        node = srcs[0]
    else:
        raise QuantError("output_range: the model's output has no quantizer of its own")
    if fq.fixed:
        raise QuantError("output_range: the model's output has constant qparams (a sigmoid's); nothing to choose")
    if any(fq is f for m in qmodel.modules() if isinstance(m, QModule) for f in m.input_fqs):
        raise QuantError("output_range: the output quantizer also quantizes a tensor another layer reads; "
                         "changing it would change the network, not only its output")
    return fq


@torch.no_grad()
def output_range(qmodel: nn.Module, batches: Iterable[Any], samples: int = 4096, grid: int = 64
                 ) -> dict[str, Any]:
    """Choose the output quantizer's range of a calibrated fake-quant classifier in place (see the module
    docstring). Returns the top-1 agreement with the float network on the calibration images before and
    after, and the two ranges."""
    if grid < 2 or samples < 1:
        raise QuantError("output_range needs grid >= 2 and samples >= 1")
    fq = output_quantizer(qmodel)
    obs = fq.observer
    if obs.axis is not None:
        raise QuantError("output_range chooses a per-tensor output range; this output is quantized per channel")
    data = calibration_samples(batches, samples, "output_range")

    def outputs() -> torch.Tensor:
        return torch.cat([qmodel(data[i:i + 256]) for i in range(0, len(data), 256)])

    was = qmodel.training
    qmodel.eval()
    try:
        with frozen_observers(qmodel):
            with fake_quant_off(qmodel):
                top = outputs().argmax(1)
            fq.enabled = False
            try:
                y = outputs()
            finally:
                fq.enabled = True
    finally:
        qmodel.train(was)
    if y.dim() != 2:
        raise QuantError(f"output_range needs (N, classes) logits; the model's output has shape {tuple(y.shape)}")

    def score(qp: Any) -> tuple[float, float]:
        yq = fake_quantize(y, qp)
        return float((yq.argmax(1) == top).sum()), -float((yq - y).square().mean())

    old = fq.qparams()
    old_range = (float((old.qmin - old.zero_point) * old.scale), float((old.qmax - old.zero_point) * old.scale))
    before = score(old)
    lows = torch.linspace(min(float(y.min()), 0.0), 0.0, grid)
    highs = torch.linspace(0.0, max(float(y.max()), 0.0), grid + 1)[1:]
    candidates = [(lo, hi, choose_qparams(lo, hi, obs.bits, obs.symmetric, obs.narrow)) for lo in lows for hi in highs]
    best, k = max((score(qp), k) for k, (_, _, qp) in enumerate(candidates))
    n = len(y)
    if best <= before:  # no grid range does better than the calibrated one: keep it (held)
        obs.frozen = True
        return {"agreement_before": 100.0 * before[0] / n, "agreement_after": 100.0 * before[0] / n,
                "range_before": old_range, "range_after": old_range}
    lo, hi, qp = candidates[k]
    if isinstance(fq, LSQQuantize):  # a QAT model: the step size and zero point are the quantizer's own
        fq.scale.data.copy_(qp.scale.reshape(fq.scale.shape))
        fq.zero_point.copy_(qp.zero_point.reshape(fq.zero_point.shape))
        if fq.offset is not None:
            fq.offset.data.copy_((-qp.scale * qp.zero_point).reshape(fq.offset.shape))
    else:
        hold_range(fq, lo, hi)
    return {"agreement_before": 100.0 * before[0] / n, "agreement_after": 100.0 * best[0] / n,
            "range_before": old_range, "range_after": (float(lo), float(hi))}
