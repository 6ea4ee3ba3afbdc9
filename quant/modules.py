"""Fake-quantized layers for calibration (PTQ) and training (QAT).

Every layer keeps float "shadow" parameters under the float model's key names (``weight``, ``bias``,
and ``bn.*`` for a fused BatchNorm); quantization produces new tensors and never overwrites them.

Data flow of one weighted layer (``QConv2d``, ``QLinear`` and their fused variants)::

    x (on the input grid) -> conv/linear with fake-quantized weight and int32-grid bias
      -> [ReLU] -> act_quant (observer + fake quantization at act_bits) -> output

* weights: symmetric, narrow [-(2^(b-1)-1), 2^(b-1)-1], zero point 0, per output channel for conv
  (``cfg.per_channel``), per tensor for fully connected (per channel with ``cfg.fc_per_channel``);
  qparams from the current weights.
* bias: int32 grid with scale input_scale * weight_scale[c] (float32 product), zero point 0, so the
  fake-quant and the integer engine compute the same thing.
* activations: asymmetric, signed [-2^(b-1), 2^(b-1)-1]; a fused ReLU means the observer sees the
  post-ReLU tensor (and the integer engine clamps at the output zero point).
* the model input is quantized once by its own quantizer (``input_quant`` of the quantized graph).
* ops whose output lies on their input's grid (max / average pooling, a stand-alone activation,
  concatenation) keep the input's quantizer; ``quant.transforms.quantize`` makes every input of a
  concatenation share one quantizer, as TFLite requires.

``FakeQuantize.enabled = False`` makes a quantizer the identity; ``observer.frozen = True`` fixes its
range. Each layer knows the quantizers feeding it (``input_fq`` / ``input_fqs``, references, not
submodules) to get its input scales. In eval mode, once every range is frozen, layers whose runtime
rounding differs from round(y / s_out) (weighted layers, ADD, average pooling) compute their output with
the integer kernel of ``quant.kernels`` (``requant``: the runtime's rounding), so fake quantization
equals the integer engine exactly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.config import QuantConfig
from quant.errors import QuantError
from quant.fixed_point import INT32_MAX, INT32_MIN
from quant.fold import fold_bn_params
from quant.kernels import (IntAdd, IntAvgPool2d, IntCat, IntClamp, IntConv2d, IntHardSwish, IntLayer, IntLinear,
                           IntLogistic, IntLUT, IntMaxPool2d, QuantizeInput, act_range)
from quant.observers import WEIGHT_RANGES, Observer, build_observer
from quant.qparams import QParams, dequantize, fake_quantize, quantize, round_half_away, shifted_bounds


class FakeQuantize(nn.Module):
    """Observer + fake quantization. ``enabled=False``: identity (the observer may still record).

    dynamic: the observer is reset before each recording, so qparams follow the current tensor
    (used for weights, which change during QAT).
    """

    #: the model input's quantizer only (``quant.transforms``): in eval mode with 'xnnpack' or 'builtin'
    #: and a final range, round as those runtimes' QUANTIZE does (x * f32(1 / scale), half to even:
    #: ``quant.kernels.QuantizeInput``), so fake quantization equals the engine there too
    requant = "float"

    def __init__(self, observer: Observer, dynamic: bool = False) -> None:
        super().__init__()
        self.observer = observer
        self.dynamic = dynamic
        self.enabled = True
        #: set by a PTQ method that chose the qparams and the values together (AdaRound): the observer
        #: stays frozen, ``quant.set_observers`` (and so a later calibration) leaves it alone
        self.fixed = False

    def _runtime_input(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.training or self.requant not in ("xnnpack", "builtin") or not self.ready():
            return None
        layer, qp = self.int_layer()
        layer.rounding = self.requant
        return dequantize(layer(x), qp).to(x.dtype)

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        """The input's integer kernel (TFLite QUANTIZE) and its qparams."""
        qp = self.qparams()
        return QuantizeInput(qp, clamp), qp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._runtime_input(x)
        if y is not None:
            return y
        if not self.observer.frozen:
            if self.dynamic:
                self.observer.reset()
            self.observer(x)
        if not self.enabled:
            return x
        return fake_quantize(x, self.qparams())

    def qparams(self) -> QParams:
        """The current QParams (raises ``QuantError`` if nothing was observed yet)."""
        return self.observer.calculate_qparams()

    def requantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded onto this quantizer's current grid without recording it (an op whose output
        shares its input's scale and zero point, e.g. average pooling); identity when disabled."""
        return fake_quantize(x, self.qparams()) if self.enabled else x

    def ready(self) -> bool:
        """On, frozen and calibrated: its qparams are final."""
        return self.enabled and self.observer.frozen and self.observer.initialized

    def get_extra_state(self) -> Any:
        return {"enabled": self.enabled, "fixed": self.fixed}

    def set_extra_state(self, state: Any) -> None:
        self.enabled = bool(state["enabled"])
        self.fixed = bool(state.get("fixed", False))

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}, dynamic={self.dynamic}{', fixed' if self.fixed else ''}"


