"""quant.fixed_point against hand-computed gemmlowp / TFLite / ruy / XNNPACK cases."""
import math
import random

import pytest
import torch

from quant import QuantError
from quant.fixed_point import (INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier, quantize_multiplier,
                               quantize_multipliers, requantize_float32, rounding_divide_by_pot,
                               saturating_rounding_doubling_high_mul, xnnpack_scale)

T = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731


@pytest.mark.parametrize("real,expected", [
    (0.5, (2 ** 30, 0)), (1.0, (2 ** 30, 1)), (0.75, (1610612736, 0)), (0.1, (1717986918, -3)),
    (0.5 - 2 ** -34, (2 ** 30, 0)),          # q * 2^31 rounds up to 2^31: halve, shift + 1
    (2 ** -32, (2 ** 30, -31)),              # smallest multiplier that is kept
    (2 ** -33, (0, 0)), (1e-12, (0, 0)),     # tiny: flushed to zero as TFLite does
    (0.0, (0, 0)),
], ids=["half", "one", "three_quarters", "tenth", "round_to_2^31", "2^-32", "2^-33", "1e-12", "zero"])
def test_quantize_multiplier(real, expected):
    assert quantize_multiplier(real) == expected
    m0, shift = expected
    if m0:
        assert 2 ** 30 <= m0 < 2 ** 31
        assert abs(m0 * 2.0 ** (shift - 31) - real) <= 2.0 ** (shift - 32)


def test_quantize_multiplier_errors():
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(QuantError):
            quantize_multiplier(bad)


def test_quantize_multipliers_vectorised():
    m0, shift = quantize_multipliers(torch.tensor([0.5, 0.1, 0.0], dtype=torch.float64))
    assert m0.tolist() == [2 ** 30, 1717986918, 0] and shift.tolist() == [0, -3, 0]


def test_srdhm_hand_cases():
    half = 2 ** 30  # 0.5
    assert saturating_rounding_doubling_high_mul(T(3), T(half)).tolist() == [2]     # 1.5 -> 2
    assert saturating_rounding_doubling_high_mul(T(-3), T(half)).tolist() == [-1]   # -1.5 -> -1 (gemmlowp nudge)
    assert saturating_rounding_doubling_high_mul(T(-5), T(half)).tolist() == [-2]   # -2.5 -> -2
    assert saturating_rounding_doubling_high_mul(T(INT32_MIN), T(INT32_MIN)).tolist() == [INT32_MAX]  # saturation
    assert saturating_rounding_doubling_high_mul(T(INT32_MIN), T(INT32_MAX)).tolist() == [-INT32_MAX]
    assert saturating_rounding_doubling_high_mul(T(INT32_MAX), T(INT32_MAX)).tolist() == [INT32_MAX - 1]


def test_rounding_divide_by_pot_hand_cases():
    x = T(6, -6, 5, -5, 7, -7, -1, 0)
    assert rounding_divide_by_pot(x, 2).tolist() == [2, -2, 1, -1, 2, -2, 0, 0]  # ties away from zero
    assert rounding_divide_by_pot(x, 0).tolist() == x.tolist()
    assert rounding_divide_by_pot(T(-1), 1).tolist() == [-1]                     # -0.5 -> -1


@pytest.mark.parametrize("rounding,expected", [
    # acc * 0.125 for acc = 12, -12, 4, -4, 20, -20, 11, -11  (ties at +-1.5, +-0.5, +-2.5)
    # SRDHM first: acc * 0.5 (exact except 11 -> 5.5 -> 6, -11 -> -5.5 -> -5), then / 4 with ties away from
    # zero; 11 shows the double rounding: 1.375 -> 2
    ("gemmlowp", [2, -2, 1, -1, 3, -3, 2, -1]),
    ("single", [2, -1, 1, 0, 3, -2, 1, -1]),      # one rounding, ties toward +inf
    ("ruy", [2, -1, 1, 0, 3, -2, 2, -1]),         # same two steps, both ties toward +inf
])
def test_multiply_by_quantized_multiplier_ties(rounding, expected):
    acc = T(12, -12, 4, -4, 20, -20, 11, -11)
    assert multiply_by_quantized_multiplier(acc, 2 ** 30, -2, rounding).tolist() == expected


def test_multiply_by_quantized_multiplier_double_rounding():
    # gemmlowp rounds twice: acc * 0.75 * 2^-1 for acc = -5: SRDHM(-5, 0.75) = round(-3.75) = -4, then
    # -4 / 2 = -2; the single rounding of -1.875 is also -2, but acc = -3: SRDHM -> round(-2.25) = -2 -> -1,
    # single: round(-1.125) = -1.
    m0 = 1610612736
    assert multiply_by_quantized_multiplier(T(-5, -3, 5), m0, -1, "gemmlowp").tolist() == [-2, -1, 2]
    # acc = 1, M = 0.75 * 2^-1 = 0.375: SRDHM(1, 0.75) = 1, then 1/2 = 0.5 -> 1 (double rounding); single -> 0
    assert multiply_by_quantized_multiplier(T(1), m0, -1, "gemmlowp").tolist() == [1]
    assert multiply_by_quantized_multiplier(T(1), m0, -1, "single").tolist() == [0]


