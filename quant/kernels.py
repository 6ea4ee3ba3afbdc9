"""Integer kernels: the layers of the integer engine, one class per TFLite op, b-bit values in int32 tensors.

Pure integer arithmetic on tensors, importing neither the fake-quant modules nor the engine: the
fake-quant layers call the same kernels for their runtime-exact eval path (``quant.modules``), the
engine (``quant.integer``) runs them node by node, and the exporter reads their parameters.

Weighted layers (conv, depthwise conv, fully connected) compute, per output channel c,

    acc = sum((q_in - zp_in) * q_w[c]) + bias[c]                       (exact)
    q_out = clamp(requantize(acc, M[c]) + zp_out, act_min, act_max)     (M = s_in * s_w[c] / s_out)

Exact accumulation: the sums are done by a float conv / matmul over integer values: float32 where
every partial sum provably stays below 2^24 (``f32_exact``), else float64. With
|q_in - zp_in| <= 2^8, |q_w| <= 2^7 and K <= 2^20 terms, every partial sum is an integer below
2^35 < 2^53, so float64 represents every intermediate exactly (and float64 convolution is
direct im2col + GEMM, no Winograd/FFT). The int32 range of acc is checked, never wrapped.

Requantization (``rounding``; see ``quant.fixed_point``): 'ref' (LiteRT reference kernels: conv
SRDHM + RoundingDivideByPOT, fully connected single rounding), 'builtin' (ruy: ties toward +inf),
'xnnpack' (float32 scale, round half to even), 'tflm' (TensorFlow Lite Micro: as 'ref', but fully
connected rounds as conv does). Multipliers: conv
M = double(s_in) * double(s_w[c]) / double(s_out) (TFLite ``PopulateConvolutionQuantizationParams``),
fully connected the same, per tensor or per channel (LiteRT's ``GetQuantizedConvolutionMultipler``
multiplies the scales in double; a float32 product gave a Fashion-MNIST cnn_bn logit one step off the reference
kernel's, accumulator -13911); XNNPACK float(float(s_in * s_w[c]) / s_out).

Fused activations clamp to [act_min, act_max] = the b-bit range narrowed by the activation's float
bounds quantized as TFLite's ``CalculateActivationRangeQuantized`` does: zp + round_half_away(f32(b) / s)
(ReLU: [max(qmin, zp), qmax]).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.errors import QuantError
from quant.fixed_point import (DWCONV_TAIL, INT16_MAX, INT16_MIN, INT32_MAX, KERNEL_ROUNDING, doubling_high_mul16,
                               multiplier16, multiply_by_quantized_multiplier, quantize_multiplier,
                               quantize_multipliers, requantize_float32, rounding_divide_by_pot, srdhm16,
                               xnnpack_scale)
from quant.qparams import QParams, quantize, round_half_away

INT_LAYERS: dict[str, type["IntLayer"]] = {}


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _register(cls: type["IntLayer"]) -> type["IntLayer"]:
    INT_LAYERS[cls.__name__] = cls
    return cls


class IntLayer(nn.Module):
    """Base: plain attributes listed in ``attrs`` plus buffers; ``spec``/``from_spec`` for checkpoints."""

    attrs: tuple[str, ...] = ()
    rounding = "ref"

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "attrs": {a: getattr(self, a) for a in self.attrs},
                "buffers": {k: v.clone() for k, v in self._buffers.items() if v is not None}}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "IntLayer":
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        for a, v in spec["attrs"].items():
            setattr(obj, a, v)
        for k, v in spec["buffers"].items():
            obj.register_buffer(k, v)
        return obj

    def extra_repr(self) -> str:
        return ", ".join(f"{a}={getattr(self, a)}" for a in self.attrs)

    def out_qparams(self) -> QParams:
        """The output's qparams, for the layers that requantize (``out_scale``, ``out_zp``, ``out_qmin/max``)."""
        return QParams(self.out_scale, torch.tensor(self.out_zp, dtype=torch.int32), self.out_qmin, self.out_qmax)


def quantize_bound(v: float, qp: QParams) -> int:
    """TFLite's quantization of an activation bound: zp + round_half_away(f32(v) / scale) (float32)."""
    return int(qp.zero_point) + int(round_half_away(torch.tensor(v, dtype=torch.float32) / qp.scale.float()))