class FixedQuantize(FakeQuantize):
    """A quantizer with constant qparams: the range [lo, hi] at ``bits`` is preset and frozen, and
    ``fixed`` keeps calibration and QAT (``quant.qat.act_quantizers`` skips it) from moving it. LOGISTIC's
    output: [0, 255/256] at 8 bits is scale 1/256, zero point -128, the only qparams TFLite accepts."""

    def __init__(self, lo: float, hi: float, bits: int = 8) -> None:
        super().__init__(build_observer("minmax", bits, symmetric=False, narrow=False))
        self.observer.min_val, self.observer.max_val = torch.tensor(lo), torch.tensor(hi)
        self.observer.frozen = True
        self.fixed = True


def act_quantizer(cfg: QuantConfig) -> FakeQuantize:
    """Activation quantizer: asymmetric signed act_bits, observer ``cfg.observer``."""
    return FakeQuantize(build_observer(cfg.observer, cfg.act_bits, symmetric=False, narrow=False,
                                       momentum=cfg.ema_momentum, percentile=cfg.percentile))


def weight_quantizer(cfg: QuantConfig, per_channel: bool) -> FakeQuantize:
    """Weight quantizer: symmetric narrow weight_bits from the current weights (per channel on dim 0),
    range by ``cfg.weight_range`` (min/max, or clipped to the least squared error)."""
    return FakeQuantize(WEIGHT_RANGES[cfg.weight_range](cfg.weight_bits, symmetric=True, narrow=True,
                                                        axis=0 if per_channel else None,
                                                        percentile=cfg.percentile), dynamic=True)


_TINY = torch.finfo(torch.float32).tiny


class _LSQFunction(torch.autograd.Function):
    """LSQ fake quantization in one pass of autograd: out = s * round_half_away(clamp(x / s, lo, hi)),
    lo = qmin - zp, hi = qmax - zp. Gradients (Esser et al. 2019, eq. 3-5):

        d out / d x = 1 where lo <= x / s <= hi, else 0 (straight through inside the range)
        d out / d s = round(x / s) - x / s inside the range, lo or hi outside, times ``g``

    summed over every dimension but the scale's own. Computing both in the forward from the same
    temporaries takes about half the passes of autograd through divide, clamp and round. With python
    bounds (per-tensor step sizes: activations) the mask is a float 0/1 tensor made by one
    ``hardtanh_backward`` pass at the float just outside each bound (an inclusive range), and the clamp
    takes scalars: boolean masks, tensor-bounded clamps and ``where`` are the slowest passes on a CPU.
    """

    @staticmethod
    def forward(ctx, x, s, lo, hi, g):  # type: ignore[override]
        v = x / s
        scalar = isinstance(lo, (int, float))
        if scalar:
            below, above = torch.tensor([lo, hi], dtype=v.dtype).nextafter(
                torch.tensor([-math.inf, math.inf], dtype=v.dtype)).tolist()
            inside = torch.ops.aten.hardtanh_backward(v.new_ones(()).expand_as(v), v, below, above)
        else:
            outside = (v < lo) | (v > hi)
        v.clamp_(lo, hi)
        q = round_half_away(v)
        ctx.scalar = scalar
        if ctx.needs_input_grad[1]:
            # q - x/s inside the range, lo or hi outside (v * inside is exact: one rounding, as in a subtraction)
            term = (torch.addcmul(q, v, inside, value=-1.0, out=v) if scalar
                    else torch.sub(q, v.masked_fill_(outside, 0.0), out=v))
            ctx.save_for_backward(inside if scalar else outside, term)
            ctx.g, ctx.s_shape = g, s.shape
            ctx.sum_dims = [d for d in range(x.dim()) if s.dim() == 0 or s.shape[d] == 1]
        elif ctx.needs_input_grad[0]:
            ctx.save_for_backward(inside if scalar else outside)
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        mask = ctx.saved_tensors[0]
        grad_x = None
        if ctx.needs_input_grad[0]:
            # the 0/1 mask as hardtanh's input between 0.5 and 1.5: grad where 1, an exact 0 where 0
            grad_x = (torch.ops.aten.hardtanh_backward(grad, mask, 0.5, 1.5) if ctx.scalar
                      else torch.where(mask, 0.0, grad))
        grad_s = None
        if ctx.needs_input_grad[1]:
            term = ctx.saved_tensors[1]
            grad_s = (grad * term).sum(ctx.sum_dims, keepdim=True).mul_(ctx.g).reshape(ctx.s_shape)
        return grad_x, grad_s, None, None, None


