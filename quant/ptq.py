"""Post-training quantization in one call, with the methods of ``quant.methods`` and ``quant.adaround``:

    qmodel = quant.ptq(float_model, quant.QuantConfig(weight_bits=4, act_bits=8, observer="mse"), batches,
                       methods=("cle", "adaround", "bias_correction"))
    imodel = quant.convert(qmodel)

Order: quantize -> cle (rescales float weights, so before any range is taken) -> bias_absorption (moves
high biases of equalised pairs into the next layer; needs a BN after the first conv) -> calibrate ->
adaround (then the activations are calibrated again on the rounded weights) -> bias_correction ->
act_tune (learns the activation step sizes of the final model: ``quant.act_tune``) -> output_range (the
logits' range chosen for the float model's top-1 class: ``quant.output_range``).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch.fx as fx
import torch.nn as nn

from quant.act_tune import ActTuneConfig, act_tune
from quant.adaround import AdaRoundConfig, adaround
from quant.config import QuantConfig
from quant.errors import QuantError
from quant.graph import model_graph
from quant.methods import absorb_high_biases, bias_correction, equalize
from quant.output_range import output_range
from quant.transforms import calibrate, quantize

#: the PTQ methods by name, in the order they run
METHODS = ("cle", "bias_absorption", "adaround", "bias_correction", "act_tune", "output_range")
#: what PTQ.py --compare runs side by side: (name, QuantConfig fields over the command line's, methods).
#: "w-mse": weight ranges clipped for least squared error (``weight_range="mse"``) instead of max |w|
_MSE, _WMSE = {"observer": "mse", "weight_range": "minmax"}, {"observer": "mse", "weight_range": "mse"}
COMPARISON = [("minmax", {"observer": "minmax", "weight_range": "minmax"}, ()),
              ("percentile", {"observer": "percentile", "weight_range": "minmax"}, ()),
              ("entropy", {"observer": "entropy", "weight_range": "minmax"}, ()),
              ("mse", _MSE, ()),
              ("mse, w-mse", _WMSE, ()),
              ("w-mse + bias correction", _WMSE, ("bias_correction",)),
              ("w-mse + cle", _WMSE, ("cle",)),
              ("w-mse + adaround", _WMSE, ("adaround",)),
              ("w-mse + adaround + bias correction", _WMSE, ("adaround", "bias_correction")),
              ("w-mse + adaround + act tune", _WMSE, ("adaround", "act_tune")),
              ("w-mse + adaround + act tune + output range", _WMSE, ("adaround", "act_tune", "output_range"))]


def first_last(model: nn.Module, bits: int = 8) -> tuple[tuple[str, dict[str, int]], ...]:
    """Per-layer settings (``QuantConfig.layers``) for the papers' convention "first and last layers at
    ``bits``": the model input and the first conv / linear's weights, and the last one's weights and
    output (the logits), at ``bits``; every other tensor, the last layer's input included, keeps the
    model's bits."""
    import copy
    weighted = [g.path for g in model_graph(copy.deepcopy(model)) if g.kind in ("conv", "linear")]
    if not weighted:
        raise QuantError("the model has no conv or linear layer")
    return (("input", {"act_bits": bits}), (weighted[0], {"weight_bits": bits}),
            (weighted[-1], {"weight_bits": bits, "act_bits": bits}))


def ptq_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    """The method names (a sequence or a comma list) in run order; an unknown one raises ``QuantError``."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise QuantError(f"unknown PTQ method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in methods)


def ptq(model: nn.Module, cfg: QuantConfig, batches: Iterable[Any], methods: Sequence[str] = (),
        adaround_cfg: AdaRoundConfig | None = None, bias_batches: int = 8, progress: bool = False,
        act_tune_cfg: ActTuneConfig | None = None) -> fx.GraphModule:
    """A calibrated fake-quant copy of ``model`` made with ``methods`` (see the module docstring);
    ``batches`` (re-iterable: a list or a loader) gives the calibration data."""
    methods = ptq_methods(methods)
    qmodel = quantize(model, cfg)
    if "cle" in methods:
        equalize(qmodel)
    if "bias_absorption" in methods:
        absorb_high_biases(qmodel)
    calibrate(qmodel, batches, num_batches=cfg.calib_batches, progress=progress)
    if "adaround" in methods:
        adaround(qmodel, batches, adaround_cfg, progress=progress)
        calibrate(qmodel, batches, num_batches=cfg.calib_batches, progress=progress)
    if "bias_correction" in methods:
        bias_correction(qmodel, batches, num_batches=bias_batches)
    if "act_tune" in methods:
        act_tune(qmodel, batches, act_tune_cfg, progress=progress)
    if "output_range" in methods:
        r = output_range(qmodel, batches)
        if progress:
            print(f"  output_range: float top-1 kept on {r['agreement_before']:.2f}% -> {r['agreement_after']:.2f}% of "
                  f"the calibration images, range {r['range_before'][0]:.4g}..{r['range_before'][1]:.4g} -> "
                  f"{r['range_after'][0]:.4g}..{r['range_after'][1]:.4g}", flush=True)
    return qmodel