def act_range(out_qp: QParams, act: tuple[float, float] | None, clamp: str) -> tuple[int, int]:
    """[act_min, act_max] of an output: its b-bit range ('bits') or int8 ('int8'), narrowed by the fused
    activation's float bounds ``act`` = (lo, hi) (None: no activation; ReLU is (0, inf))."""
    lo, hi = (out_qp.qmin, out_qp.qmax) if clamp == "bits" else (-128, 127)
    if act is not None:
        if act[0] > -math.inf:
            lo = max(lo, quantize_bound(act[0], out_qp))
        if act[1] < math.inf:
            hi = min(hi, quantize_bound(act[1], out_qp))
    return lo, hi


def _wrap16(x: torch.Tensor) -> torch.Tensor:
    return ((x + (1 << 15)) & 0xFFFF) - (1 << 15)


def _nhwc_select(head: torch.Tensor, tail: torch.Tensor, n: int) -> torch.Tensor:
    """``head`` for the first n elements of the tensor in NHWC order (flattened over the batch), ``tail``
    for the rest: where an optimized LiteRT kernel's vector loop ends and its scalar loop takes over."""
    def nhwc(t: torch.Tensor) -> torch.Tensor:
        return (t.permute(0, *range(2, t.dim()), 1) if t.dim() > 2 else t).contiguous()
    out = nhwc(tail)
    out.view(-1)[:n] = nhwc(head).view(-1)[:n]
    return out.permute(0, -1, *range(1, out.dim() - 1)) if out.dim() > 2 else out


@_register
class QuantizeInput(IntLayer):
    """q = clamp(round_half_away(x / scale) + zero_point, qmin, qmax), float32 division, int32 out
    (TFLite QUANTIZE, reference kernel; TFLM's is the same). With rounding 'xnnpack':
    clamp(round_half_even(x * float32(1 / scale)) + zp), as XNNPACK's f32->qs8 convert (its params hold
    the reciprocal of the scale). With 'builtin', LiteRT's optimized QUANTIZE: that for the elements
    its 8-wide vector loop takes, and the reference rounding for the last (numel % 8) elements of the
    whole NHWC batch tensor, which its scalar loop finishes (measured: -3.0908973 / 0.0349253937 = -88.5
    exactly gives -88 in the vector loop, -89 in the scalar tail and the reference kernel). The tail
    depends on the batch: the engine equals the runtime when both are given the same batch."""

    attrs = ("zero_point", "qmin", "qmax")

    def __init__(self, qp: QParams, clamp: str = "bits") -> None:
        super().__init__()
        self.register_buffer("scale", qp.scale.float().reshape(()))
        self.zero_point = int(qp.zero_point)
        self.qmin, self.qmax = (qp.qmin, qp.qmax) if clamp == "bits" else (-128, 127)

    def qparams(self) -> QParams:
        return QParams(self.scale, torch.tensor(self.zero_point, dtype=torch.int32), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rounding not in ("xnnpack", "builtin"):
            return quantize(x, self.qparams())
        y = (x.float() * torch.reciprocal(self.scale)).clamp(self.qmin - self.zero_point,
                                                             self.qmax - self.zero_point)
        q = torch.round(y).to(torch.int32) + self.zero_point  # x * f32(1 / scale), round half to even
        if self.rounding == "builtin" and x.numel() % 8:  # the optimized kernel's scalar loop: the reference
            q = _nhwc_select(q, quantize(x, self.qparams()), x.numel() - x.numel() % 8)
        return q


@_register
class Dequantize(IntLayer):
    """real = float32(scale * (q - zero_point))."""

    attrs = ("zero_point", "qmin", "qmax")

    def __init__(self, qp: QParams) -> None:
        super().__init__()
        self.register_buffer("scale", qp.scale.float().reshape(()))
        self.zero_point, self.qmin, self.qmax = int(qp.zero_point), qp.qmin, qp.qmax

    def qparams(self) -> QParams:
        return QParams(self.scale, torch.tensor(self.zero_point, dtype=torch.int32), self.qmin, self.qmax)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.zero_point).float() * self.scale


