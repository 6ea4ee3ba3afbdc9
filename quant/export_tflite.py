"""Write an integer model (or its float original) as a TFLite flatbuffer, and run it with LiteRT.

    data = export_tflite(imodel, "model.tflite", input_shape=(1, 28, 28))       # int8 file
    data = export_tflite(float_model, "model_f32.tflite", input_shape=(1, 28, 28))  # float32 file
    logits = TFLiteRunner(data, mode="xnnpack")(x)                              # x: (N, C, H, W)

No TensorFlow: the flatbuffer is built with the ``tflite`` schema package and ``flatbuffers``; it is
run with ``ai-edge-litert`` (the LiteRT interpreter). Both are optional imports: a missing package is
a one-line ``QuantError`` with the pip command.

The int8 file (``IntModel``) computes exactly what the integer engine computes, bit for bit, in each
LiteRT kernel set with its matching ``IntModel.rounding`` (``MODES``) and in TensorFlow Lite Micro
(rounding 'tflm', ``quant.tflm``); ``make_runner`` opens either. The emitter walks the engine's
graph, one op per integer layer:

    float32 input (N, H, W, C) -> QUANTIZE -> graph of
      CONV_2D / DEPTHWISE_CONV_2D (per-channel int8, int32 bias, fused RELU / RELU6 / RELU_N1_TO_1;
        a PAD with the zero point first where TFLite's SAME cannot express the padding)
      FULLY_CONNECTED (int8, per tensor; per channel on axis 0 with fc_per_channel), ADD (own output
      scale), CONCATENATION (shared scale), MAX_POOL_2D / RESHAPE [-1, K] (the input's scale), MAXIMUM /
      MINIMUM (clamps); average pooling as a DEPTHWISE_CONV_2D with weights 1 at scale 1/n
        (``IntAvgPool2d``: XNNPACK delegates it)
    -> int8 logits (the engine's ``forward_int``)

with ``int8_input=True`` the file takes the quantized int8 tensor instead (no QUANTIZE). Layout is
NHWC: conv weights are OHWI, and the fully-connected weights after a flatten are permuted from the
engine's (C, H, W) order to (H, W, C). The batch dimension is resizable (``shape_signature`` -1).

b < 8 bits are stored in int8 tensors with the b-bit scales and zero points. LiteRT derives a fused
activation's clamp from the output scale and zero point only, clamped to the int8 range: RELU gives
[max(-128, zp), 127], none gives [-128, 127]; the tensor's quantization min/max are never read by a
kernel. The b-bit clamps of the engine ([qmin_b, qmax_b], relu: [max(qmin_b, zp), qmax_b]) are
therefore written as explicit MAXIMUM / MINIMUM ops with constant int8 bounds where they are narrower
than what the fused activation gives (so are stand-alone activations and clamps TFLite cannot fuse).
Each such clamp is deferred past MAX_POOL_2D and RESHAPE (they keep the scale and zero point, and max
pooling commutes with a monotone clamp), so it runs on the pooled tensor; any other consumer gets the
clamped tensor. An engine converted with ``convert(..., clamp="int8")`` needs none: its file holds only
the ops above.

The float file (any float model ``quant.quantize`` accepts) has the same graph in float32, read from the
same normalised graph (``quant.graph``), with BatchNorm folded into the conv (``fold_bn``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from quant.errors import QuantError
from quant.fixed_point import INT32_MAX, quantize_multiplier
from quant.fold import fold_bn
from quant.graph import model_graph
from quant.integer import IntModel
from quant.ops import OPS as OP_RULES
from quant.kernels import (Dequantize, IntAdd, IntAvgPool2d, IntConv2d, IntFlatten, IntLinear, IntLUT, IntReLU,
                           QuantizeInput, act_range, pool_window)
from quant.qparams import QParams
from quant.tflm import NHWCRunner, TFLMRunner
from quant.io import atomic_write_bytes

#: interpreter mode (the name of the matching ``IntModel.rounding``) -> LiteRT ``OpResolverType`` member
MODES = {"ref": "BUILTIN_REF", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "xnnpack": "AUTO"}
#: every runtime the engine matches bit for bit: LiteRT's three kernel sets and TensorFlow Lite Micro
RUNTIMES = (*MODES, "tflm")

#: builtin operator -> (code in the schema, version written for int8, version for float32)
OPS = {
    "QUANTIZE": (114, 2, 1),
    "CONV_2D": (3, 3, 1),
    "MAX_POOL_2D": (17, 2, 1),
    "RESHAPE": (22, 1, 1),
    "FULLY_CONNECTED": (9, 4, 1),
    "MAXIMUM": (55, 2, 1),
    "MINIMUM": (57, 2, 1),
    "DEPTHWISE_CONV_2D": (4, 3, 1),
    "PAD": (34, 2, 1),
    "ADD": (0, 2, 1),
    "CONCATENATION": (2, 2, 1),
    "AVERAGE_POOL_2D": (1, 2, 1),
    "RELU": (19, 2, 1),
    "RELU_N1_TO_1": (20, 2, 1),
    "RELU6": (21, 2, 1),
    "LOGISTIC": (14, 2, 1),
    "HARD_SWISH": (117, 1, 1),
}

INT8_MIN, INT8_MAX = -128, 127
#: XNNPACK refuses a requantization scale s_in * s_w / s_out of 256 or more
MAX_MULTIPLIER = 256.0

LITERT_HINT = ("the LiteRT interpreter is not installed; pip install ai-edge-litert "
               "(or pip install -r requirements.txt)")


def _schema() -> tuple[Any, Any]:
    """(flatbuffers, tflite) modules, or a one-line install hint."""
    try:
        import flatbuffers
        import tflite
    except ImportError as e:
        raise QuantError(f"writing .tflite files needs the packages flatbuffers and tflite ({e.name} is "
                         f"missing); pip install flatbuffers tflite") from e
    return flatbuffers, tflite


def litert() -> tuple[Any, Any]:
    """(Interpreter, OpResolverType) of ``ai_edge_litert``, or a one-line install hint."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:
        raise QuantError(LITERT_HINT) from e
    return Interpreter, OpResolverType


