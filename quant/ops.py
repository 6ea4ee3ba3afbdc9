"""One record per op kind: the rules every stage reads for a node of that kind.

    OPS["add"] = Op("add", qparams="own", module=QAdd..., kernel=IntAdd, fuses_act=True)   # TFLite ADD

* ``quant.graph`` normalises every spelling of an op (module, function, method) to its kind and fuses
  an activation into the kinds with ``fuses_act``;
* ``quant.transforms.quantize`` builds the fake-quant module with ``module`` and groups quantizers by
  ``qparams`` (TFLite's int8 quantization specification): 'own' -- the op has its own output scale and
  zero point; 'input' -- it keeps its input's (pooling, reshape, stand-alone activations); 'shared' --
  its inputs and output share one (concatenation, whose kernel refuses inputs that differ);
* ``quant.integer.convert_graph`` asks each fake-quant module for its ``kernel`` (``int_layer``);
* ``quant.export_tflite`` finds the kind of each kernel by ``kernel`` and writes it with that kind's
  emitter (``EMITTERS``).

Adding an op: its spellings in ``quant.graph``, one record here, its fake-quant module (``quant.modules``,
whose ``int_layer`` returns the kernel), its kernel (``quant.kernels``) and an emitter in
``quant.export_tflite``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from quant.config import QuantConfig
from quant.kernels import (IntAdd, IntAvgPool2d, IntCat, IntClamp, IntConv2d, IntFlatten, IntLayer, IntLinear,
                           IntMaxPool2d, QuantizeInput)
from quant.modules import (QAct, QAdd, QAvgPool2d, QCat, QConv2d, QConvBN, QConvBNReLU, QConvReLU, QLinear,
                           QLinearReLU, QMaxPool2d)

RELU = (0.0, math.inf)


@dataclass(frozen=True)
class Op:
    """The rules of one op kind (see the module docstring)."""

    kind: str
    qparams: str
    module: Callable[[Any, QuantConfig], nn.Module] | None
    kernel: type[IntLayer]
    fuses_act: bool = False


def _conv(g: Any, cfg: QuantConfig) -> QConv2d:
    act, bn = g.attrs.get("act"), g.attrs.get("bn")
    if bn is not None:
        return QConvBNReLU(g.module, bn, cfg, relu=True) if act == RELU else QConvBN(g.module, bn, cfg, relu=False,
                                                                                      act=act)
    return QConvReLU(g.module, cfg, relu=True) if act == RELU else QConv2d(g.module, cfg, act=act)


def _linear(g: Any, cfg: QuantConfig) -> QLinear:
    act = g.attrs.get("act")
    return QLinearReLU(g.module, cfg, relu=True) if act == RELU else QLinear(g.module, cfg, act=act)


def _maxpool(g: Any, cfg: QuantConfig) -> QMaxPool2d:
    a = g.attrs
    return QMaxPool2d(a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])


def _avgpool(g: Any, cfg: QuantConfig) -> QAvgPool2d:
    a = g.attrs
    return QAvgPool2d(a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                      a.get("divisor_override"))


OPS: dict[str, Op] = {op.kind: op for op in [
    Op("input", "own", None, QuantizeInput),                                      # QUANTIZE
    Op("conv", "own", _conv, IntConv2d, fuses_act=True),                          # CONV_2D / DEPTHWISE_CONV_2D (+ PAD)
    Op("linear", "own", _linear, IntLinear, fuses_act=True),                      # FULLY_CONNECTED
    Op("add", "own", lambda g, cfg: QAdd(cfg, g.attrs.get("act")), IntAdd, fuses_act=True),  # ADD
    Op("maxpool", "input", _maxpool, IntMaxPool2d),                               # MAX_POOL_2D
    Op("avgpool", "input", _avgpool, IntAvgPool2d),                               # AVERAGE_POOL_2D
    Op("act", "input", lambda g, cfg: QAct(g.attrs["lo"], g.attrs["hi"]), IntClamp),  # MAXIMUM / MINIMUM
    Op("flatten", "input", None, IntFlatten),                                     # RESHAPE
    Op("cat", "shared", lambda g, cfg: QCat(), IntCat),                           # CONCATENATION
]}
