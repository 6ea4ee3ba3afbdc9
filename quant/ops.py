"""One record per op kind: the rules every stage reads for a node of that kind.

    OPS["add"] = Op("add", qparams="own", module=QAdd..., kernel=IntAdd, fuses_act=True)   # TFLite ADD

* ``quant.graph`` normalises every spelling of an op to its kind (those without arguments listed here:
  ``modules``, ``functions``, ``methods``; those with arguments to read, such as a pooling's kernel
  size, parsed there) and fuses an activation into the kinds with ``fuses_act``;
* ``quant.transforms.quantize`` builds the fake-quant module with ``module`` and groups quantizers by
  ``qparams`` (TFLite's int8 quantization specification): 'own' -- the op has its own output scale and
  zero point; 'input' -- it keeps its input's (pooling, reshape, stand-alone activations); 'shared' --
  its inputs and output share one (concatenation, whose kernel refuses inputs that differ); 'fixed' --
  constant output qparams (LOGISTIC: scale 1/256, zero point -128);
* ``quant.integer.convert_graph`` asks each fake-quant module for its ``kernel`` (``int_layer``);
* ``quant.export_tflite`` finds each kernel's record by ``kernel`` and writes it with ``emit``; a float
  model's nodes with ``emit_float``. Both call the generic methods of its ``_Emitter``.

Adding an elementwise op (as sigmoid and hardswish were): one record here with its spellings and
emitters, its fake-quant module (``quant.modules``: the float op and, in eval mode, ``int_layer``'s
kernel) and its kernel (``quant.kernels``: the integer arithmetic). An op with arguments also gets its
parser in ``quant.graph``; one the file writes in a new way, an ``_Emitter`` method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.config import QuantConfig
from quant.kernels import (IntAdd, IntAvgPool2d, IntCat, IntClamp, IntConv2d, IntFlatten, IntHardSwish, IntLayer,
                           IntLinear, IntLogistic, IntMaxPool2d, QuantizeInput)
from quant.modules import (QAct, QAdd, QAvgPool2d, QCat, QConv2d, QConvBN, QConvBNReLU, QConvReLU, QHardswish,
                           QLinear, QLinearReLU, QMaxPool2d, QSigmoid)

RELU = (0.0, math.inf)


@dataclass(frozen=True)
class Op:
    """The rules of one op kind (see the module docstring)."""

    kind: str
    qparams: str
    module: Callable[[Any, QuantConfig], nn.Module] | None
    kernel: type[IntLayer]
    fuses_act: bool = False
    #: int8 file: fn(emitter, kernel, input values, name) -> output value (``quant.export_tflite._Emitter``)
    emit: Callable[..., Any] | None = None
    #: float32 file: fn(emitter, graph node, input values, name) -> output value
    emit_float: Callable[..., Any] | None = None
    #: spellings that carry no arguments, mapped to this kind by ``quant.graph`` (the others, with
    #: arguments to read, are parsed there): module types, functions, tensor method names
    modules: tuple[type, ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()


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
    Op("conv", "own", _conv, IntConv2d, fuses_act=True,                           # CONV_2D / DEPTHWISE_CONV_2D (+ PAD)
       emit=lambda em, k, ins, name: em.conv_int(ins[0], k, name),
       emit_float=lambda em, g, ins, name: em.conv_float(ins[0], g, name)),
    Op("linear", "own", _linear, IntLinear, fuses_act=True,                       # FULLY_CONNECTED
       emit=lambda em, k, ins, name: em.fc_int(ins[0], k, name),
       emit_float=lambda em, g, ins, name: em.fc_float(ins[0], g, name)),
    Op("add", "own", lambda g, cfg: QAdd(cfg, g.attrs.get("act")), IntAdd, fuses_act=True,  # ADD
       emit=lambda em, k, ins, name: em.add(ins[0], ins[1], name, k),
       emit_float=lambda em, g, ins, name: em.add(ins[0], ins[1], name, None, g.attrs.get("act"))),
    Op("maxpool", "input", _maxpool, IntMaxPool2d,                                # MAX_POOL_2D
       emit=lambda em, k, ins, name: em.maxpool(ins[0], name, k),
       emit_float=lambda em, g, ins, name: em.maxpool_float(ins[0], g, name)),
    Op("avgpool", "input", _avgpool, IntAvgPool2d,                                # DEPTHWISE_CONV_2D (1/n)
       emit=lambda em, k, ins, name: em.avgpool(ins[0], name, k),
       emit_float=lambda em, g, ins, name: em.float_avgpool(ins[0], name, g)),   # float: AVERAGE_POOL_2D
    Op("act", "input", lambda g, cfg: QAct(g.attrs["lo"], g.attrs["hi"]), IntClamp,  # MAXIMUM / MINIMUM
       emit=lambda em, k, ins, name: em.clamp(ins[0], name, k.lo, k.hi),
       emit_float=lambda em, g, ins, name: em.float_act(ins[0], name, (g.attrs["lo"], g.attrs["hi"]))),
    Op("flatten", "input", None, IntFlatten,                                      # RESHAPE
       emit=lambda em, k, ins, name: em.flatten(ins[0], name),
       emit_float=lambda em, g, ins, name: em.flatten(ins[0], name)),
    Op("cat", "shared", lambda g, cfg: QCat(), IntCat,                            # CONCATENATION
       emit=lambda em, k, ins, name: em.cat(ins, name),
       emit_float=lambda em, g, ins, name: em.cat(ins, name)),
    Op("sigmoid", "fixed", lambda g, cfg: QSigmoid(), IntLogistic,                # LOGISTIC (1/256, -128)
       emit=lambda em, k, ins, name: em.elementwise(ins[0], name, "LOGISTIC", k),
       emit_float=lambda em, g, ins, name: em.elementwise(ins[0], name, "LOGISTIC", None),
       modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid",)),
    Op("hardswish", "own", lambda g, cfg: QHardswish(cfg), IntHardSwish,         # HARD_SWISH
       emit=lambda em, k, ins, name: em.elementwise(ins[0], name, "HARD_SWISH", k),
       emit_float=lambda em, g, ins, name: em.elementwise(ins[0], name, "HARD_SWISH", None),
       modules=(nn.Hardswish,), functions=(F.hardswish,)),
]}