class _IntWeighted(IntLayer):
    """Shared: integer weights, int32 bias, per-channel M0/shift and XNNPACK scale, requantization."""

    kind = "conv"
    common = ("in_zp", "out_zp", "act_min", "act_max", "relu", "act", "out_qmin", "out_qmax", "rounding",
              "f32_exact", "may_overflow")
    act: tuple[float, float] | None = None  # float bounds of the fused activation (checkpoints before it: relu)

    def _setup(self, p: dict[str, Any], clamp: str) -> None:
        in_qp, w_qp, out_qp = p["in_qp"], p["w_qp"], p["out_qp"]
        c = p["weight"].shape[0]
        s_in = in_qp.scale.float().reshape(())
        s_w = w_qp.scale.float().reshape(-1).expand(c).clone()
        s_out = out_qp.scale.float().reshape(())
        # double(s_in) * double(s_w) / double(s_out) for conv and fully connected alike, as LiteRT 2.x
        # (kernel_util's GetQuantizedConvolutionMultipler); older TFLite formed the FC product in float32,
        # which moves M0 by a few dozen units and flips outputs that lie within ~1e-6 of a rounding tie
        real = s_in.double() * s_w.double() / s_out.double()
        m0, shift = quantize_multipliers(real)
        self.register_buffer("weight", p["weight"].to(torch.int8))
        self.register_buffer("bias", p["bias"].to(torch.int32))
        self.register_buffer("in_scale", s_in)
        self.register_buffer("w_scale", s_w)
        self.register_buffer("out_scale", s_out)
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)
        self.register_buffer("xnn_scale", xnnpack_scale(s_in, s_w, s_out))
        self.in_zp, self.out_zp = int(in_qp.zero_point), int(out_qp.zero_point)
        self.out_qmin, self.out_qmax = out_qp.qmin, out_qp.qmax
        self.act = p["act"]
        self.relu = self.act == (0.0, math.inf)
        self.act_min, self.act_max = act_range(out_qp, self.act, clamp)
        # static bounds: |q_in - zp_in| <= span, so |sum| <= span * sum|w| per channel
        lo, hi = (in_qp.qmin, in_qp.qmax) if clamp == "bits" else (-128, 127)
        span = max(hi - self.in_zp, self.in_zp - lo)
        wsum = self.weight.double().abs().reshape(c, -1).sum(1) * span
        self.f32_exact = bool(wsum.max() < 2 ** 24)  # every partial sum exact in float32
        self.may_overflow = bool((wsum + self.bias.double().abs()).max() > INT32_MAX)

    def _accumulate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """float32 when every partial sum provably stays below 2^24 (exact), else float64."""
        return torch.float32 if self.f32_exact else torch.float64

    def _check_overflow(self, acc: torch.Tensor, shape: list[int]) -> None:
        if self.may_overflow and acc.numel():
            bound = (acc.double() + self.bias.double().reshape(shape)).abs().max()
            if bound > INT32_MAX:
                raise QuantError(f"int32 accumulator overflow in {type(self).__name__} (|acc| = {int(bound)}); "
                                 f"the scales are degenerate, recalibrate or use fewer bits")

    def _requantize(self, acc: torch.Tensor, shape: list[int]) -> torch.Tensor:
        """acc: exact sums without bias (float tensor of integers); returns clamped int32 outputs."""
        acc = acc.to(torch.int64) + self.bias.reshape(shape)
        if self.rounding == "xnnpack":
            return requantize_float32(acc, self.xnn_scale.reshape(shape), self.out_zp, self.act_min, self.act_max)
        if self.rounding not in KERNEL_ROUNDING:
            raise QuantError(f"unknown rounding {self.rounding!r}; choose one of: {', '.join(KERNEL_ROUNDING)}")
        depthwise = getattr(self, "groups", 1) > 1
        rounding = KERNEL_ROUNDING[self.rounding]["dwconv" if depthwise else self.kind]
        m0, shift = self.m0.reshape(shape), self.shift.reshape(shape)
        r = multiply_by_quantized_multiplier(acc, m0, shift, rounding)
        head = acc.shape[1] - acc.shape[1] % 8
        if depthwise and self.rounding in DWCONV_TAIL and head < acc.shape[1]:  # fixed_point.DWCONV_TAIL
            r[:, head:] = multiply_by_quantized_multiplier(acc[:, head:], m0[:, head:], shift[:, head:],
                                                           DWCONV_TAIL[self.rounding])
        return r.add_(self.out_zp).clamp_(self.act_min, self.act_max).to(torch.int32)