class LSQQuantize(FakeQuantize):
    """Learned step size quantizer (LSQ, Esser et al. 2019), a drop-in for ``FakeQuantize``.

    Forward: s * (clamp(round_half_away(x / s), qmin - zp, qmax - zp)), the same values as
    ``fake_quantize`` with QParams(s, zp). The step size s is an ``nn.Parameter`` (shape () per tensor
    or (C,) along ``axis``), learned with the LSQ gradient
        d out / d s = -x/s + round(x/s) inside the range, (qmin - zp) or (qmax - zp) outside,
    multiplied by g = 1 / sqrt(N * Qp) (N: elements per scale of one sample -- weights: the weights
    a scale covers; activations: features per image; Qp = qmax - zp_min, i.e. qmax for weights and
    qmax - qmin for activations). x gets the straight-through gradient inside the range, 0 outside.
    The zero point is fixed at its calibrated value (weights: 0). s stays positive: the forward uses
    max(s, scale_floor) (``floor_ratio`` times the initial scale) and ``clamp_()`` projects the
    parameter onto it after each optimiser step. ``qparams()``
    returns the learned scale, so ``convert`` builds the integer model from it.
    The wrapped observer keeps the calibrated range it was initialised from (never updated again).
    """

    #: the step size never goes below this fraction of its initial (calibrated) value: a smaller one
    #: would make the requantization multiplier or the int32 bias overflow
    floor_ratio = 1e-3

    def __init__(self, observer: Observer, qp: QParams, learn_offset: bool = False) -> None:
        super().__init__(observer, dynamic=False)
        self.observer.frozen = True
        self.qmin, self.qmax, self.axis = qp.qmin, qp.qmax, qp.axis
        self.scale = nn.Parameter(qp.scale.detach().clone().float())
        self.register_buffer("zero_point", qp.zero_point.detach().clone().to(torch.int32))
        self.register_buffer("scale_floor", (qp.scale.detach().float() * self.floor_ratio).clamp(min=_TINY))
        #: LSQ+ (Bhalgat et al. 2020): the offset beta = -scale * zero_point (the real value of q = 0) is
        #: learned too, initialised from the calibrated zero point; the forward uses the integer zero point
        #: round(-beta / s) clamped to [qmin, qmax] (the runtime's), beta gets LSQ+'s gradient (1 where x is
        #: clipped, 0 inside the range) through a straight-through estimator
        self.offset = nn.Parameter(-qp.scale.detach().float() * qp.zero_point.float()) if learn_offset else None

    @classmethod
    def from_fake_quant(cls, fq: FakeQuantize, learn_offset: bool = False) -> "LSQQuantize":
        """Initialised from a calibrated quantizer's QParams (the PTQ scales); ``learn_offset``: LSQ+."""
        lsq = cls(fq.observer, fq.qparams(), learn_offset=learn_offset)
        lsq.enabled, lsq.requant = fq.enabled, fq.requant
        return lsq

    def _zero_point(self, s: torch.Tensor) -> torch.Tensor:
        """The integer zero point: the calibrated one, or LSQ+'s round(-offset / s) within [qmin, qmax]."""
        if self.offset is None:
            return self.zero_point
        with torch.no_grad():
            return torch.clamp(round_half_away(-self.offset / s), self.qmin, self.qmax).to(torch.int32)

    def _scale(self) -> torch.Tensor:
        return torch.maximum(self.scale, self.scale_floor)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the step size back to >= ``scale_floor`` (call after the optimiser step)."""
        self.scale.copy_(torch.maximum(self.scale, self.scale_floor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        y = self._runtime_input(x)
        if y is not None:
            return y
        s = self._scale()
        zp = self._zero_point(s).to(x.dtype)
        if self.qmin == -self.qmax:  # weights (symmetric narrow): N = weights per scale, Qp = qmax
            n, levels = x.numel() // max(s.numel(), 1), self.qmax
        else:                        # activations: N = features per image, Qp = qmax - qmin
            n, levels = (x[0].numel() if x.dim() > 1 else x.numel()), self.qmax - self.qmin
        g = 1.0 / math.sqrt(max(n, 1) * levels)
        if self.axis is not None:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            s, zp = s.reshape(shape), zp.reshape(shape)
        out = _LSQFunction.apply(x, s, *shifted_bounds(self.qmin, self.qmax, zp, x.dtype), g)
        if self.offset is not None and torch.is_grad_enabled() and self.offset.requires_grad:
            with torch.no_grad():
                v = x / s
                outside = ((v < self.qmin - zp) | (v > self.qmax - zp)).to(x.dtype)
            # the forward is unchanged; d out / d beta = 1 where clipped, times LSQ's gradient scale g
            out = out + (self.offset - self.offset.detach()) * g * outside
        return out

    def qparams(self) -> QParams:
        s = self._scale().detach().float().clone()
        return QParams(s, self._zero_point(s).clone(), self.qmin, self.qmax, self.axis)

    def requantize(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)  # LSQ never records, and the step size gets its gradient

    def extra_repr(self) -> str:
        return (f"enabled={self.enabled}, {'lsq+' if self.offset is not None else 'lsq'}, qmin={self.qmin}, "
                f"qmax={self.qmax}, axis={self.axis}")


def quantize_bias(bias: torch.Tensor, s_in: torch.Tensor, s_w: torch.Tensor, check: bool = False) -> torch.Tensor:
    """int32-grid bias: round_half_away(b / (s_in * s_w)) with the bias scale a float32 product.

    Returns the integer values as float64. ``check=True`` raises ``QuantError`` when a value does
    not fit in int32; otherwise they are clamped (the fake-quant path during training).
    """
    bs = (s_in.float() * s_w.float()).double()
    q = round_half_away(bias.detach().double() / bs)
    if check and (q.abs() > INT32_MAX).any():
        c = int((q.abs() > INT32_MAX).nonzero()[0, 0]) if q.dim() else 0
        raise QuantError(f"int32 bias overflow in channel {c} (bias {float(bias.reshape(-1)[c]):.4g} / scale "
                         f"{float(bs.reshape(-1)[c]):.3g}); the weight or input scale is degenerate, use more "
                         f"calibration data or more bits")
    return q.clamp(INT32_MIN, INT32_MAX)


def fake_quantize_bias(bias: torch.Tensor, s_in: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """Bias on the int32 grid of scale s_in * s_w[c], straight-through gradient."""
    bs = (s_in.float() * s_w.float()).double()
    fq = (quantize_bias(bias, s_in, s_w) * bs).to(bias.dtype)
    return bias + (fq - bias).detach()


class QModule(nn.Module):
    """Base of the fake-quant layers: references to the quantizers of its inputs (``input_fqs``;
    ``input_fq`` is the first), and ``requant``, the eval-mode rounding ('float' or a runtime's)."""

    #: float module types this class replaces, in pattern order (kept for the class names' meaning)
    pattern: tuple[type[nn.Module], ...] = ()
    #: how the eval-mode output is rounded onto the output grid: 'float' (round(y / s_out), the usual
    #: fake quantization) or a runtime rounding ('ref', 'builtin', 'xnnpack'), set by ``quantize``
    requant = "float"

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "input_fqs", [])  # not submodules: they belong to the producers

    @property
    def input_fq(self) -> FakeQuantize | None:
        return self.input_fqs[0] if self.input_fqs else None

    def attach_input(self, *fqs: FakeQuantize) -> None:
        """Record the quantizers whose outputs feed this layer (for the bias scale and conversion)."""
        object.__setattr__(self, "input_fqs", list(fqs))

    def input_qparams(self, i: int = 0) -> QParams:
        if len(self.input_fqs) <= i:
            raise QuantError(f"{type(self).__name__} has no input quantizer; build the model with quant.quantize")
        return self.input_fqs[i].qparams()

    def _runtime(self) -> bool:
        """Eval mode with a runtime rounding and every range final: compute with the integer kernel."""
        own = getattr(self, "act_quant", None)
        return (not self.training and self.requant != "float" and bool(self.input_fqs)
                and all(fq.ready() for fq in self.input_fqs) and (own is None or own.ready()))

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        """The integer kernel of this layer and its output qparams (``quant.kernels``)."""
        raise NotImplementedError

    @torch.no_grad()
    def _runtime_output(self, *xs: torch.Tensor) -> torch.Tensor:
        """Eval-mode output as the target runtime computes it, dequantized. The inputs are on their grids,
        so quantizing them is exact; the kernel is the integer engine's (``self.requant`` rounding)."""
        layer, out_qp = self.int_layer("bits")
        layer.rounding = self.requant
        qs = [quantize(x, fq.qparams()) for x, fq in zip(xs, self.input_fqs)]
        return dequantize(layer(*qs), out_qp).to(xs[0].dtype)