# ---------------------------------------------------------------------------------------------------
# The graph: tensors, constant buffers and operators of one subgraph, serialised at the end.

@dataclass
class _Tensor:
    name: str
    shape: list[int]  # -1 in front: resizable batch (shape 1, shape_signature -1)
    dtype: str  # 'FLOAT32' | 'INT8' | 'INT32'
    buffer: int = 0
    quant: dict[str, Any] | None = None  # {'scale': [...], 'zero_point': [...], 'axis': int}


@dataclass
class _Graph:
    """A single-subgraph TFLite model under construction."""

    tensors: list[_Tensor] = field(default_factory=list)
    buffers: list[bytes] = field(default_factory=lambda: [b""])  # buffer 0 is the empty sentinel
    ops: list[tuple[str, list[int], list[int], tuple[str, dict[str, int]] | None]] = field(default_factory=list)
    int8: bool = True  # which op versions to write

    def tensor(self, name: str, shape: list[int], dtype: str, quant: dict[str, Any] | None = None) -> int:
        self.tensors.append(_Tensor(name, list(shape), dtype, 0, quant))
        return len(self.tensors) - 1

    def const(self, name: str, array: np.ndarray, quant: dict[str, Any] | None = None) -> int:
        dtype = {np.dtype(np.float32): "FLOAT32", np.dtype(np.int8): "INT8", np.dtype(np.int32): "INT32"}[array.dtype]
        self.buffers.append(np.ascontiguousarray(array).tobytes())
        self.tensors.append(_Tensor(name, list(array.shape), dtype, len(self.buffers) - 1, quant))
        return len(self.tensors) - 1

    def op(self, name: str, inputs: list[int], outputs: list[int],
           options: tuple[str, dict[str, int]] | None = None) -> None:
        self.ops.append((name, inputs, outputs, options))


def _per_tensor(scale: float, zero_point: int) -> dict[str, Any]:
    return {"scale": [float(scale)], "zero_point": [int(zero_point)], "axis": 0}