@_register
class IntConv2d(_IntWeighted):
    """Integer conv (per-channel or per-tensor weights), fused ReLU as a clamp at the output zero point."""

    kind = "conv"
    attrs = _IntWeighted.common + ("stride", "padding", "dilation", "groups")

    def __init__(self, p: dict[str, Any], q: Any, clamp: str = "bits") -> None:
        super().__init__()
        self._setup(p, clamp)
        self.stride, self.padding, self.dilation, self.groups = q.stride, q.padding, q.dilation, q.groups

    @property
    def pool_fusable(self) -> bool:
        """Requantization is monotone per channel (no wrapping left shift), so it commutes with max."""
        return bool((self.shift <= 0).all())

    def forward(self, x: torch.Tensor, pool: "IntMaxPool2d | None" = None) -> torch.Tensor:
        """Integer conv; with ``pool`` (only if ``pool_fusable``) the max pooling is applied to the
        accumulators before requantization, which gives the same integers with fewer operations."""
        dt = self.dtype
        acc = F.conv2d(x.to(dt) - self.in_zp, self.weight.to(dt), None, self.stride, self.padding,
                       self.dilation, self.groups)
        self._check_overflow(acc, [1, -1, 1, 1])
        if pool is not None:
            acc = pool.pool(acc)
        return self._requantize(acc, [1, -1, 1, 1])