def _activation(y: torch.Tensor, act: tuple[float, float] | None) -> torch.Tensor:
    """A fused activation in float: ReLU, or a clamp to [lo, hi]."""
    if act is None:
        return y
    if act == (0.0, math.inf):
        return F.relu(y)
    if math.isfinite(act[0]) and math.isfinite(act[1]):
        return F.hardtanh(y, act[0], act[1])  # ReLU6's kernel: one pass backward, a clamp's takes four
    return y.clamp(None if act[0] == -math.inf else act[0], None if act[1] == math.inf else act[1])


class _QWeighted(QModule):
    """Shared code of conv and linear: float shadow weights, weight/bias/output quantization."""

    act_quant: FakeQuantize
    weight_quant: FakeQuantize
    act: tuple[float, float] | None = None

    @property
    def relu(self) -> bool:
        return self.act == (0.0, math.inf)

    def float_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float (weight, bias) that get quantized; fused BN overrides this with folding."""
        return self.weight, self.bias

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _bias_quant_ready(self) -> bool:
        fq = self.input_fq
        return (self.weight_quant.enabled and fq is not None and fq.enabled and fq.observer.initialized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runtime() and self.weight_quant.enabled:
            return self._runtime_output(x)
        w, b = self.float_weight_bias()
        wq = self.weight_quant(w)
        if b is not None and self._bias_quant_ready():
            b = fake_quantize_bias(b, self.input_qparams().scale, self.weight_quant.qparams().scale)
        y = _activation(self._op(x, wq, b), self.act)
        return self._output_quant(y)

    #: set by ``quant.transforms.quantize`` when a QMaxPool2d directly follows this layer: in training
    #: mode the output quantizer then runs after the pooling (in the pool's forward), on a quarter of
    #: the values. Exact in the forward (fake quantization is monotone, so it commutes with max); the
    #: gradient goes to the true maximum of each window instead of the first of several equal
    #: quantized values. Eval mode (calibration, evaluation) quantizes before pooling, as the runtime.
    quantize_after_pool = False

    def _output_quant(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.training and self.quantize_after_pool else self.act_quant(y)

    @torch.no_grad()
    def integer_params(self) -> dict[str, Any]:
        """Integer weights and qparams of this layer: what the integer engine and the exporter use.

        Returns {'weight': int8 tensor, 'w_qp', 'bias': int32 tensor (zeros if no bias), 'in_qp',
        'out_qp', 'act' (the fused activation's float bounds or None)}. Raises ``QuantError`` on int32 bias overflow.
        """
        w, b = self.float_weight_bias()
        obs = self.weight_quant.observer
        if not obs.frozen or not obs.initialized:
            obs.reset()
            obs(w)
        w_qp = self.weight_quant.qparams()
        in_qp = self.input_qparams()
        w_int = quantize(w.detach(), w_qp).to(torch.int8)
        if b is None:
            b = torch.zeros(w.shape[0])
        b_int = quantize_bias(b, in_qp.scale, w_qp.scale, check=True).to(torch.int32)
        return {"weight": w_int, "w_qp": w_qp, "bias": b_int, "in_qp": in_qp,
                "out_qp": self.act_quant.qparams(), "act": self.act}


class QConv2d(_QWeighted):
    """Fake-quant Conv2d (``relu=True``: Conv2d + ReLU fused)."""

    pattern = (nn.Conv2d,)

    def __init__(self, conv: nn.Conv2d, cfg: QuantConfig, relu: bool = False,
                 act: tuple[float, float] | None = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise QuantError(f"Conv2d with padding_mode={conv.padding_mode!r} is unsupported; use 'zeros'")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.act = (0.0, math.inf) if relu else act
        self.weight_quant = weight_quantizer(cfg, cfg.per_channel)
        self.act_quant = act_quantizer(cfg)

    @classmethod
    def from_float(cls, mods: Sequence[nn.Module], cfg: QuantConfig) -> "QConv2d":
        """From ``[Conv2d]`` or ``[Conv2d, ReLU]``."""
        return cls(mods[0], cfg, relu=any(isinstance(m, nn.ReLU) for m in mods))

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if w.stride() != self.weight.stride():
            # fake quantization returns the weight in the default layout where a size-1 dimension makes
            # it ambiguous (in_channels 1); give the conv the float weight's (channels-last) layout back,
            # or it picks NCHW output and every later op runs several times slower
            w = torch.empty_like(self.weight).copy_(w)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        layer = IntConv2d(self.integer_params(), self, clamp)
        return layer, layer.out_qparams()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, act={self.act}")


class QConvReLU(QConv2d):
    """Conv2d + ReLU fused."""

    pattern = (nn.Conv2d, nn.ReLU)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; the gradient times ``scale`` (no gradient for ``scale``) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def _scale_grad(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` (broadcast) in the backward pass."""
    return _ScaleGrad.apply(x, scale)


class QConvBNReLU(QConv2d):
    """Conv2d + BatchNorm2d (+ ReLU) fused; BN folded into the conv with ``fold_bn_params``.

    Keys: the conv's ``weight``/``bias`` and the BN under ``bn.*``.

    * eval mode, or train mode with ``bn_frozen = True``: the BN is folded with its running
      statistics (w' = w * gamma / sigma_run, b' = (b - mu_run) * gamma / sigma_run + beta) and the
      layer computes exactly what the integer engine runs; running statistics do not move.
    * train mode with ``bn_frozen = False`` (QAT before the BN freeze; Jacob et al. 2018 Fig. C.8,
      Krishnamoorthi 2018 section 3.2.2): the conv runs once with fq(w * gamma / sigma_run) and no
      bias; dividing by gamma / sigma_run gives the conv output z (+ b), whose batch statistics
      mu_B, sigma_B normalise it through ``self.bn`` in train mode, so
      y = conv(x, fq(w')) * sigma_run / sigma_B + (beta - gamma * mu_B / sigma_B)
      and the running statistics are updated with PyTorch's momentum semantics
      (running = (1 - momentum) * running + momentum * batch, unbiased batch variance).
    """

    #: QAT switch (not saved in the state dict; QAT.py sets it from its step count)
    bn_frozen = False
    #: QAT option (not saved): in training, scale the conv weight's gradient by (sigma_run / gamma)^2 per
    #: output channel, so that an SGD step moves the folded weight w' = w * gamma / sigma_run as far as
    #: a plain conv's weight would move for the same gradient (otherwise (gamma / sigma_run)^2 times as far)
    fold_grad_scale = False

    pattern = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, cfg: QuantConfig, relu: bool = True,
                 act: tuple[float, float] | None = None) -> None:
        super().__init__(conv, cfg, relu=relu, act=act)
        if bn.running_mean is None or bn.running_var is None:
            raise QuantError("cannot fold a BatchNorm2d without running statistics (track_running_stats=False)")
        if bn.num_features != conv.out_channels:
            raise QuantError(f"BatchNorm2d has {bn.num_features} features but the conv before it has "
                             f"{conv.out_channels} output channels")
        self.bn = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
        self.bn.load_state_dict(bn.state_dict())
        self.bn.eval()

    @classmethod
    def from_float(cls, mods: Sequence[nn.Module], cfg: QuantConfig) -> "QConvBNReLU":
        """From ``[Conv2d, BatchNorm2d]`` or ``[Conv2d, BatchNorm2d, ReLU]``."""
        return cls(mods[0], mods[1], cfg, relu=any(isinstance(m, nn.ReLU) for m in mods))

    def _shadow_weight(self) -> torch.Tensor:
        """``self.weight``, with its gradient rescaled in training when ``fold_grad_scale`` is on."""
        if not (self.training and self.fold_grad_scale):
            return self.weight
        bn = self.bn
        ratio = (bn.running_var + bn.eps).detach()
        if bn.weight is not None:
            ratio = ratio / bn.weight.detach().square().clamp_min(1e-12)
        return _scale_grad(self.weight, ratio.reshape(-1, 1, 1, 1))

    def float_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        bn = self.bn
        return fold_bn_params(self._shadow_weight(), self.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                              bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.bn_frozen:
            return super().forward(x)
        bn = self.bn
        factor = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            factor = bn.weight * factor                    # gamma / sigma_run, (C,)
        f = factor.reshape(-1, 1, 1, 1)
        wq = self.weight_quant(self._shadow_weight() * f)
        # conv(x, fq(w')) * sigma_run / gamma + b, the division taken on the weights (the conv is linear in
        # each output channel): the same values, without two passes over the output and the gradient of
        # gamma through them (a third of a MobileNetV2 QAT step). A channel with gamma = 0 outputs beta
        # whatever z is; its weights are divided by 1 there instead of by 0.
        z = self._op(x, wq / torch.where(f == 0, 1.0, f), self.bias)
        bn.train()
        y = bn(z)                                          # batch statistics; updates the running ones
        return self._output_quant(_activation(y, self.act))


class QConvBN(QConvBNReLU):
    """Conv2d + BatchNorm2d fused (no ReLU)."""

    pattern = (nn.Conv2d, nn.BatchNorm2d)


class QLinear(_QWeighted):
    """Fake-quant Linear (``relu=True``: Linear + ReLU fused). Weights per tensor (TFLite's classic FC), per
    output channel with ``cfg.fc_per_channel``."""

    pattern = (nn.Linear,)

    def __init__(self, linear: nn.Linear, cfg: QuantConfig, relu: bool = False,
                 act: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.act = (0.0, math.inf) if relu else act
        self.weight_quant = weight_quantizer(cfg, cfg.fc_per_channel)
        self.act_quant = act_quantizer(cfg)

    @classmethod
    def from_float(cls, mods: Sequence[nn.Module], cfg: QuantConfig) -> "QLinear":
        """From ``[Linear]`` or ``[Linear, ReLU]``."""
        return cls(mods[0], cfg, relu=any(isinstance(m, nn.ReLU) for m in mods))

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        layer = IntLinear(self.integer_params(), clamp)
        return layer, layer.out_qparams()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act}"


class QLinearReLU(QLinear):
    """Linear + ReLU fused."""

    pattern = (nn.Linear, nn.ReLU)


class QMaxPool2d(QModule):
    """MaxPool2d: keeps the input's scale and zero point (max commutes with quantization)."""

    pattern = (nn.MaxPool2d,)

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride if stride is not None else kernel_size, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    #: training mode: quantize the pooled values with the previous layer's output quantizer (see
    #: ``_QWeighted.quantize_after_pool``); set by ``quant.transforms.quantize``
    quantizes_input_after = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        after = self.training and self.quantizes_input_after
        y = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return self.input_fq(y) if after else y

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        return IntMaxPool2d(self), self.input_qparams()

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class QAct(QModule):
    """A stand-alone activation (not fused into its producer): clamp to [lo, hi] in float, rounded back
    onto the input's grid (its scale and zero point are kept; a ReLU's 0 is on it already). Equals the
    integer clamp(q, zp + round(lo / s), zp + round(hi / s)) since rounding is monotone."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.act = (float(lo), float(hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_fq.requantize(_activation(x, self.act))

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        qp = self.input_qparams()
        return IntClamp(*act_range(qp, self.act, clamp)), qp

    def extra_repr(self) -> str:
        return f"act={self.act}"


class _QElementwise(QModule):
    """An elementwise op with its own output quantizer, computed in integers as a table of its 256 int8
    inputs (``quant.kernels.IntLUT``): float ``fn``, then the output grid; in eval mode, the table."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    kernel: type[IntLUT]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runtime():
            return self._runtime_output(x)
        return self.act_quant(type(self).fn(x))

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        layer = self.kernel(self.input_qparams(), self.act_quant.qparams(), clamp)
        return layer, layer.out_qparams()


class QSigmoid(_QElementwise):
    """Sigmoid with TFLite LOGISTIC's fixed int8 output (scale 1/256, zero point -128, at every act_bits);
    in eval mode, the runtime's table (``IntLogistic``)."""

    fn, kernel = torch.sigmoid, IntLogistic

    def __init__(self) -> None:
        super().__init__()
        self.act_quant = FixedQuantize(0.0, 255.0 / 256.0)


class QHardswish(_QElementwise):
    """Hardswish x relu6(x + 3) / 6 with its own output quantizer (TFLite HARD_SWISH); in eval mode, the
    runtime's int16 fixed-point result for each of the 256 inputs (``IntHardSwish``)."""

    fn, kernel = F.hardswish, IntHardSwish

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__()
        self.act_quant = act_quantizer(cfg)


class QAdd(QModule):
    """Residual add of two tensors with their own scales (TFLite ADD): float sum, fused activation, own
    output quantizer; in eval mode with frozen ranges, TFLite's integer ADD arithmetic (``IntAdd``)."""

    def __init__(self, cfg: QuantConfig, act: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.act = act
        self.act_quant = act_quantizer(cfg)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._runtime():
            return self._runtime_output(a, b)
        return self.act_quant(_activation(a + b, self.act))

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        layer = IntAdd(self.input_qparams(0), self.input_qparams(1), self.act_quant.qparams(), self.act, clamp)
        return layer, layer.out_qparams()

    def extra_repr(self) -> str:
        return f"act={self.act}"


class QCat(QModule):
    """Concatenation on the channel axis: every input shares the output's quantizer (TFLite's
    CONCATENATION refuses inputs whose scale or zero point differ), so it is exact as it is."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, 1)

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        qps = [fq.qparams() for fq in self.input_fqs]
        if any(not (torch.equal(q.scale, qps[0].scale) and torch.equal(q.zero_point, qps[0].zero_point))
               for q in qps):
            raise QuantError("the inputs of a concatenation have different scales or zero points; build the model "
                             "with quant.quantize, which makes them share one quantizer")
        return IntCat(), qps[0]


class QAvgPool2d(QModule):
    """Average pooling (unpadded windows, or global: ``kernel_size`` None): the mean rounded back onto the
    input's grid (the output keeps the input's scale and zero point); in eval mode with a frozen range,
    the runtime's integer rounding of the window sum (``IntAvgPool2d``)."""

    def __init__(self, kernel_size: tuple[int, int] | None, stride: tuple[int, int] | None = None,
                 padding: Any = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None) -> None:
        super().__init__()
        if tuple(padding) != (0, 0) or ceil_mode or divisor_override is not None:
            raise QuantError("AvgPool2d with padding, ceil_mode or divisor_override is unsupported (TFLite's "
                             "AVERAGE_POOL_2D averages unpadded windows); use padding=0")
        self.kernel_size, self.stride = kernel_size, (stride or kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runtime():
            return self._runtime_output(x)
        y = x.mean((2, 3), keepdim=True) if self.kernel_size is None else F.avg_pool2d(x, self.kernel_size,
                                                                                       self.stride)
        return self.input_fq.requantize(y)

    def int_layer(self, clamp: str = "bits") -> tuple[IntLayer, QParams]:
        qp = self.input_qparams()
        return IntAvgPool2d(self.kernel_size, self.stride, qp, clamp), qp

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size or 'global'}, stride={self.stride}"


def flatten_images(x: torch.Tensor, size: int = -1) -> torch.Tensor:
    """``torch.flatten(x, 1)``; ``size`` > 0 (from ``x.view(-1, K)``) must equal the features per image."""
    y = torch.flatten(x, 1)
    if size > 0 and y.shape[1] != size:
        raise QuantError(f"view(-1, {size}) of a tensor of shape {tuple(x.shape)} does not flatten each image "
                         f"({y.shape[1]} features); use x.flatten(1)")
    return y