def test_left_shift_and_tiny():
    assert multiply_by_quantized_multiplier(T(3), 2 ** 30, 2, "gemmlowp").tolist() == [6]   # M = 2
    assert multiply_by_quantized_multiplier(T(2 ** 30), 2 ** 30, 2, "gemmlowp").tolist() == [0]  # int32 wraps like C
    for r in ("gemmlowp", "single", "ruy"):
        assert multiply_by_quantized_multiplier(T(INT32_MAX, INT32_MIN, 7), 0, 0, r).tolist() == [0, 0, 0]
        assert multiply_by_quantized_multiplier(T(2 ** 30, -2 ** 30), 2 ** 30, -31, r).tolist() == [0, 0]  # 2^-32


def _reference(acc: int, m0: int, shift: int, rounding: str) -> int:
    """Big-integer reference of each kernel's arithmetic (floor division = arithmetic shift)."""
    left, right = max(shift, 0), max(-shift, 0)
    if rounding == "single":
        return (acc * m0 + (1 << (30 - shift))) >> (31 - shift)
    x = ((acc << left) + 2 ** 31) % 2 ** 32 - 2 ** 31
    ab = x * m0
    if rounding == "gemmlowp":
        nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
        n = ab + nudge
        y = abs(n) // 2 ** 31 * (1 if n >= 0 else -1)  # C division truncates toward zero
        if right == 0:
            return y
        mask = (1 << right) - 1
        threshold = (mask >> 1) + (1 if y < 0 else 0)
        return (y >> right) + (1 if (y & mask) > threshold else 0)
    y = (ab + (1 << 30)) >> 31
    return (y + ((1 << right) >> 1)) >> right


@pytest.mark.parametrize("rounding", ["gemmlowp", "single", "ruy"])
def test_against_big_integer_reference(rounding):
    rng = random.Random(0)
    accs, m0s, shifts = [], [], []
    for _ in range(4000):
        shift = rng.randint(-31, 0) if rng.random() < 0.9 else rng.randint(1, 3)
        m0 = rng.randint(2 ** 30, 2 ** 31 - 1)
        if rng.random() < 0.3:  # exact ties: acc * m0 = (odd) * 2^(30 + right)
            m0 = 2 ** 30 + rng.randint(0, 2 ** 20) * 2 ** 10
            acc = rng.choice([-1, 1]) * (2 * rng.randint(0, 2 ** 10) + 1) * 2 ** max(0, -shift - 9)
            acc = max(min(acc, INT32_MAX), INT32_MIN)
        else:
            acc = rng.randint(INT32_MIN, INT32_MAX) >> rng.randint(0, 30)
        accs.append(acc), m0s.append(m0), shifts.append(shift)
    got = multiply_by_quantized_multiplier(torch.tensor(accs), torch.tensor(m0s), torch.tensor(shifts), rounding)
    want = [_reference(a, m, s, rounding) for a, m, s in zip(accs, m0s, shifts)]
    assert got.tolist() == want


def test_fast_gemmlowp_equals_literal_composition():
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(INT32_MIN, INT32_MAX, (20000,), generator=g, dtype=torch.int64)
    acc >>= torch.randint(0, 31, (20000,), generator=g)  # all magnitudes
    m0 = torch.randint(2 ** 30, 2 ** 31 - 1, (20000,), generator=g, dtype=torch.int64)
    shift = -torch.randint(0, 32, (20000,), generator=g)
    literal = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(acc, m0), -shift)
    assert torch.equal(multiply_by_quantized_multiplier(acc, m0, shift, "gemmlowp"), literal)


def test_xnnpack_requantization():
    acc = T(5, 7, -5, -7, 1000, -1000)
    out = requantize_float32(acc, torch.tensor(0.5), zero_point=3, qmin=-128, qmax=127)
    assert out.tolist() == [2 + 3, 4 + 3, -2 + 3, -4 + 3, 127, -128]   # half to even, then + zp, clamped
    s = xnnpack_scale(torch.tensor(0.1), torch.tensor(0.3), torch.tensor(0.7))
    expected = torch.tensor(0.1, dtype=torch.float32) * torch.tensor(0.3, dtype=torch.float32)
    assert s.dtype == torch.float32 and s.item() == (expected / torch.tensor(0.7)).item()
    assert math.isclose(s.item(), 0.1 * 0.3 / 0.7, rel_tol=1e-6)
