"""Fixed-point requantization, bit-exact with TFLite / LiteRT kernels (gemmlowp, ruy, XNNPACK).

A real multiplier M > 0 is represented as M = M0 * 2^(shift - 31) with M0 an int32 in [2^30, 2^31).
All functions work on int64 torch tensors holding int32 values, vectorised and broadcasting, so
per-channel M0 / shift are tensors shaped to broadcast against the accumulators.

Which kernel set rounds how (docs/DESIGN.md has the table for every op):

=========  ============================================  ==========================  ==============
mode       conv                                          fully connected             depthwise conv
=========  ============================================  ==========================  ==============
ref        'gemmlowp': SRDHM, RoundingDivideByPOT        'single': one rounding      'gemmlowp'
builtin    'ruy': SRDHM, then shift ties toward +inf     'ruy'                       'ruy', tail (*)
xnnpack    float32: acc * scale, round half to even      same                        same
tflm       'gemmlowp'                                    'gemmlowp' (ref: 'single')  'gemmlowp'
=========  ============================================  ==========================  ==============

(*) LiteRT's optimized DEPTHWISE_CONV_2D requantizes the output channels of each pixel in blocks of 8
with the 'ruy' rounding and the last O % 8 channels one by one with 'gemmlowp' (``DWCONV_TAIL``):
measured per channel with O = 4, 9, 12, 20, 24 (tests/test_quant_kernels.py::test_depthwise_conv_tail).

TensorFlow Lite Micro's fully connected kernel requantizes as its conv does (SRDHM, then a rounding
shift), where LiteRT's reference fully connected rounds once: on the Fashion-MNIST cnn at 8 bits,
LiteRT-ref logits equal TFLM's on 98.7% of the test images, the 'tflm' set on 100%. Every other op
of this project (QUANTIZE, DEPTHWISE_CONV_2D, ADD, pooling, CONCATENATION, PAD) computes in TFLM as
in LiteRT's reference kernels.
"""
from __future__ import annotations

import math

import torch

from quant.errors import QuantError

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1

#: interpreter mode -> op kind -> integer rounding of ``multiply_by_quantized_multiplier``
KERNEL_ROUNDING = {
    "ref": {"conv": "gemmlowp", "fc": "single", "dwconv": "gemmlowp"},
    "builtin": {"conv": "ruy", "fc": "ruy", "dwconv": "ruy"},
    "xnnpack": {"conv": "float32", "fc": "float32", "dwconv": "float32"},
    "tflm": {"conv": "gemmlowp", "fc": "gemmlowp", "dwconv": "gemmlowp"},
}

#: kernel set -> the rounding of a depthwise conv's last O % 8 output channels, where it differs
DWCONV_TAIL = {"builtin": "gemmlowp"}


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(M0, shift) with real ~= M0 * 2^(shift - 31), as TFLite's ``QuantizeMultiplier``.

    q, shift = frexp(real) (q in [0.5, 1)); M0 = round_half_away(q * 2^31) in double;
    if M0 == 2^31 then M0 = 2^30 and shift += 1. real == 0 gives (0, 0); a multiplier so tiny that
    shift < -31 is flushed to (0, 0), as TFLite does. ``real`` is a Python float (double).
    """
    real = float(real)
    if not math.isfinite(real) or real < 0:
        raise QuantError(f"requantization multiplier must be finite and >= 0, got {real}; check the scales")
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    m0 = int(math.floor(q * 2.0 ** 31 + 0.5))  # q > 0: half away from zero; q * 2^31 + 0.5 is exact
    if m0 == 2 ** 31:
        m0 //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise QuantError(f"requantization multiplier {real} is too large (>= 2^30); the output scale is "
                         f"degenerate, recalibrate the model")
    return m0, shift


def quantize_multipliers(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_multiplier`` element-wise over a float64 tensor; returns int64 tensors (M0, shift)."""
    pairs = [quantize_multiplier(v) for v in real.double().reshape(-1).tolist()]
    m0 = torch.tensor([p[0] for p in pairs], dtype=torch.int64).reshape(real.shape)
    shift = torch.tensor([p[1] for p in pairs], dtype=torch.int64).reshape(real.shape)
    return m0, shift


def wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """Two's-complement wrap of int64 values to int32 range (what int32 C arithmetic does)."""
    return ((x + 2 ** 31) & 0xFFFFFFFF) - 2 ** 31


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values held in int64.

    ab = a * b (64 bit); nudge = 2^30 if ab >= 0 else 1 - 2^30; result = (ab + nudge) / 2^31 with C
    division (truncation toward zero). a == b == INT32_MIN saturates to INT32_MAX.
    """
    a = torch.as_tensor(a, dtype=torch.int64)
    b = torch.as_tensor(b, dtype=torch.int64)
    ab = a * b
    nudge = torch.where(ab >= 0, torch.tensor(1 << 30), torch.tensor(1 - (1 << 30)))
    res = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a == b) & (a == INT32_MIN)
    return torch.where(overflow, torch.tensor(INT32_MAX), res)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp ``RoundingDivideByPOT``: x / 2^exponent rounded to nearest, ties away from zero.

    mask = 2^e - 1; remainder = x & mask; threshold = (mask >> 1) + (x < 0);
    result = (x >> e) + (remainder > threshold), with arithmetic shifts. exponent in [0, 31].
    """
    x = torch.as_tensor(x, dtype=torch.int64)
    e = torch.as_tensor(exponent, dtype=torch.int64)
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