@_register
class IntLinear(_IntWeighted):
    """Integer fully connected (per-tensor or per-channel weights), fused ReLU as a clamp at the output zero
    point."""

    kind = "fc"
    attrs = _IntWeighted.common

    def __init__(self, p: dict[str, Any], clamp: str = "bits") -> None:
        super().__init__()
        self._setup(p, clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.dtype
        acc = F.linear(x.to(dt) - self.in_zp, self.weight.to(dt))
        self._check_overflow(acc, [-1])
        return self._requantize(acc, [-1])


@_register
class IntMaxPool2d(IntLayer):
    """Max pooling on integers (exactly, via float32 which holds every |q| <= 2^24)."""

    attrs = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")

    def __init__(self, q: Any) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = q.kernel_size, q.stride, q.padding
        self.dilation, self.ceil_mode = q.dilation, q.ceil_mode

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Max pooling of a float tensor holding integers (exact).

        Non-overlapping windows without padding use strided element-wise maxima (several times faster
        than ``max_pool2d`` on CPU, same values)."""
        k, s = _pair(self.kernel_size), _pair(self.stride if self.stride is not None else self.kernel_size)
        if k == s and _pair(self.padding) == (0, 0) and _pair(self.dilation) == (1, 1) and not self.ceil_mode:
            h, w = x.shape[-2] // k[0] * k[0], x.shape[-1] // k[1] * k[1]
            out = None
            for i in range(k[0]):
                for j in range(k[1]):
                    v = x[..., i:h:k[0], j:w:k[1]]
                    out = v.clone() if out is None else torch.maximum(out, v, out=out)
            return out
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x.float()).to(torch.int32)


@_register
class IntFlatten(IntLayer):
    """Flatten in NCHW order (same as the float model)."""

    attrs = ("start_dim", "end_dim")

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, self.start_dim, self.end_dim)


@_register
class IntReLU(IntLayer):
    """Stand-alone ReLU: max(q, zero_point)."""

    attrs = ("zero_point",)

    def __init__(self, zero_point: int) -> None:
        super().__init__()
        self.zero_point = zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.zero_point)




@_register
class IntClamp(IntLayer):
    """A stand-alone activation on the input's grid (same scale and zero point): clamp(q, lo, hi)."""

    attrs = ("lo", "hi")

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = int(lo), int(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.lo, self.hi)


def add_multipliers(s1: float, s2: float, s_out: float) -> dict[str, int]:
    """TFLite's int8 ADD parameters (``PrepareGeneralSubOp`` / add.cc), scales as float32 read in double:
    left_shift 20; input multipliers s_i / (2 max(s1, s2)); output multiplier
    2 max(s1, s2) / (2^20 s_out); each as (M0, shift) with shift <= 0."""
    twice_max = 2.0 * max(s1, s2)
    out: dict[str, int] = {}
    for name, real in (("1", s1 / twice_max), ("2", s2 / twice_max), ("out", twice_max / ((1 << 20) * s_out))):
        if real >= 1.0:
            raise QuantError(f"ADD output scale {s_out:g} is too small for input scales {s1:g}, {s2:g} (TFLite needs "
                             f"2 max(s1, s2) < 2^20 s_out); recalibrate the model")
        out[f"m{name}"], out[f"shift{name}"] = quantize_multiplier(real)
    return out


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def xnnpack_add_params(s1: float, s2: float, s_out: float, z1: int, z2: int) -> dict[str, int]:
    """XNNPACK's qs8 add parameters (``xnn_init_qs8_add_minmax_scalar_params``): a = f32(s1 / s_out),
    b = f32(s2 / s_out); shift = 20 - exponent(max(a, b)); multipliers lrintf(a * 2^shift), lrintf(b * 2^shift);
    bias = 2^(shift - 1) - ma * z1 - mb * z2. The kernel: (bias + ma * q1 + mb * q2) >> shift (floor)."""
    a, b = _f32(_f32(s1) / _f32(s_out)), _f32(_f32(s2) / _f32(s_out))
    shift = 20 - math.frexp(max(a, b))[1] + 1  # frexp gives m in [0.5, 1): IEEE exponent = e - 1
    ma, mb = (int(torch.round(torch.tensor(v * 2.0 ** shift, dtype=torch.float32))) for v in (a, b))
    return {"xa": ma, "xb": mb, "xshift": shift, "xbias": (1 << (shift - 1)) - ma * z1 - mb * z2}


@_register
class IntAdd(IntLayer):
    """TFLite int8 ADD of two tensors with their own scales, fused activation as a clamp.

    ref, tflm (reference integer_ops/add.h): x_i = (q_i - zp_i) << 20; y_i = MBQM(x_i, M_i, shift_i);
    out = MBQM(y_1 + y_2, M_out, shift_out) + zp_out, each MBQM = RoundingDivideByPOT(SRDHM(.)).
    builtin (optimized integer_ops/add.h): its 16-wide vector loop folds each input's shift into the
    left shift, y_i = SRDHM((q_i - zp_i) << (20 + shift_i), M_i) (one rounding where the reference
    rounds twice), and narrows the output to int16 before adding zp_out; the last (numel % 16)
    elements of the whole NHWC batch tensor take the reference formula in its scalar loop (measured:
    29 of 196,608 ResNet-8 outputs differ between the two formulas).
    xnnpack: see ``xnnpack_add_params``."""

    attrs = ("z1", "z2", "out_zp", "act_min", "act_max", "act", "out_qmin", "out_qmax", "m1", "shift1", "m2", "shift2",
             "mout", "shiftout", "xa", "xb", "xshift", "xbias")

    def __init__(self, qp1: QParams, qp2: QParams, out_qp: QParams, act: tuple[float, float] | None,
                 clamp: str = "bits") -> None:
        super().__init__()
        s1, s2, so = (float(q.scale.float()) for q in (qp1, qp2, out_qp))
        self.z1, self.z2, self.out_zp = int(qp1.zero_point), int(qp2.zero_point), int(out_qp.zero_point)
        for k, v in {**add_multipliers(s1, s2, so), **xnnpack_add_params(s1, s2, so, self.z1, self.z2)}.items():
            setattr(self, k, v)
        self.register_buffer("out_scale", out_qp.scale.float().reshape(()))
        self.act = act
        self.out_qmin, self.out_qmax = out_qp.qmin, out_qp.qmax
        self.act_min, self.act_max = act_range(out_qp, act, clamp)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.to(torch.int64), b.to(torch.int64)
        if self.rounding == "xnnpack":
            y = (a * self.xa + b * self.xb + self.xbias) >> self.xshift
            return (y + self.out_zp).clamp_(self.act_min, self.act_max).to(torch.int32)
        y1 = multiply_by_quantized_multiplier((a - self.z1) << 20, self.m1, self.shift1, "gemmlowp")
        y2 = multiply_by_quantized_multiplier((b - self.z2) << 20, self.m2, self.shift2, "gemmlowp")
        y = multiply_by_quantized_multiplier(y1 + y2, self.mout, self.shiftout, "gemmlowp")
        out = (y + self.out_zp).clamp_(self.act_min, self.act_max)
        vector = a.numel() - a.numel() % 16
        if self.rounding == "builtin" and vector:
            out = _nhwc_select(self._vector_loop(a, b), out, vector)
        return out.to(torch.int32)

    def _vector_loop(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The optimized kernel's NEON loop (x86 builds run it through NEON_2_SSE)."""
        def scaled(q: torch.Tensor, zp: int, m0: int, shift: int) -> torch.Tensor:
            left = 20 + shift
            x = (q - zp) << left if left >= 0 else (q - zp) >> -left
            return (x * m0 + (1 << 30)) >> 31  # vqrdmulh: SRDHM, never saturating here
        s = scaled(a, self.z1, self.m1, self.shift1) + scaled(b, self.z2, self.m2, self.shift2)
        y = multiply_by_quantized_multiplier(s, self.mout, self.shiftout, "gemmlowp")
        y16 = _wrap16(_wrap16(y) + self.out_zp)  # vmovn_s32, then an int16 add
        return y16.clamp_(-128, 127).clamp_(self.act_min, self.act_max)  # vqmovn_s16, activation



def pool_window(kernel: tuple[int, int] | None, stride: tuple[int, int] | None, h: int,
                w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(kernel, stride) of an average pooling on an h x w input; ``kernel`` None: the whole image."""
    if kernel is None:
        return (h, w), (h, w)
    return _pair(kernel), _pair(stride if stride is not None else kernel)


@_register
class IntAvgPool2d(IntLayer):
    """Average pooling of unpadded windows (input and output share scale s and zero point zp), computed as
    the exported file computes it: a DEPTHWISE_CONV_2D whose weights are 1 with scale f32(1 / n),
    n = kh * kw, no bias (``as_conv``), because LiteRT's XNNPACK delegate takes no int8 AVERAGE_POOL_2D
    and does take this. So acc = sum(q - zp) over the window, requantized with M = s * f32(1 / n) / s by
    the kernel set's depthwise-conv rounding (that is IntConv2d's arithmetic, not a copy of it).
    ``kernel`` None: global pooling (the window is the whole input)."""

    attrs = ("kernel", "stride", "zero_point", "qmin", "qmax", "clamp")

    def __init__(self, kernel: tuple[int, int] | None, stride: tuple[int, int] | None, qp: QParams,
                 clamp: str = "bits") -> None:
        super().__init__()
        self.kernel, self.stride, self.clamp = kernel, stride, clamp
        self.register_buffer("scale", qp.scale.float().reshape(()))
        self.zero_point, self.qmin, self.qmax = int(qp.zero_point), qp.qmin, qp.qmax

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "IntLayer":
        if "scale" not in spec["buffers"]:
            raise QuantError("this integer checkpoint holds an average pooling of an older version (no scale); "
                             "convert its quantized checkpoint again (quant.convert, or rerun PTQ.py / QAT.py)")
        return super().from_spec(spec)

    def window(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return pool_window(self.kernel, self.stride, h, w)

    def as_conv(self, channels: int, h: int, w: int) -> IntConv2d:
        """The depthwise conv this pooling is, for a (channels, h, w) input."""
        (kh, kw), stride = self.window(h, w)
        qp = QParams(self.scale, torch.tensor(self.zero_point, dtype=torch.int32), self.qmin, self.qmax)
        ones = torch.ones(channels, 1, kh, kw, dtype=torch.int8)
        w_qp = QParams(torch.full((channels,), 1.0 / (kh * kw), dtype=torch.float32), torch.zeros(channels), -127, 127)
        p = {"weight": ones, "bias": torch.zeros(channels, dtype=torch.int32), "in_qp": qp, "w_qp": w_qp,
             "out_qp": qp, "act": None}
        shape = SimpleNamespace(stride=stride, padding=(0, 0), dilation=(1, 1), groups=channels)
        conv = IntConv2d(p, shape, self.clamp)
        conv.rounding = self.rounding
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[1], x.shape[2], x.shape[3], self.rounding)
        cache = self.__dict__.setdefault("_convs", {})
        if key not in cache:
            cache[key] = self.as_conv(*key[:3])
        return cache[key](x)


def logistic_table(in_qp: QParams) -> torch.Tensor:
    """LOGISTIC of every int8 input (index q + 128), as TFLite's lookup table: x = f32(s (q - zp)),
    round_half_away(f32(1 / (1 + exp(-x))) * 256) - 128, clamped to int8. Measured equal to LiteRT's
    three kernel sets and TFLM on all 256 inputs for 300 random input scales and zero points."""
    q = torch.arange(-128, 128, dtype=torch.float32)
    x = in_qp.scale.float().reshape(()) * (q - float(in_qp.zero_point))
    y = round_half_away(1.0 / (1.0 + torch.exp(-x)) * 256.0) - 128
    return y.clamp(-128, 127).to(torch.int32)


def hardswish_table(in_qp: QParams, out_qp: QParams) -> torch.Tensor:
    """HARD_SWISH of every int8 input (index q + 128) in TFLite's int16 fixed point (its reference
    ``HardSwish``, which its optimized kernel, XNNPACK and TFLM match: measured on 60 random scale
    pairs): x = (q - zp_in) * 2^7; output-scale value p = SRDHM16(x, M_out); the "relu-ish" factor
    r = x rescaled by M_relu (so that 3.0 is 2^15, saturating), mapped from [-1, 1] to [0, 1] as
    (r + 2^15) >> 1; out = RDBPOT(DoublingHighMul16(r, p), -e_out) + zp_out. M_out = f32(s_in / 128)
    / s_out, M_relu = f32(s_in / 128) / (3 / 2^15), each an int16 multiplier (``multiplier16``)."""
    hires = torch.tensor(1.0 / 128.0, dtype=torch.float32) * in_qp.scale.float().reshape(())
    m_out, e_out = multiplier16(float(hires / out_qp.scale.float().reshape(())))
    m_relu, e_relu = multiplier16(float(hires / (torch.tensor(3.0) / 32768.0)))
    if e_out > 0:
        raise QuantError(f"hardswish: output scale {float(out_qp.scale):.3g} below input scale / 128 "
                         f"({float(hires):.3g}), which TFLite's HARD_SWISH refuses; recalibrate")
    x = (torch.arange(-128, 128, dtype=torch.int64) - int(in_qp.zero_point)) * 128
    p = srdhm16(x, m_out)
    r = x
    if e_relu > 0:  # shift left, saturating, all but the last bit before the multiply, that bit after
        r = (r << (e_relu - 1)).clamp(INT16_MIN, INT16_MAX)
    r = srdhm16(r, m_relu)
    if e_relu > 0:
        r = (r << 1).clamp(INT16_MIN, INT16_MAX)
    elif e_relu < 0:
        r = rounding_divide_by_pot(r, -e_relu)
    r = (r + (1 << 15)) >> 1
    y = rounding_divide_by_pot(doubling_high_mul16(r, p), -e_out) + int(out_qp.zero_point)
    return y.clamp(-128, 127).to(torch.int32)


class IntLUT(IntLayer):
    """An elementwise op of int8 tensors computed by a table of its 256 inputs: out = table[q + 128],
    clamped to [act_min, act_max] (the b-bit range of the output). Every kernel set agrees."""

    attrs = ("in_zp", "out_zp", "out_qmin", "out_qmax", "act_min", "act_max")

    def __init__(self, in_qp: QParams, out_qp: QParams, table: torch.Tensor, clamp: str = "bits") -> None:
        super().__init__()
        self.register_buffer("in_scale", in_qp.scale.float().reshape(()))
        self.register_buffer("out_scale", out_qp.scale.float().reshape(()))
        self.in_zp, self.out_zp = int(in_qp.zero_point), int(out_qp.zero_point)
        self.out_qmin, self.out_qmax = out_qp.qmin, out_qp.qmax
        self.act_min, self.act_max = act_range(out_qp, None, clamp)
        self.register_buffer("table", table.clamp(self.act_min, self.act_max).to(torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[(x + 128).long()]


@_register
class IntLogistic(IntLUT):
    """LOGISTIC (sigmoid); int8 output at TFLite's fixed scale 1/256, zero point -128 (``logistic_table``)."""

    def __init__(self, in_qp: QParams, out_qp: QParams, clamp: str = "bits") -> None:
        super().__init__(in_qp, out_qp, logistic_table(in_qp), clamp)


@_register
class IntHardSwish(IntLUT):
    """HARD_SWISH, x relu6(x + 3) / 6, own output scale (``hardswish_table``)."""

    def __init__(self, in_qp: QParams, out_qp: QParams, clamp: str = "bits") -> None:
        super().__init__(in_qp, out_qp, hardswish_table(in_qp, out_qp), clamp)


@_register
class IntCat(IntLayer):
    """CONCATENATION on the channel axis; every input already has the output's scale and zero point."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, 1)