def _serialize(g: _Graph, inputs: list[int], outputs: list[int], description: str) -> bytes:
    """The flatbuffer (identifier TFL3, schema version 3) of graph ``g``."""
    fb, tfl = _schema()
    b = fb.Builder(1 << 16)

    def vector(start, items: list[int]) -> int:  # a vector of tables (offsets), in order
        start(b, len(items))
        for off in reversed(items):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    def data_vector(data: bytes) -> int:  # raw bytes aligned to 16 (XNNPACK and memcpy-friendly)
        b.StartVector(1, len(data), 16)
        b.head -= len(data)
        b.Bytes[b.head:b.head + len(data)] = data
        b.vectorNumElems = len(data)
        return b.EndVector()

    buffers = []
    for data in g.buffers:
        data_off = data_vector(data) if data else None
        tfl.BufferStart(b)
        if data_off is not None:
            tfl.BufferAddData(b, data_off)
        buffers.append(tfl.BufferEnd(b))

    tensors = []
    for t in g.tensors:
        batch = bool(t.shape) and t.shape[0] == -1
        shape = b.CreateNumpyVector(np.array([1, *t.shape[1:]] if batch else t.shape, dtype=np.int32))
        signature = b.CreateNumpyVector(np.array(t.shape, dtype=np.int32)) if batch else None
        name = b.CreateString(t.name)
        quant = None
        if t.quant is not None:
            scale = b.CreateNumpyVector(np.array(t.quant["scale"], dtype=np.float32))
            zp = b.CreateNumpyVector(np.array(t.quant["zero_point"], dtype=np.int64))
            tfl.QuantizationParametersStart(b)
            tfl.QuantizationParametersAddScale(b, scale)
            tfl.QuantizationParametersAddZeroPoint(b, zp)
            tfl.QuantizationParametersAddQuantizedDimension(b, t.quant["axis"])
            quant = tfl.QuantizationParametersEnd(b)
        tfl.TensorStart(b)
        tfl.TensorAddShape(b, shape)
        if signature is not None:
            tfl.TensorAddShapeSignature(b, signature)
        tfl.TensorAddType(b, getattr(tfl.TensorType, t.dtype))
        tfl.TensorAddBuffer(b, t.buffer)
        tfl.TensorAddName(b, name)
        if quant is not None:
            tfl.TensorAddQuantization(b, quant)
        tensors.append(tfl.TensorEnd(b))

    codes = list(dict.fromkeys(name for name, *_ in g.ops))  # operator codes in first-use order
    ops = []
    for name, ins, outs, options in g.ops:
        in_off = b.CreateNumpyVector(np.array(ins, dtype=np.int32))
        out_off = b.CreateNumpyVector(np.array(outs, dtype=np.int32))
        opt_off = None
        if options is not None:  # e.g. ('Conv2DOptions', {'Padding': 1, 'StrideW': 1, ...})
            kind, fields = options
            getattr(tfl, f"{kind}Start")(b)
            for key, value in fields.items():
                getattr(tfl, f"{kind}Add{key}")(b, value)
            opt_off = getattr(tfl, f"{kind}End")(b)
        tfl.OperatorStart(b)
        tfl.OperatorAddOpcodeIndex(b, codes.index(name))
        tfl.OperatorAddInputs(b, in_off)
        tfl.OperatorAddOutputs(b, out_off)
        if opt_off is not None:
            tfl.OperatorAddBuiltinOptionsType(b, getattr(tfl.BuiltinOptions, options[0]))
            tfl.OperatorAddBuiltinOptions(b, opt_off)
        ops.append(tfl.OperatorEnd(b))

    tensors_off = vector(tfl.SubGraphStartTensorsVector, tensors)
    ops_off = vector(tfl.SubGraphStartOperatorsVector, ops)
    in_off = b.CreateNumpyVector(np.array(inputs, dtype=np.int32))
    out_off = b.CreateNumpyVector(np.array(outputs, dtype=np.int32))
    sg_name = b.CreateString("main")
    tfl.SubGraphStart(b)
    tfl.SubGraphAddTensors(b, tensors_off)
    tfl.SubGraphAddInputs(b, in_off)
    tfl.SubGraphAddOutputs(b, out_off)
    tfl.SubGraphAddOperators(b, ops_off)
    tfl.SubGraphAddName(b, sg_name)
    subgraph = tfl.SubGraphEnd(b)

    opcodes = []
    for name in codes:
        code, v_int8, v_float = OPS[name]
        tfl.OperatorCodeStart(b)
        tfl.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))  # old readers use the int8 field
        tfl.OperatorCodeAddBuiltinCode(b, code)
        tfl.OperatorCodeAddVersion(b, v_int8 if g.int8 else v_float)
        opcodes.append(tfl.OperatorCodeEnd(b))
    opcodes_off = vector(tfl.ModelStartOperatorCodesVector, opcodes)
    subgraphs_off = vector(tfl.ModelStartSubgraphsVector, [subgraph])
    buffers_off = vector(tfl.ModelStartBuffersVector, buffers)
    desc = b.CreateString(description)
    tfl.ModelStart(b)
    tfl.ModelAddVersion(b, 3)
    tfl.ModelAddOperatorCodes(b, opcodes_off)
    tfl.ModelAddSubgraphs(b, subgraphs_off)
    tfl.ModelAddDescription(b, desc)
    tfl.ModelAddBuffers(b, buffers_off)
    b.Finish(tfl.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


# ---------------------------------------------------------------------------------------------------
# Lowering: the integer engine's graph (or a float chain) becomes ops, one emitter per integer layer.

@dataclass
class _Layer:
    """A weighted op of the file (conv or fully connected). ``q`` holds the integer data (None in the
    float file): {'in_scale', 'w_scale', 'out_scale', 'in_zp', 'out_zp', 'act': (lo, hi)}."""

    kind: str
    name: str
    weight: torch.Tensor  # conv (O, I, kh, kw), fc (O, K); int8 values or float32
    bias: torch.Tensor | None = None  # int32 or float32
    act: tuple[float, float] | None = None  # fused activation's float bounds
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    q: dict[str, Any] | None = None


@dataclass
class _Val:
    """A tensor of the file: its index, NCHW shape without the batch ((C, H, W) or (K,)), qparams
    (None: float32), the range its producing ops guarantee and the b-bit range the engine clamps it to
    (a pending clamp, emitted by ``flush``), and (C, H, W) when it was flattened from an image."""

    t: int
    shape: tuple[int, ...]
    qp: tuple[float, int] | None
    range: tuple[int, int] = (-128, 127)
    clamp: tuple[int, int] = (-128, 127)
    flat_from: tuple[int, int, int] | None = None


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _int_q(layer: IntConv2d | IntLinear) -> dict[str, Any]:
    return {"in_scale": layer.in_scale, "w_scale": layer.w_scale, "out_scale": layer.out_scale,
            "in_zp": layer.in_zp, "out_zp": layer.out_zp, "act": (layer.act_min, layer.act_max)}


def _layer_act(layer: Any) -> tuple[float, float] | None:
    act = getattr(layer, "act", None)
    return (0.0, math.inf) if act is None and getattr(layer, "relu", False) else act


# ---------------------------------------------------------------------------------------------------
# Checks: what LiteRT would silently compute differently, refused with the reason.

def _check_scale(name: str, what: str, scale: torch.Tensor) -> None:
    s = scale.float().reshape(-1)
    if not bool(torch.isfinite(s).all()) or bool((s < torch.finfo(torch.float32).tiny).any()):
        raise QuantError(f"cannot export {name}: degenerate {what} scale {s.min().item():g}..{s.max().item():g} "
                         f"(must be finite and at least {torch.finfo(torch.float32).tiny:g}); recalibrate the model")


def _check_int_layer(layer: _Layer) -> None:
    q = layer.q
    for what in ("in", "w", "out"):
        _check_scale(layer.name, {"in": "input", "w": "weight", "out": "output"}[what], q[f"{what}_scale"])
    _check_scale(layer.name, "bias (input * weight)", q["in_scale"].float() * q["w_scale"].float())
    real = q["in_scale"].double() * q["w_scale"].double() / q["out_scale"].double()
    if bool((real >= MAX_MULTIPLIER).any()):
        raise QuantError(f"cannot export {layer.name}: degenerate scales, requantization multiplier "
                         f"s_in * s_w / s_out = {real.max().item():g} >= {MAX_MULTIPLIER:g} (XNNPACK rejects it); "
                         f"the output scale is far too small, recalibrate the model")
    for r in real.tolist():
        quantize_multiplier(r)  # raises for multipliers the fixed-point form cannot hold
    # worst case of |bias + sum((q_in - zp_in) * q_w)| over every int8 input: LiteRT wraps int32 silently
    span = max(INT8_MAX - q["in_zp"], q["in_zp"] - INT8_MIN)
    w_abs = layer.weight.double().abs().reshape(layer.weight.shape[0], -1).sum(1)
    bound = (w_abs * span + layer.bias.double().abs()).max()
    if bound > INT32_MAX:
        raise QuantError(f"cannot export {layer.name}: bias {int(layer.bias.abs().max())} plus the products can "
                         f"overflow the int32 accumulator (up to {int(bound)}), which LiteRT would wrap silently; "
                         f"the scales are degenerate, recalibrate or use fewer bits")


#: fused activation (float bounds) -> TFLite ActivationFunctionType
FUSED = {None: 0, (0.0, math.inf): 1, (-1.0, 1.0): 2, (0.0, 6.0): 3}


def _fused(act: tuple[float, float] | None, qp: tuple[float, int] | None) -> tuple[int, tuple[int, int]]:
    """(TFLite fused activation code, the int8 range LiteRT clamps to with it): its
    CalculateActivationRangeQuantized, bounds zp + round(b / s) within [-128, 127]. A clamp TFLite
    cannot fuse gets code 0 (NONE) and is emitted as MAXIMUM / MINIMUM by the caller."""
    code = FUSED.get(act, 0)
    if qp is None or code == 0:
        return code, (INT8_MIN, INT8_MAX)
    q = QParams(torch.tensor(qp[0]), torch.tensor(qp[1]), INT8_MIN, INT8_MAX)
    return code, act_range(q, act, "int8")


# ---------------------------------------------------------------------------------------------------
# The emitter.

class _Emitter:
    """Appends ops to a ``_Graph``: one method per integer layer kind, taking and returning ``_Val``s."""

    def __init__(self, g: _Graph) -> None:
        self.g = g

    def _activation(self, name: str, shape: tuple[int, ...], qp: tuple[float, int] | None) -> int:
        nhwc = [-1, shape[1], shape[2], shape[0]] if len(shape) == 3 else [-1, *shape]
        return self.g.tensor(name, nhwc, "FLOAT32" if qp is None else "INT8",
                             None if qp is None else _per_tensor(*qp))

    def flush(self, v: _Val, name: str) -> _Val:
        """Emit MAXIMUM / MINIMUM with constant int8 bounds where the engine's clamp is narrower than
        what the ops so far guarantee (b < 8 bits, or a clamp TFLite cannot fuse)."""
        t = v.t
        for op, bound, active in (("MAXIMUM", v.clamp[0], v.clamp[0] > v.range[0]),
                                  ("MINIMUM", v.clamp[1], v.clamp[1] < v.range[1])):
            if active:
                c = self.g.const(f"{name}/{op.lower()}_bound", np.array([bound], dtype=np.int8), _per_tensor(*v.qp))
                y = self._activation(f"{name}/{op.lower()}", v.shape, v.qp)
                self.g.op(op, [t, c], [y])
                t = y
        return replace(v, t=t, range=v.clamp)

    def _produced(self, name: str, v: _Val, guaranteed: tuple[int, int], clamp: tuple[int, int]) -> _Val:
        if clamp[0] < guaranteed[0] or clamp[1] > guaranteed[1]:
            raise QuantError(f"cannot export {name}: its clamp {list(clamp)} is wider than LiteRT's "
                             f"{list(guaranteed)}; convert the model again")
        return replace(v, range=guaranteed, clamp=clamp)

    def _image(self, v: _Val, name: str) -> tuple[int, int, int]:
        if len(v.shape) != 3:
            raise QuantError(f"cannot export {name}: it needs an image input, got shape {tuple(v.shape)}")
        return v.shape  # type: ignore[return-value]

    def conv(self, v: _Val, r: _Layer) -> _Val:
        c_in, h, w = self._image(v, r.name)
        o, i, kh, kw = r.weight.shape
        if i * r.groups != c_in:
            raise QuantError(f"cannot export {r.name}: it expects {i * r.groups} input channels, the tensor has {c_in}")
        v = self.flush(v, r.name) if r.q is not None else v
        padding = _tflite_padding(r, (h, w), (kh, kw))
        if padding is None:  # no SAME / VALID equivalent: an explicit PAD (with the zero point), then VALID
            ph, pw = r.padding
            pads = self.g.const(f"{r.name}/paddings", np.array([[0, 0], [ph, ph], [pw, pw], [0, 0]], dtype=np.int32))
            shape = (c_in, h + 2 * ph, w + 2 * pw)
            y = self._activation(f"{r.name}/pad", shape, v.qp)
            self.g.op("PAD", [v.t, pads], [y])
            v, (h, w), padding = replace(v, t=y, shape=shape), shape[1:], 1
            r = replace(r, padding=(0, 0))
        oh = (h + 2 * r.padding[0] - r.dilation[0] * (kh - 1) - 1) // r.stride[0] + 1
        ow = (w + 2 * r.padding[1] - r.dilation[1] * (kw - 1) - 1) // r.stride[1] + 1
        code, guaranteed = _fused(r.act, None if r.q is None else (float(r.q["out_scale"]), int(r.q["out_zp"])))
        common = {"Padding": padding, "StrideW": r.stride[1], "StrideH": r.stride[0], "FusedActivationFunction": code,
                  "DilationWFactor": r.dilation[1], "DilationHFactor": r.dilation[0]}
        if r.groups == 1:
            return self._weighted(v, r, "CONV_2D", r.weight.permute(0, 2, 3, 1).contiguous(), 0, (o, oh, ow),
                                  ("Conv2DOptions", common), guaranteed)
        if r.groups != c_in or i != 1:
            raise QuantError(f"cannot export {r.name}: Conv2d with groups={r.groups} (only depthwise, groups = "
                             f"in_channels, maps to DEPTHWISE_CONV_2D); use groups=1 or groups=in_channels")
        w_1hwo = r.weight.permute(1, 2, 3, 0).contiguous()  # (1, kh, kw, O): per-channel axis 3
        return self._weighted(v, r, "DEPTHWISE_CONV_2D", w_1hwo, 3, (o, oh, ow),
                              ("DepthwiseConv2DOptions", {**common, "DepthMultiplier": o // c_in}), guaranteed)

    def fc(self, v: _Val, r: _Layer) -> _Val:
        if len(v.shape) != 1:
            raise QuantError(f"cannot export {r.name}: a fully connected layer needs a flattened input, got shape "
                             f"{tuple(v.shape)}; flatten before it")
        o, k = r.weight.shape
        if k != v.shape[0]:
            raise QuantError(f"cannot export {r.name}: it expects {k} inputs, the tensor has {v.shape[0]}")
        w = r.weight
        if v.flat_from is not None:  # engine flattens (C, H, W), the file (H, W, C)
            w = w.reshape(o, *v.flat_from).permute(0, 2, 3, 1).reshape(o, k)
        v = self.flush(v, r.name) if r.q is not None else v
        code, guaranteed = _fused(r.act, None if r.q is None else (float(r.q["out_scale"]), int(r.q["out_zp"])))
        return self._weighted(v, r, "FULLY_CONNECTED", w.contiguous(), 0, (o,),
                              ("FullyConnectedOptions", {"FusedActivationFunction": code}), guaranteed)

    def _weighted(self, v: _Val, r: _Layer, op: str, weight: torch.Tensor, axis: int, out_shape: tuple[int, ...],
                  options: tuple[str, dict[str, int]], guaranteed: tuple[int, int]) -> _Val:
        """CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED: weights, bias, output tensor and the clamp."""
        o = r.weight.shape[0]
        if r.q is None:  # float32
            if r.act not in FUSED:
                raise QuantError(f"cannot export {r.name}: the float exporter fuses ReLU, ReLU6 and Hardtanh(-1, 1) "
                                 f"only")
            w = self.g.const(f"{r.name}/weight", weight.numpy().astype(np.float32))
            bias = r.bias if r.bias is not None else torch.zeros(o)
            b = self.g.const(f"{r.name}/bias", bias.numpy().astype(np.float32))
            qp = None
        else:
            q = r.q
            w_scale = q["w_scale"].float().reshape(-1)
            # a fully connected layer's scales are one per tensor unless they differ (fc_per_channel)
            per_channel = op != "FULLY_CONNECTED" or not bool((w_scale == w_scale[0]).all())
            w_scale = w_scale if per_channel else w_scale[:1]
            zeros = [0] * w_scale.numel()
            w = self.g.const(f"{r.name}/weight", weight.numpy().astype(np.int8),
                             {"scale": w_scale.tolist(), "zero_point": zeros, "axis": axis})
            b_scale = (q["in_scale"].float() * w_scale).tolist()  # float32 product, checked by LiteRT
            b = self.g.const(f"{r.name}/bias", r.bias.numpy().astype(np.int32),
                             {"scale": b_scale, "zero_point": zeros, "axis": 0})
            qp = (float(q["out_scale"]), int(q["out_zp"]))
        y = self._activation(f"{r.name}/out", out_shape, qp)
        self.g.op(op, [v.t, w, b], [y], options)
        out = _Val(y, out_shape, qp)
        return out if r.q is None else self._produced(r.name, out, guaranteed, r.q["act"])

    def maxpool(self, v: _Val, name: str, m: Any) -> _Val:
        self._image(v, name)
        k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        if _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1) or m.ceil_mode:
            raise QuantError(f"cannot export {name}: MaxPool2d with padding, dilation or ceil_mode; only "
                             f"unpadded, undilated pooling maps to MAX_POOL_2D")
        return self._pool(v, name, "MAX_POOL_2D", k, s)

    def _pool(self, v: _Val, name: str, op: str, k: tuple[int, int], s: tuple[int, int]) -> _Val:
        c, h, w = v.shape
        out_shape = (c, (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1)
        y = self._activation(f"{name}/out", out_shape, v.qp)  # same scale and zero point as the input
        self.g.op(op, [v.t], [y], ("Pool2DOptions", {"Padding": 1, "StrideW": s[1], "StrideH": s[0],
                                                     "FilterWidth": k[1], "FilterHeight": k[0],
                                                     "FusedActivationFunction": 0}))
        return replace(v, t=y, shape=out_shape)  # max pooling commutes with the pending clamp

    def avgpool(self, v: _Val, name: str, layer: IntAvgPool2d) -> _Val:
        """int8: the DEPTHWISE_CONV_2D of ``IntAvgPool2d.as_conv`` (XNNPACK delegates it, not an int8
        AVERAGE_POOL_2D); the mean of values within the clamp stays within it, so no clamp is pending."""
        c, h, w = self._image(v, name)
        v = self.flush(v, name)
        out = self.conv(v, _weighted_record(layer.as_conv(c, h, w), name))
        return replace(out, range=v.range, clamp=v.clamp)

    def float_avgpool(self, v: _Val, name: str, g: Any) -> _Val:
        a = g.attrs
        if tuple(a["padding"]) != (0, 0) or a["ceil_mode"] or a.get("divisor_override") is not None:
            raise QuantError(f"cannot export {name}: AvgPool2d with padding, ceil_mode or divisor_override")
        c, h, w = self._image(v, name)
        return self._pool(v, name, "AVERAGE_POOL_2D", *pool_window(a["kernel"], a["stride"], h, w))

    # the entry points of the op records' emitters (``quant.ops``): int8 from a kernel, float from a node

    def conv_int(self, v: _Val, layer: IntConv2d, name: str) -> _Val:
        return self.conv(v, _weighted_record(layer, name))

    def fc_int(self, v: _Val, layer: IntLinear, name: str) -> _Val:
        return self.fc(v, _weighted_record(layer, name))

    def conv_float(self, v: _Val, g: Any, name: str) -> _Val:
        m, act = g.module, g.attrs.get("act")
        w, b = fold_bn(m, g.attrs["bn"]) if "bn" in g.attrs else (m.weight, m.bias)
        return self.conv(v, _Layer("conv", name, w.detach().float(), None if b is None else b.detach().float(), act,
                                   _pair(m.stride), _pair(m.padding), _pair(m.dilation), m.groups))

    def fc_float(self, v: _Val, g: Any, name: str) -> _Val:
        m = g.module
        return self.fc(v, _Layer("fc", name, m.weight.detach().float(), None if m.bias is None else
                                 m.bias.detach().float(), g.attrs.get("act")))

    def maxpool_float(self, v: _Val, g: Any, name: str) -> _Val:
        a = g.attrs
        return self.maxpool(v, name, SimpleNamespace(kernel_size=a["kernel"], stride=a["stride"], padding=a["padding"],
                                                     dilation=a["dilation"], ceil_mode=a["ceil_mode"]))

    def flatten(self, v: _Val, name: str) -> _Val:
        if len(v.shape) == 1:
            return v
        k = int(np.prod(v.shape))
        shape = self.g.const(f"{name}/shape", np.array([-1, k], dtype=np.int32))
        y = self._activation(f"{name}/out", (k,), v.qp)  # same scale and zero point as the input
        self.g.op("RESHAPE", [v.t, shape], [y])
        return replace(v, t=y, shape=(k,), flat_from=tuple(v.shape) if v.shape[1] * v.shape[2] > 1 else None)

    def clamp(self, v: _Val, name: str, lo: int, hi: int) -> _Val:
        """A stand-alone activation: narrows the pending clamp (emitted as MAXIMUM / MINIMUM)."""
        return replace(v, clamp=(max(v.clamp[0], lo), min(v.clamp[1], hi)))

    def add(self, a: _Val, b: _Val, name: str, layer: IntAdd | None,
            act: tuple[float, float] | None = None) -> _Val:
        """ADD of two tensors (``layer`` None: the float file, with fused activation ``act``)."""
        if a.shape != b.shape or a.flat_from != b.flat_from:
            raise QuantError(f"cannot export {name}: ADD of shapes {a.shape} and {b.shape} (no broadcasting)")
        a, b = self.flush(a, name), self.flush(b, name)
        qp = None if layer is None else (float(layer.out_scale), int(layer.out_zp))
        code, guaranteed = _fused(act if layer is None else layer.act, qp)
        if layer is None and act not in FUSED:
            raise QuantError(f"cannot export {name}: the float exporter fuses ReLU, ReLU6 and Hardtanh(-1, 1) only")
        y = self._activation(f"{name}/out", a.shape, qp)
        self.g.op("ADD", [a.t, b.t], [y], ("AddOptions", {"FusedActivationFunction": code}))
        out = _Val(y, a.shape, qp, flat_from=a.flat_from)
        return out if layer is None else self._produced(name, out, guaranteed, (layer.act_min, layer.act_max))

    def float_act(self, v: _Val, name: str, act: tuple[float, float]) -> _Val:
        """A stand-alone activation in the float file: RELU / RELU6 / RELU_N1_TO_1, or MAXIMUM / MINIMUM."""
        op = {(0.0, math.inf): "RELU", (0.0, 6.0): "RELU6", (-1.0, 1.0): "RELU_N1_TO_1"}.get(act)
        if op is not None:
            y = self._activation(f"{name}/out", v.shape, None)
            self.g.op(op, [v.t], [y])
            return replace(v, t=y)
        t = v.t
        for kind, bound in (("MAXIMUM", act[0]), ("MINIMUM", act[1])):
            if math.isfinite(bound):
                c = self.g.const(f"{name}/{kind.lower()}_bound", np.array([bound], dtype=np.float32))
                y = self._activation(f"{name}/{kind.lower()}", v.shape, None)
                self.g.op(kind, [t, c], [y])
                t = y
        return replace(v, t=t)

    def elementwise(self, v: _Val, name: str, op: str, layer: IntLUT | None) -> _Val:
        """LOGISTIC / HARD_SWISH with their own output qparams (``layer`` None: the float file). The
        kernels clamp to int8; a b-bit output range stays a pending clamp."""
        qp = None if layer is None else (float(layer.out_scale), layer.out_zp)
        v = self.flush(v, name) if layer is not None else v
        y = self._activation(f"{name}/out", v.shape, qp)
        self.g.op(op, [v.t], [y])
        out = _Val(y, v.shape, qp, flat_from=v.flat_from)
        return out if layer is None else replace(out, clamp=(layer.act_min, layer.act_max))

    def cat(self, vs: list[_Val], name: str) -> _Val:
        if any(v.qp != vs[0].qp for v in vs):
            raise QuantError(f"cannot export {name}: CONCATENATION inputs with different scales or zero points")
        if any(len(v.shape) != 3 or v.shape[1:] != vs[0].shape[1:] for v in vs):
            raise QuantError(f"cannot export {name}: concatenation of shapes {[v.shape for v in vs]} (images of one "
                             f"size, on the channel axis)")
        vs = [self.flush(v, name) for v in vs]
        shape = (sum(v.shape[0] for v in vs), *vs[0].shape[1:])
        y = self._activation(f"{name}/out", shape, vs[0].qp)
        self.g.op("CONCATENATION", [v.t for v in vs], [y], ("ConcatenationOptions", {"Axis": 3,
                                                                                      "FusedActivationFunction": 0}))
        return _Val(y, shape, vs[0].qp, range=vs[0].range, clamp=vs[0].range)


def _tflite_padding(r: _Layer, hw: tuple[int, int], k: tuple[int, int]) -> int | None:
    """Padding.VALID (1) for no padding, SAME (0) where TFLite's SAME pads exactly like ``r.padding``,
    None where neither does (the caller pads explicitly)."""
    if r.padding == (0, 0):
        return 1
    for n, kk, s, d, p in zip(hw, k, r.stride, r.dilation, r.padding):
        out = -(-n // s)
        total = max((out - 1) * s + (kk - 1) * d + 1 - n, 0)
        if total // 2 != p or total - total // 2 != p or (n + 2 * p - d * (kk - 1) - 1) // s + 1 != out:
            return None
    return 0


def _weighted_record(layer: IntConv2d | IntLinear, name: str) -> _Layer:
    r = _Layer("conv" if isinstance(layer, IntConv2d) else "fc", name, layer.weight, layer.bias, _layer_act(layer),
               q=_int_q(layer))
    _check_int_layer(r)
    if isinstance(layer, IntConv2d):
        if isinstance(layer.padding, str):
            raise QuantError(f"cannot export {name}: padding={layer.padding!r}; give the padding as integers")
        r = replace(r, stride=_pair(layer.stride), padding=_pair(layer.padding), dilation=_pair(layer.dilation),
                    groups=int(layer.groups))
    return r


#: integer kernel -> its op record (``IntReLU``: files converted before stand-alone clamps were IntClamp)
KERNEL_OP: dict[type, Any] = {**{op.kernel: op for op in OP_RULES.values()},
                              IntReLU: SimpleNamespace(emit=lambda em, layer, ins, name: em.clamp(
                                  ins[0], name, layer.zero_point, INT8_MAX))}


def _emit_int(em: _Emitter, imodel: IntModel, v0: _Val) -> _Val:
    """Emit every layer of the integer engine between QuantizeInput and Dequantize with its op record's
    emitter (``quant.ops.OPS[kind].emit``); returns the output."""
    vals = {0: v0}
    for i in range(1, len(imodel.layers) - 1):
        layer = imodel.layers[i]
        name = f"layers.{i} ({type(layer).__name__})"
        op = KERNEL_OP.get(type(layer))
        if op is None or op.emit is None or (isinstance(layer, IntFlatten) and (layer.start_dim, layer.end_dim)
                                               != (1, -1)):
            raise QuantError(f"cannot export {name}: no TFLite lowering for {type(layer).__name__}")
        vals[i] = op.emit(em, layer, [vals[j] for j in imodel.inputs[i]], name)
    return vals[imodel.inputs[-1][0]]


def _emit_float(em: _Emitter, model: nn.Module, v: _Val) -> _Val:
    """Emit a float model from its normalised graph (``quant.graph.model_graph``: the same tracing,
    BatchNorm folding with the running statistics and activation fusion as ``quant.quantize``), each
    node with its op record's float emitter (``quant.ops.OPS[kind].emit_float``)."""
    vals: dict[str, _Val] = {}
    for g in model_graph(copy.deepcopy(model).eval()):
        ins = [vals[i] for i in g.inputs]
        if g.kind == "input":
            vals[g.name] = v
        elif g.kind == "output":
            return ins[0]
        elif g.kind in OP_RULES and OP_RULES[g.kind].emit_float is not None:
            vals[g.name] = OP_RULES[g.kind].emit_float(em, g, ins, g.path or g.name)
        else:
            raise QuantError(f"cannot export {g.path or g.name}: no float TFLite lowering for {g.kind}")
    raise QuantError("the model's graph has no output")


def export_tflite(model: IntModel | nn.Module, path: str | Path | None, input_shape: tuple[int, int, int],
                  int8_input: bool = False, description: str = "") -> bytes:
    """The TFLite flatbuffer of ``model`` (written atomically to ``path`` unless None); returns its bytes.

    model: an ``IntModel`` (int8 file that equals ``forward_int`` bit for bit in every LiteRT kernel set
        with the matching ``rounding``) or a float model (float32 file, BatchNorm folded).
    input_shape: (C, H, W) of one image; the file's input is (N, H, W, C), N resizable.
    int8_input: int8 file only: take the quantized int8 tensor (the engine's QuantizeInput output) as the
        input instead of the float32 image with a QUANTIZE op.
    Refuses (``QuantError`` naming the layer) unsupported layers, degenerate scales (zero, non-finite,
    requantization multiplier >= 256) and accumulators that could overflow int32.
    """
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise QuantError(f"input_shape must be (C, H, W) of one image, got {input_shape!r}")
    c, h, w = shape
    g = _Graph(int8=isinstance(model, IntModel))
    em = _Emitter(g)
    if isinstance(model, IntModel):
        qin: QuantizeInput = model.layers[0]
        _check_scale("the input", "input", qin.scale)
        qp = (float(qin.scale), int(qin.zero_point))
        if int8_input:
            inp = g.tensor("input", [-1, h, w, c], "INT8", _per_tensor(*qp))
            x = inp
        else:
            inp = g.tensor("input", [-1, h, w, c], "FLOAT32")
            x = em._activation("input/quantized", shape, qp)
            g.op("QUANTIZE", [inp], [x])
        v = _Val(x, shape, qp, (INT8_MIN, INT8_MAX), (qin.qmin, qin.qmax))
        out = em.flush(_emit_int(em, model, v), "output")
        out_qp = model.layers[-1]
        if not isinstance(out_qp, Dequantize) or (float(out_qp.scale), int(out_qp.zero_point)) != out.qp:
            raise QuantError("the model's Dequantize does not match its last layer; re-run convert")
    else:
        if int8_input:
            raise QuantError("int8_input needs an IntModel; a float model takes float32 input")
        inp = g.tensor("input", [-1, h, w, c], "FLOAT32")
        out = _emit_float(em, model, _Val(inp, shape, None))  # BatchNorm folds with its running statistics
    if out.flat_from is not None and len(out.shape) == 1:
        raise QuantError("cannot export: the output is an image flattened in NCHW order; end the model with a "
                         "fully connected layer (the file flattens in NHWC order)")
    data = _serialize(g, [inp], [out.t], description or "quantization-dnns export")
    if path is not None:
        atomic_write_bytes(path, data)
    return data


# ---------------------------------------------------------------------------------------------------
# Running a file with LiteRT.

class TFLiteRunner(NHWCRunner):
    """A LiteRT interpreter for one file and kernel set: ``runner(x)`` maps an (N, C, H, W) torch tensor
    (float32, or integer values for an int8-input file) to the output as a torch tensor.

    mode: 'ref' (BUILTIN_REF, reference kernels), 'builtin' (BUILTIN_WITHOUT_DEFAULT_DELEGATES, optimized
    kernels) or 'xnnpack' (the default resolver, which applies the XNNPACK delegate).
    The batch dimension is resized when N changes (then the tensors are reallocated).
    """

    def __init__(self, model: bytes | str | Path, mode: str = "xnnpack", num_threads: int = 1) -> None:
        if mode not in MODES:
            raise QuantError(f"unknown LiteRT mode {mode!r}; choose one of: {', '.join(MODES)}")
        Interpreter, OpResolverType = litert()
        content = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
        self.mode = mode
        self.interp = Interpreter(model_content=bytes(content), num_threads=num_threads,
                                  experimental_op_resolver_type=getattr(OpResolverType, MODES[mode]))
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.batch = int(self.inp["shape"][0])

    def run_nhwc(self, x: np.ndarray) -> np.ndarray:
        """Run one (N, H, W, C) numpy batch of the input's dtype; returns the output array (a copy)."""
        if x.shape[0] != self.batch:
            self.interp.resize_tensor_input(self.inp["index"], list(x.shape))
            self.interp.allocate_tensors()
            self.batch = x.shape[0]
        self.interp.set_tensor(self.inp["index"], x)
        self.interp.invoke()
        return self.interp.get_tensor(self.out["index"])

    def delegated(self) -> bool:
        """True when one delegate node (XNNPACK) runs the whole graph, from the input to the output."""
        ops = self.interp._get_ops_details()  # noqa: SLF001 (the public API has no node query)
        return any(op["op_name"] == "DELEGATE" and self.inp["index"] in op["inputs"]
                   and list(op["outputs"]) == [self.out["index"]] for op in ops)


def make_runner(model: bytes | str | Path, mode: str, num_threads: int = 1) -> TFLiteRunner | TFLMRunner:
    """The interpreter of one runtime (``RUNTIMES``) for a file: LiteRT in kernel set ``mode``, or TFLM."""
    if mode == "tflm":
        return TFLMRunner(model)
    return TFLiteRunner(model, mode, num_threads)