INT16_MIN, INT16_MAX = -(2 ** 15), 2 ** 15 - 1


def srdhm16(a: torch.Tensor, b: int) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int16 values (held in int64): (a b + nudge) / 2^15,
    nudge = 2^14 if a b >= 0 else 1 - 2^14, C division; a == b == INT16_MIN saturates."""
    ab = a * b
    res = torch.div(ab + torch.where(ab >= 0, 1 << 14, 1 - (1 << 14)), 1 << 15, rounding_mode="trunc")
    return torch.where((a == INT16_MIN) & (b == INT16_MIN), INT16_MAX, res)


def doubling_high_mul16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TFLite's ``SaturatingDoublingHighMul`` on int16 values: a b / 2^15 truncated toward zero (no nudge)."""
    res = torch.div(a * b, 1 << 15, rounding_mode="trunc")
    return torch.where((a == INT16_MIN) & (b == INT16_MIN), INT16_MAX, res)


def multiplier16(real: float) -> tuple[int, int]:
    """(int16 M0, exponent) as TFLite's hard-swish Prepare: ``QuantizeMultiplier``, then
    ``DownScaleInt32ToInt16Multiplier``: (M0 + 2^15) >> 16, saturating at INT16_MAX."""
    m0, exponent = quantize_multiplier(real)
    return (INT16_MAX if m0 >= INT32_MAX - (1 << 15) else (m0 + (1 << 15)) >> 16), exponent


def multiply_by_quantized_multiplier(acc: torch.Tensor, m0: torch.Tensor | int, shift: torch.Tensor | int,
                                     rounding: str = "gemmlowp") -> torch.Tensor:
    """round(acc * M0 * 2^(shift - 31)) for int32 accumulators (held in int64), TFLite-exact.

    rounding (the kernel sets of ``KERNEL_ROUNDING``):
      'gemmlowp' (reference conv, TFLM conv and fully connected): x = int32(acc << max(shift, 0)) (wrapping like C);
          RoundingDivideByPOT(SRDHM(x, M0), max(-shift, 0)) — the final shift rounds ties away from 0.
      'single' (reference fully connected): (acc * M0 + 2^(30 - shift)) >> (31 - shift) in int64,
          one rounding, ties toward +inf.
      'ruy' (optimized kernels): x = int32(acc << max(shift, 0)); y = (x * M0 + 2^30) >> 31;
          (y + 2^(r-1)) >> r with r = max(-shift, 0), ties toward +inf.
    Returns int64 values (not clamped; add the zero point and clamp afterwards).

    Fast forms used here (identities checked against the literal gemmlowp functions in the tests):
    for M0 >= 0, SRDHM(x, M0) == (x * M0 + 2^30) >> 31 (C's truncating division of ab + 1 - 2^30 for
    ab < 0 equals the floor of ab + 2^30; saturation needs M0 == INT32_MIN); RoundingDivideByPOT(y, e)
    == (y + 2^(e-1) - (y < 0)) >> e for e > 0.
    """
    acc = torch.as_tensor(acc, dtype=torch.int64)
    m0 = torch.as_tensor(m0, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    if rounding not in ("gemmlowp", "single", "ruy"):
        raise QuantError(f"unknown fixed-point rounding {rounding!r}; choose gemmlowp, single or ruy")
    if bool((m0 < 0).any()):
        raise QuantError("quantized multipliers must be >= 0")
    right = (-shift).clamp(min=0)
    if rounding == "single":
        total = 31 - shift
        y = acc * m0
        y += torch.ones_like(total) << (total - 1)
        y >>= total
        return y
    x = wrap_int32(acc << shift.clamp(min=0)) if bool((shift > 0).any()) else acc
    y = x * m0
    y += 1 << 30
    y >>= 31
    half = (torch.ones_like(right) << right) >> 1  # 2^(e-1), 0 for e == 0
    if rounding == "gemmlowp":  # + 2^(e-1) - 1 where y < 0 (and e > 0): y >> 63 is -1 there, else 0
        neg = y >> 63
        if not bool((right > 0).all()):
            neg *= right > 0
        y += half
        y += neg
    else:
        y += half
    y >>= right
    return y


def xnnpack_scale(s_in: torch.Tensor, s_w: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """XNNPACK's requantization scale, all in float32: f32(f32(s_in * s_w) / s_out).

    (XNNPACK computes ``input_scale * kernel_scale[c] / output_scale`` in C float arithmetic.)
    """
    return (s_in.float() * s_w.float()) / s_out.float()


def requantize_float32(acc: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """XNNPACK 'fp32' requantization: clamp(rne(f32(acc) * scale) + zp, qmin, qmax), int32 out.

    acc is converted to float32 (round to nearest even), multiplied by the float32 scale, clamped to
    [qmin - zp, qmax - zp], rounded half to even (cvtps2dq / lrintf), then the zero point is added.
    """
    y = acc.float() * scale
    y = y.clamp(qmin - zero_point, qmax - zero_point)
    return torch.round(y).to(torch.int32) + zero_point
