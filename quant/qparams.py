"""Pure quantization functions: qparams, quantize, dequantize, fake_quantize.

Convention (TFLite int8 spec generalised to b bits): real = scale * (q - zero_point).
Scales are float32 (as stored in a .tflite file); zero points are integers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quant.errors import QuantError


@dataclass
class QParams:
    """Quantization parameters of one tensor.

    scale: float32 tensor, shape () per tensor or (C,) per channel (> 0).
    zero_point: int32 tensor of the same shape, in [qmin, qmax].
    qmin, qmax: the integer range (inclusive).
    axis: the channel dimension for per-channel parameters, None per tensor.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None = None

    def shaped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) reshaped to broadcast against ``x`` along ``axis``."""
        if self.axis is None:
            return self.scale, self.zero_point
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.clone(), "zero_point": self.zero_point.clone(),
                "qmin": self.qmin, "qmax": self.qmax, "axis": self.axis}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QParams":
        return cls(d["scale"].float(), d["zero_point"].int(), int(d["qmin"]), int(d["qmax"]), d["axis"])


def qrange(bits: int, symmetric: bool, narrow: bool) -> tuple[int, int]:
    """Signed integer range of ``bits`` bits: [-2^(b-1), 2^(b-1)-1], or [-(2^(b-1)-1), 2^(b-1)-1] if narrow.

    ``symmetric`` is accepted for clarity; the range depends only on ``narrow``.
    """
    if not 2 <= bits <= 16:
        raise QuantError(f"bits must be in 2..16, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def round_half_away(t: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (C's ``std::round``), exact for any float dtype.

    ``torch.round`` rounds ties to even and must not be used for quantization. Computed as
    copysign(floor(|t|) + (frac >= 0.5), t) with frac = |t| - floor(|t|), which is exact (unlike
    floor(|t| + 0.5), which rounds the float just below 0.5 up to 1); six in-place passes.
    """
    a = t.abs()
    r = a.floor()
    r.add_(a.sub_(r).ge_(0.5))
    return r.copysign_(t)


def choose_qparams(min_val: torch.Tensor | float, max_val: torch.Tensor | float, bits: int, symmetric: bool,
                   narrow: bool, axis: int | None = None) -> QParams:
    """QParams covering [min_val, max_val] (scalars or per-channel vectors).

    The range is first widened to include 0.0, so zero is exactly representable.
    symmetric: scale = max(|min|, |max|) / ((qmax - qmin) / 2), zero_point = 0
        (with ``narrow`` the range is [-(2^(b-1)-1), 2^(b-1)-1] and the divisor is qmax).
    asymmetric: scale = (max - min) / (qmax - qmin), zero_point = qmin - round_half_away(min / scale),
        clamped to [qmin, qmax].
    The scale is computed in float64 and stored as float32. An empty range (an all-zero tensor) gives
    scale 1.0, so there is never a division by zero or a NaN.
    """
    lo = torch.as_tensor(min_val, dtype=torch.float64).clamp(max=0.0)
    hi = torch.as_tensor(max_val, dtype=torch.float64).clamp(min=0.0)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise QuantError("observed range is not finite (NaN or inf in the tensors); check the model and inputs")
    qmin, qmax = qrange(bits, symmetric, narrow)
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    if symmetric:
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zp = (qmin - round_half_away(lo / scale.double())).clamp(qmin, qmax).to(torch.int32)
    return QParams(scale, zp, qmin, qmax, axis if scale.dim() > 0 else None)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """q = clamp(round_half_away(x / scale) + zero_point, qmin, qmax) as int32.

    x / scale is a float32 division (TFLite QUANTIZE computes ``round(val / scale)`` in float).
    """
    scale, zp = qp.shaped(x)
    v = round_half_away(x.float() / scale) + zp
    return v.clamp(qp.qmin, qp.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """real = scale * (q - zero_point), float32."""
    scale, zp = qp.shaped(q)
    return (q.to(torch.int32) - zp).float() * scale


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization on the grid v = x / scale, where the range is [lo, hi] = [qmin - zp, qmax - zp], so
    the zero point is never added and removed (fewer passes over large activations).

    One (lo, hi) pair (python numbers: per-tensor qparams) with lo <= 0 <= hi: round_half_away(v) lies in
    [lo, hi] exactly where lo - 1/2 < v < hi + 1/2 (a tie at either end rounds away from zero, out of the
    range), so the backward is one ``hardtanh_backward`` pass over the saved v. That keeps v (float) rather
    than a boolean mask alive until the backward, and saves the three boolean passes that make the mask, the
    tensor-bounded clamp and the ``where``: those cost more than the rest of the fake quantization on a CPU.
    Tensor bounds (per-channel weights): the mask.
    """

    @staticmethod
    def forward(ctx, x, scale, lo, hi):  # type: ignore[override]
        v = x / scale
        r = round_half_away(v)
        ctx.bounds = None
        if ctx.needs_input_grad[0]:
            if isinstance(lo, (int, float)) and lo <= 0 <= hi:
                ctx.bounds = (lo - 0.5, hi + 0.5)
                ctx.save_for_backward(v)
            else:
                ctx.save_for_backward((r < lo) | (r > hi))
        return r.clamp_(lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        if ctx.bounds is not None:
            return torch.ops.aten.hardtanh_backward(grad, saved, *ctx.bounds), None, None, None
        return torch.where(saved, 0.0, grad), None, None, None


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """dequantize(quantize(x)) in x's float dtype, with a straight-through estimator.

    Forward: scale * (clamp(round_half_away(x / scale) + zp, qmin, qmax) - zp).
    Backward: the gradient passes unchanged where round_half_away(x / scale) + zp lies in
    [qmin, qmax] and is zero outside (no gradient for scale or zero point).
    """
    scale, zp = qp.shaped(x)
    return _FakeQuantSTE.apply(x, scale.to(x.dtype), *shifted_bounds(qp.qmin, qp.qmax, zp, x.dtype))


def shifted_bounds(qmin: int, qmax: int, zp: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(qmin - zp, qmax - zp), the clamp bounds of x / scale: python floats for a single zero point (per
    tensor: the scalar clamp and masks, several times faster on a CPU than tensor bounds), else tensors."""
    if zp.numel() == 1:
        z = int(zp)
        return float(qmin - z), float(qmax - z)
    zp = zp.to(dtype)
    return qmin - zp, qmax - zp
