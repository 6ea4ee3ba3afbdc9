"""The integer-only engine: b-bit integer tensors end to end, TFLite numerics.

``IntModel`` = QuantizeInput → integer layers → Dequantize. Between layers, tensors are int32
holding b-bit values; each layer computes, per output channel c,

    acc = sum((q_in - zp_in) * q_w[c]) + bias[c]                       (exact)
    q_out = clamp(requantize(acc, M[c]) + zp_out, act_min, act_max)     (M = s_in * s_w[c] / s_out)

Exact accumulation: the sums are done by a float64 conv / matmul over integer values. With
|q_in - zp_in| <= 2^8, |q_w| <= 2^7 and K <= 2^20 terms, every partial sum is an integer below
2^35 < 2^53, so float64 represents every intermediate exactly (and float64 convolution is
direct im2col + GEMM, no Winograd/FFT). The int32 range of acc is checked, never wrapped.

Requantization (``rounding``; see ``quant.fixed_point``): 'ref' (LiteRT reference kernels: conv
SRDHM + RoundingDivideByPOT, fully connected single rounding), 'builtin' (ruy: ties toward +inf),
'xnnpack' (float32 scale, round half to even). Multipliers: conv
M = double(s_in) * double(s_w[c]) / double(s_out) (TFLite ``PopulateConvolutionQuantizationParams``),
per-tensor fully connected the same (LiteRT's ``GetQuantizedConvolutionMultipler`` multiplies the
scales in double; a float32 product gave a Fashion-MNIST cnn_bn logit one step off the reference
kernel's, accumulator -13911); XNNPACK float(float(s_in * s_w[c]) / s_out).

Flatten keeps NCHW order (an exporter to NHWC permutes the next weights). ``forward_int`` returns the
integer logits, ``forward`` dequantizes them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.errors import QuantError
from quant.fixed_point import INT32_MAX, KERNEL_ROUNDING, multiply_by_quantized_multiplier, quantize_multipliers, \
    requantize_float32, xnnpack_scale
from quant.modules import QConv2d, QLinear, QMaxPool2d, QReLU
from quant.qparams import QParams, quantize

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


def _act_range(out_qp: QParams, relu: bool, clamp: str) -> tuple[int, int]:
    lo, hi = (out_qp.qmin, out_qp.qmax) if clamp == "bits" else (-128, 127)
    zp = int(out_qp.zero_point)
    return (max(lo, zp) if relu else lo), hi


@_register
class QuantizeInput(IntLayer):
    """q = clamp(round_half_away(x / scale) + zero_point, qmin, qmax), float32 division, int32 out
    (TFLite QUANTIZE). With rounding 'xnnpack': clamp(round_half_even(x * float32(1 / scale)) + zp),
    as XNNPACK's f32->qs8 convert (its params hold the reciprocal of the scale)."""

    attrs = ("zero_point", "qmin", "qmax")

    def __init__(self, qp: QParams, clamp: str = "bits") -> None:
        super().__init__()
        self.register_buffer("scale", qp.scale.float().reshape(()))
        self.zero_point = int(qp.zero_point)
        self.qmin, self.qmax = (qp.qmin, qp.qmax) if clamp == "bits" else (-128, 127)

    def qparams(self) -> QParams:
        return QParams(self.scale, torch.tensor(self.zero_point, dtype=torch.int32), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rounding == "xnnpack":  # XNNPACK's f32->qs8 convert: x * f32(1 / scale), round half to even
            y = (x.float() * torch.reciprocal(self.scale)).clamp(self.qmin - self.zero_point,
                                                                 self.qmax - self.zero_point)
            return torch.round(y).to(torch.int32) + self.zero_point
        return quantize(x, self.qparams())


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
    common = ("in_zp", "out_zp", "act_min", "act_max", "relu", "out_qmin", "out_qmax", "rounding", "f32_exact",
              "may_overflow")

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
        self.relu = bool(p["relu"])
        self.act_min, self.act_max = _act_range(out_qp, self.relu, clamp)
        # static bounds: |q_in - zp_in| <= span, so |sum| <= span * sum|w| per channel
        lo, hi = (in_qp.qmin, in_qp.qmax) if clamp == "bits" else (-128, 127)
        span = max(hi - self.in_zp, self.in_zp - lo)
        wsum = self.weight.double().abs().reshape(c, -1).sum(1) * span
        self.f32_exact = bool(wsum.max() < 2 ** 24)  # every partial sum exact in float32
        self.may_overflow = bool((wsum + self.bias.double().abs()).max() > INT32_MAX)

    def out_qparams(self) -> QParams:
        return QParams(self.out_scale, torch.tensor(self.out_zp, dtype=torch.int32), self.out_qmin, self.out_qmax)

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
        r = multiply_by_quantized_multiplier(acc, self.m0.reshape(shape), self.shift.reshape(shape),
                                             KERNEL_ROUNDING[self.rounding][self.kind])
        return r.add_(self.out_zp).clamp_(self.act_min, self.act_max).to(torch.int32)


@_register
class IntConv2d(_IntWeighted):
    """Integer conv (per-channel or per-tensor weights), fused ReLU as a clamp at the output zero point."""

    kind = "conv"
    attrs = _IntWeighted.common + ("stride", "padding", "dilation", "groups")

    def __init__(self, p: dict[str, Any], q: QConv2d, clamp: str = "bits") -> None:
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
    """Integer fully connected (per-tensor weights), fused ReLU as a clamp at the output zero point."""

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

    def __init__(self, q: QMaxPool2d) -> None:
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


def _conv(m: QConv2d, qp: QParams | None, clamp: str) -> tuple[IntLayer, QParams]:
    layer = IntConv2d(m.integer_params(), m, clamp)
    return layer, layer.out_qparams()


def _fc(m: QLinear, qp: QParams | None, clamp: str) -> tuple[IntLayer, QParams]:
    layer = IntLinear(m.integer_params(), clamp)
    return layer, layer.out_qparams()


#: quantized (or pass-through) module type -> fn(module, input qparams, clamp) -> (int layer or None, out qparams)
INT_CONVERTERS: dict[type[nn.Module], Callable[..., tuple[IntLayer | None, QParams | None]]] = {
    QConv2d: _conv,
    QLinear: _fc,
    QMaxPool2d: lambda m, qp, clamp: (IntMaxPool2d(m), qp),
    QReLU: lambda m, qp, clamp: (IntReLU(int(qp.zero_point)), qp),
    nn.Flatten: lambda m, qp, clamp: (IntFlatten(m.start_dim, m.end_dim), qp),
    nn.Identity: lambda m, qp, clamp: (None, qp),
    nn.Dropout: lambda m, qp, clamp: (None, qp),
}


def find_converter(m: nn.Module) -> Callable[..., tuple[IntLayer | None, QParams | None]] | None:
    """The converter registered for ``type(m)`` or its nearest registered base class."""
    for t in type(m).__mro__:
        if t in INT_CONVERTERS:
            return INT_CONVERTERS[t]
    return None


class IntModel(nn.Module):
    """Integer-only model: ``forward(x)`` float logits, ``forward_int(x)`` the b-bit integer logits.

    x is the normalised float input, quantized once by the first layer (round half away from zero).
    ``rounding`` ('ref' | 'builtin' | 'xnnpack') selects the requantization of every layer.
    """

    def __init__(self, layers: list[nn.Module], rounding: str = "ref", meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not layers or not isinstance(layers[0], QuantizeInput) or not isinstance(layers[-1], Dequantize):
            raise QuantError("an IntModel starts with QuantizeInput and ends with Dequantize")
        self.layers = nn.ModuleList(layers)
        self.meta = dict(meta or {})
        self.rounding = rounding

    @property
    def rounding(self) -> str:
        return self._rounding

    @rounding.setter
    def rounding(self, mode: str) -> None:
        if mode not in KERNEL_ROUNDING:
            raise QuantError(f"unknown rounding {mode!r}; choose one of: {', '.join(KERNEL_ROUNDING)}")
        self._rounding = mode
        for layer in self.layers:
            layer.rounding = mode

    def input_qparams(self) -> QParams:
        return self.layers[0].qparams()

    def output_qparams(self) -> QParams:
        return self.layers[-1].qparams()

    @torch.no_grad()
    def forward_int(self, x: torch.Tensor, fuse_pool: bool = True) -> torch.Tensor:
        """Integer logits (int32 tensor of b-bit values) of the normalised float input ``x``.

        fuse_pool: run conv→maxpool pairs as one step, pooling the accumulators before
        requantization (identical integers, since requantization is monotone; about 4x less work).
        """
        layers = list(self.layers[:-1])
        i = 0
        while i < len(layers):
            layer, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if fuse_pool and isinstance(layer, IntConv2d) and isinstance(nxt, IntMaxPool2d) and layer.pool_fusable:
                x = layer(x, pool=nxt)
                i += 2
            else:
                x = layer(x)
                i += 1
        return x

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantized float32 logits: scale * (forward_int(x) - zero_point)."""
        return self.layers[-1](self.forward_int(x))

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild the model (layer types, int tensors, qparams, M0/shift)."""
        return {"rounding": self.rounding, "meta": self.meta, "layers": [layer.spec() for layer in self.layers]}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "IntModel":
        layers = []
        for s in spec["layers"]:
            if s["type"] not in INT_LAYERS:
                raise QuantError(f"unknown integer layer {s['type']!r} in checkpoint; it was made by another "
                                 f"version of quant/, re-run PTQ.py")
            layers.append(INT_LAYERS[s["type"]].from_spec(s))
        return cls(layers, rounding=spec["rounding"], meta=spec.get("meta"))
