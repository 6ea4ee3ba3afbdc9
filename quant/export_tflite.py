"""Write an integer model (or its float original) as a TFLite flatbuffer, and run it with LiteRT.

    data = export_tflite(imodel, "model.tflite", input_shape=(1, 28, 28))       # int8 file
    data = export_tflite(float_model, "model_f32.tflite", input_shape=(1, 28, 28))  # float32 file
    logits = TFLiteRunner(data, mode="xnnpack")(x)                              # x: (N, C, H, W)

No TensorFlow: the flatbuffer is built with the ``tflite`` schema package and ``flatbuffers``; it is
run with ``ai-edge-litert`` (the LiteRT interpreter). Both are optional imports: a missing package is
a one-line ``QuantError`` with the pip command.

The int8 file (``IntModel``) computes exactly what the integer engine computes, bit for bit, in each
LiteRT kernel set with its matching ``IntModel.rounding`` (``MODES``):

    float32 input (N, H, W, C) -> QUANTIZE -> [CONV_2D (per-channel int8, int32 bias, fused RELU)
    | MAX_POOL_2D | RESHAPE [-1, K] | FULLY_CONNECTED (per-tensor int8, int32 bias, fused RELU)]
    -> int8 logits (the engine's ``forward_int``)

with ``int8_input=True`` the file takes the quantized int8 tensor instead (no QUANTIZE). Layout is
NHWC: conv weights are OHWI, and the fully-connected weights after a flatten are permuted from the
engine's (C, H, W) order to (H, W, C). The batch dimension is resizable (``shape_signature`` -1).

b < 8 bits are stored in int8 tensors with the b-bit scales and zero points. LiteRT derives a fused
activation's clamp from the output scale and zero point only, clamped to the int8 range: RELU gives
[max(-128, zp), 127], none gives [-128, 127]; the tensor's quantization min/max are never read by a
kernel. The b-bit clamps of the engine ([qmin_b, qmax_b], relu: [max(qmin_b, zp), qmax_b]) are
therefore written as explicit MAXIMUM / MINIMUM ops with constant int8 bounds where they are narrower
than what the fused activation gives. Each such clamp is deferred past MAX_POOL_2D and RESHAPE (they
keep the scale and zero point, and max pooling commutes with a monotone clamp), so it runs on the
pooled tensor. An engine converted with ``convert(..., clamp="int8")`` needs none: its file holds only
the ops above.

The float file (a float ``nn.Sequential`` of Conv2d, BatchNorm2d, ReLU, MaxPool2d, Flatten, Linear,
Dropout, Identity) has the same graph in float32, with BatchNorm folded into the conv (``fold_bn``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from quant.errors import QuantError
from quant.fixed_point import INT32_MAX, quantize_multiplier
from quant.fold import fold_bn
from quant.integer import Dequantize, IntConv2d, IntFlatten, IntLinear, IntMaxPool2d, IntModel, QuantizeInput
from quant.transforms import leaves
from utils.io import atomic_write_bytes

#: interpreter mode (the name of the matching ``IntModel.rounding``) -> LiteRT ``OpResolverType`` member
MODES = {"ref": "BUILTIN_REF", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "xnnpack": "AUTO"}

#: builtin operator -> (code in the schema, version written for int8, version for float32)
OPS = {
    "QUANTIZE": (114, 2, 1),
    "CONV_2D": (3, 3, 1),
    "MAX_POOL_2D": (17, 2, 1),
    "RESHAPE": (22, 1, 1),
    "FULLY_CONNECTED": (9, 4, 1),
    "MAXIMUM": (55, 2, 1),
    "MINIMUM": (57, 2, 1),
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
# Lowering: both model kinds become a list of plain layer records, then one emitter writes the ops.

@dataclass
class _Layer:
    """One op of the file. kind: 'conv' | 'pool' | 'flatten' | 'fc'. ``q`` holds the integer data
    (None in the float file): {'in_scale', 'w_scale', 'out_scale', 'in_zp', 'out_zp', 'act': (lo, hi)}."""

    kind: str
    name: str
    weight: torch.Tensor | None = None  # conv (O, I, kh, kw), fc (O, K); int8 values or float32
    bias: torch.Tensor | None = None  # int32 or float32
    relu: bool = False
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    kernel: tuple[int, int] = (1, 1)  # pool
    q: dict[str, Any] | None = None


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_record(name: str, weight: torch.Tensor, bias: torch.Tensor | None, m: Any, relu: bool,
                 q: dict[str, Any] | None = None) -> _Layer:
    if m.groups != 1:
        raise QuantError(f"cannot export {name}: Conv2d with groups={m.groups} (DEPTHWISE_CONV_2D is not "
                         f"supported yet); use groups=1")
    if isinstance(m.padding, str):
        raise QuantError(f"cannot export {name}: Conv2d padding={m.padding!r}; give the padding as integers")
    return _Layer("conv", name, weight, bias, relu, _pair(m.stride), _pair(m.padding), _pair(m.dilation), q=q)


def _pool_record(name: str, m: Any) -> _Layer:
    k = _pair(m.kernel_size)
    s = _pair(m.stride if m.stride is not None else m.kernel_size)
    if _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1) or m.ceil_mode:
        raise QuantError(f"cannot export {name}: MaxPool2d with padding, dilation or ceil_mode; only "
                         f"unpadded, undilated pooling maps to MAX_POOL_2D")
    return _Layer("pool", name, kernel=k, stride=s)


def _int_q(layer: IntConv2d | IntLinear) -> dict[str, Any]:
    return {"in_scale": layer.in_scale, "w_scale": layer.w_scale, "out_scale": layer.out_scale,
            "in_zp": layer.in_zp, "out_zp": layer.out_zp, "act": (layer.act_min, layer.act_max)}


def _int_records(imodel: IntModel) -> list[_Layer]:
    """The integer engine's layers between QuantizeInput and Dequantize as records; an unsupported
    layer raises ``QuantError`` naming it."""
    out = []
    for i, layer in enumerate(imodel.layers[1:-1], start=1):
        name = f"layers.{i} ({type(layer).__name__})"
        if isinstance(layer, IntConv2d):
            out.append(_conv_record(name, layer.weight, layer.bias, layer, layer.relu, _int_q(layer)))
        elif isinstance(layer, IntLinear):
            out.append(_Layer("fc", name, layer.weight, layer.bias, layer.relu, q=_int_q(layer)))
        elif isinstance(layer, IntMaxPool2d):
            out.append(_pool_record(name, layer))
        elif isinstance(layer, IntFlatten) and (layer.start_dim, layer.end_dim) == (1, -1):
            out.append(_Layer("flatten", name))
        else:
            hint = " (put the ReLU right after a Conv2d or Linear so that it is fused)" \
                if type(layer).__name__ == "IntReLU" else ""
            raise QuantError(f"cannot export {name}: no TFLite lowering for {type(layer).__name__}{hint}; "
                             f"supported: IntConv2d, IntLinear, IntMaxPool2d, IntFlatten(start_dim=1)")
    return out


def _float_records(model: nn.Module) -> list[_Layer]:
    """Records of a float ``nn.Sequential``: Conv2d [BatchNorm2d] [ReLU], Linear [ReLU], MaxPool2d,
    Flatten; Identity and Dropout are skipped (eval mode)."""
    items = [(p, m) for p, m in leaves(model) if not isinstance(m, (nn.Identity, nn.Dropout))]
    out: list[_Layer] = []
    i = 0
    while i < len(items):
        path, m = items[i]
        nxt = lambda j: items[j][1] if j < len(items) else None  # noqa: E731
        if isinstance(m, nn.Conv2d):
            w, b = (m.weight, m.bias)
            if isinstance(nxt(i + 1), nn.BatchNorm2d):
                w, b = fold_bn(m, nxt(i + 1))
                i += 1
            relu = isinstance(nxt(i + 1), nn.ReLU)
            out.append(_conv_record(path, w.detach().float(), None if b is None else b.detach().float(), m, relu))
            i += 1 + relu
        elif isinstance(m, nn.Linear):
            relu = isinstance(nxt(i + 1), nn.ReLU)
            out.append(_Layer("fc", path, m.weight.detach().float(),
                              None if m.bias is None else m.bias.detach().float(), relu))
            i += 1 + relu
        elif isinstance(m, nn.MaxPool2d):
            out.append(_pool_record(path, m))
            i += 1
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            out.append(_Layer("flatten", path))
            i += 1
        else:
            raise QuantError(f"cannot export layer {path!r} of type {type(m).__name__}; the float exporter "
                             f"supports Conv2d, BatchNorm2d (after a conv), ReLU (after a conv or linear), "
                             f"MaxPool2d, Flatten, Linear, Dropout, Identity")
    return out


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


def _fused_range(relu: bool, zp: int) -> tuple[int, int]:
    """LiteRT's clamp of an int8 output with fused RELU (or none): CalculateActivationRangeQuantized
    with scale-independent bounds: relu -> [max(-128, zp + round(0 / s)), 127]."""
    return (max(INT8_MIN, zp) if relu else INT8_MIN), INT8_MAX


# ---------------------------------------------------------------------------------------------------
# The emitter.

class _Emitter:
    """Appends the ops of ``_Layer`` records to a ``_Graph``, tracking the current tensor, its NCHW
    shape (batch left out), its qparams and a pending b-bit clamp (int8 file only)."""

    def __init__(self, g: _Graph, x: int, shape: tuple[int, ...], qp: tuple[float, int] | None) -> None:
        self.g, self.x, self.shape, self.qp = g, x, shape, qp
        self.range = (INT8_MIN, INT8_MAX)  # what the ops so far guarantee about the current tensor
        self.clamp = (INT8_MIN, INT8_MAX)  # the range the engine clamps the current tensor to
        self.flat_from: tuple[int, int, int] | None = None  # (C, H, W) when the last op flattened a 4-D tensor

    def _quant(self) -> dict[str, Any] | None:
        return None if self.qp is None else _per_tensor(*self.qp)

    def _activation(self, name: str, shape: tuple[int, ...]) -> int:
        nhwc = [-1, shape[1], shape[2], shape[0]] if len(shape) == 3 else [-1, *shape]
        return self.g.tensor(name, nhwc, "FLOAT32" if self.qp is None else "INT8", self._quant())

    def produced(self, name: str, guaranteed: tuple[int, int], clamp: tuple[int, int]) -> None:
        """The current tensor was just made by an op that clamps to ``guaranteed``; the engine clamps it
        to ``clamp`` (applied lazily by ``flush``, after any MAX_POOL_2D / RESHAPE in between)."""
        if clamp[0] < guaranteed[0] or clamp[1] > guaranteed[1]:
            raise QuantError(f"cannot export {name}: its clamp {list(clamp)} is wider than LiteRT's "
                             f"{list(guaranteed)}; convert the model again")
        self.range, self.clamp = guaranteed, clamp

    def flush(self, name: str) -> None:
        """Emit MAXIMUM / MINIMUM with constant int8 bounds where the engine's clamp is narrower than
        what the ops so far guarantee (b < 8 bits)."""
        for op, bound, active in (("MAXIMUM", self.clamp[0], self.clamp[0] > self.range[0]),
                                  ("MINIMUM", self.clamp[1], self.clamp[1] < self.range[1])):
            if active:
                c = self.g.const(f"{name}/{op.lower()}_bound", np.array([bound], dtype=np.int8), self._quant())
                y = self._activation(f"{name}/{op.lower()}", self.shape)
                self.g.op(op, [self.x, c], [y])
                self.x = y
        self.range = self.clamp

    def conv(self, r: _Layer) -> None:
        c_in, h, w = self.shape
        o, i, kh, kw = r.weight.shape
        if i != c_in:
            raise QuantError(f"cannot export {r.name}: it expects {i} input channels, the tensor has {c_in}")
        padding = _tflite_padding(r, (h, w), (kh, kw))
        oh = (h + 2 * r.padding[0] - r.dilation[0] * (kh - 1) - 1) // r.stride[0] + 1
        ow = (w + 2 * r.padding[1] - r.dilation[1] * (kw - 1) - 1) // r.stride[1] + 1
        w_ohwi = r.weight.permute(0, 2, 3, 1).contiguous()
        self._weighted(r, "CONV_2D", w_ohwi, (o, oh, ow), ("Conv2DOptions", {
            "Padding": padding, "StrideW": r.stride[1], "StrideH": r.stride[0], "FusedActivationFunction": int(r.relu),
            "DilationWFactor": r.dilation[1], "DilationHFactor": r.dilation[0]}))

    def fc(self, r: _Layer) -> None:
        if len(self.shape) != 1:
            raise QuantError(f"cannot export {r.name}: a fully connected layer needs a flattened input, got shape "
                             f"{tuple(self.shape)}; add nn.Flatten before it")
        o, k = r.weight.shape
        if k != self.shape[0]:
            raise QuantError(f"cannot export {r.name}: it expects {k} inputs, the tensor has {self.shape[0]}")
        w = r.weight
        if self.flat_from is not None:  # engine flattens (C, H, W), the file (H, W, C)
            w = w.reshape(o, *self.flat_from).permute(0, 2, 3, 1).reshape(o, k)
        self._weighted(r, "FULLY_CONNECTED", w.contiguous(), (o,),
                       ("FullyConnectedOptions", {"FusedActivationFunction": int(r.relu)}))

    def _weighted(self, r: _Layer, op: str, weight: torch.Tensor, out_shape: tuple[int, ...],
                  options: tuple[str, dict[str, int]]) -> None:
        """CONV_2D / FULLY_CONNECTED: weights, bias, output tensor and (int8) the layer's clamp."""
        self.flush(r.name)
        o = weight.shape[0]
        if r.q is None:  # float32
            w = self.g.const(f"{r.name}/weight", weight.numpy().astype(np.float32))
            bias = r.bias if r.bias is not None else torch.zeros(o)
            b = self.g.const(f"{r.name}/bias", bias.numpy().astype(np.float32))
        else:
            q = r.q
            w_scale = q["w_scale"].float().reshape(-1)
            per_channel = op == "CONV_2D"
            if not per_channel and w_scale.numel() > 1 and not bool((w_scale == w_scale[0]).all()):
                raise QuantError(f"cannot export {r.name}: per-channel fully-connected weights; use one scale")
            w_scale = w_scale if per_channel else w_scale[:1]
            zeros = [0] * w_scale.numel()
            w = self.g.const(f"{r.name}/weight", weight.numpy().astype(np.int8),
                             {"scale": w_scale.tolist(), "zero_point": zeros, "axis": 0})
            b_scale = (q["in_scale"].float() * w_scale).tolist()  # float32 product, checked by LiteRT
            b = self.g.const(f"{r.name}/bias", r.bias.numpy().astype(np.int32),
                             {"scale": b_scale, "zero_point": zeros, "axis": 0})
            self.qp = (float(q["out_scale"]), int(q["out_zp"]))
        y = self._activation(f"{r.name}/out", out_shape)
        self.g.op(op, [self.x, w, b], [y], options)
        self.x, self.shape, self.flat_from = y, out_shape, None
        if r.q is not None:
            self.produced(r.name, _fused_range(r.relu, self.qp[1]), r.q["act"])

    def pool(self, r: _Layer) -> None:
        c, h, w = self.shape
        out_shape = (c, (h - r.kernel[0]) // r.stride[0] + 1, (w - r.kernel[1]) // r.stride[1] + 1)
        y = self._activation(f"{r.name}/out", out_shape)  # same scale and zero point as the input
        self.g.op("MAX_POOL_2D", [self.x], [y], ("Pool2DOptions", {
            "Padding": 1, "StrideW": r.stride[1], "StrideH": r.stride[0], "FilterWidth": r.kernel[1],
            "FilterHeight": r.kernel[0], "FusedActivationFunction": 0}))
        self.x, self.shape = y, out_shape

    def flatten(self, r: _Layer) -> None:
        if len(self.shape) == 1:
            return
        k = int(np.prod(self.shape))
        shape = self.g.const(f"{r.name}/shape", np.array([-1, k], dtype=np.int32))
        y = self._activation(f"{r.name}/out", (k,))  # same scale and zero point as the input
        self.g.op("RESHAPE", [self.x, shape], [y])
        self.flat_from = tuple(self.shape) if len(self.shape) == 3 else None
        self.x, self.shape = y, (k,)


def _tflite_padding(r: _Layer, hw: tuple[int, int], k: tuple[int, int]) -> int:
    """Padding.VALID (1) for no padding, SAME (0) where TFLite's SAME pads exactly like ``r.padding``."""
    if r.padding == (0, 0):
        return 1
    for n, kk, s, d, p in zip(hw, k, r.stride, r.dilation, r.padding):
        out = -(-n // s)
        total = max((out - 1) * s + (kk - 1) * d + 1 - n, 0)
        if total // 2 != p or (n + 2 * p - d * (kk - 1) - 1) // s + 1 != out:
            raise QuantError(f"cannot export {r.name}: padding {r.padding} has no TFLite equivalent (SAME pads "
                             f"{total // 2} before for this input size); use padding 0 or 'same'-like padding")
    return 0


_EMIT = {"conv": _Emitter.conv, "fc": _Emitter.fc, "pool": _Emitter.pool, "flatten": _Emitter.flatten}


def export_tflite(model: IntModel | nn.Module, path: str | Path | None, input_shape: tuple[int, int, int],
                  int8_input: bool = False, description: str = "") -> bytes:
    """The TFLite flatbuffer of ``model`` (written atomically to ``path`` unless None); returns its bytes.

    model: an ``IntModel`` (int8 file that equals ``forward_int`` bit for bit in every LiteRT kernel set
        with the matching ``rounding``) or a float ``nn.Sequential`` (float32 file, BatchNorm folded).
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
    if isinstance(model, IntModel):
        records = _int_records(model)
        for r in records:
            if r.q is not None:
                _check_int_layer(r)
        qin: QuantizeInput = model.layers[0]
        _check_scale("the input", "input", qin.scale)
        qp = (float(qin.scale), int(qin.zero_point))
        if int8_input:
            inp = g.tensor("input", [-1, h, w, c], "INT8", _per_tensor(*qp))
            em = _Emitter(g, inp, shape, qp)
        else:
            inp = g.tensor("input", [-1, h, w, c], "FLOAT32")
            em = _Emitter(g, inp, shape, qp)
            em.x = em._activation("input/quantized", shape)
            g.op("QUANTIZE", [inp], [em.x])
        em.produced("the input", (INT8_MIN, INT8_MAX), (qin.qmin, qin.qmax))
    else:
        if int8_input:
            raise QuantError("int8_input needs an IntModel; a float model takes float32 input")
        records = _float_records(model)  # BatchNorm folds with its running statistics
        inp = g.tensor("input", [-1, h, w, c], "FLOAT32")
        em = _Emitter(g, inp, shape, None)
    for i, r in enumerate(records):
        if r.kind == "flatten" and (i + 1 == len(records) or records[i + 1].kind != "fc") and len(em.shape) == 3:
            raise QuantError(f"cannot export {r.name}: Flatten of an image must be followed by a fully connected "
                             f"layer (the file flattens in NHWC order and permutes that layer's weights)")
        if r.kind in ("conv", "pool") and len(em.shape) != 3:
            raise QuantError(f"cannot export {r.name}: it needs an image input, got shape {tuple(em.shape)}")
        _EMIT[r.kind](em, r)
    if isinstance(model, IntModel):
        em.flush("output")
        out_qp = model.layers[-1]
        if not isinstance(out_qp, Dequantize) or (float(out_qp.scale), int(out_qp.zero_point)) != em.qp:
            raise QuantError("the model's Dequantize does not match its last layer; re-run convert")
    data = _serialize(g, [inp], [em.x], description or "quantization-dnns export")
    if path is not None:
        atomic_write_bytes(path, data)
    return data


# ---------------------------------------------------------------------------------------------------
# Running a file with LiteRT.

class TFLiteRunner:
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

    def nhwc(self, x: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) torch tensor -> contiguous (N, H, W, C) numpy array of the input's dtype."""
        return np.ascontiguousarray(x.permute(0, 2, 3, 1).cpu().numpy().astype(self.inp["dtype"]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_nhwc(self.nhwc(x)))

    def delegated(self) -> bool:
        """True when one delegate node (XNNPACK) runs the whole graph, from the input to the output."""
        ops = self.interp._get_ops_details()  # noqa: SLF001 (the public API has no node query)
        return any(op["op_name"] == "DELEGATE" and self.inp["index"] in op["inputs"]
                   and list(op["outputs"]) == [self.out["index"]] for op in ops)
