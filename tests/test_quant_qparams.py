"""quant.qparams: pure math: rounding, ranges, qparams, quantize / dequantize / fake quantize (per tensor and
per channel), the STE gradient."""
import math
from fractions import Fraction

import pytest
import torch

from quant import QuantError
from quant.observers import MinMaxObserver
from quant.qparams import QParams, choose_qparams, dequantize, fake_quantize, qrange, quantize, round_half_away


BITS = list(range(2, 9))


def test_round_half_away_from_zero():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, -0.49999997, 2.4, -2.6])
    assert round_half_away(x).tolist() == [-3, -2, -1, 1, 2, 3, 0, 0, 2, -3]
    assert torch.round(torch.tensor([0.5, 2.5])).tolist() == [0, 2]  # why torch.round is banned


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_half_away_matches_exact_reference(dtype):
    """Against Python's exact arithmetic on each value: ties at every k + 1/2, the float just below and
    above each tie, large magnitudes where floor(|x| + 0.5) would round, and -0.0."""
    k = torch.arange(-300, 300, dtype=dtype) + 0.5
    below, above = torch.nextafter(k, k - 1), torch.nextafter(k, k + 1)
    big = torch.tensor([2.0 ** 23 + 1, 2.0 ** 52 + 1, -(2.0 ** 23) - 1, 0.0, -0.0, 1e-30], dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([k, below, above, big, torch.randn(5000, generator=g, dtype=dtype) * 50])
    want = [math.copysign(math.floor(abs(Fraction(v)) + Fraction(1, 2)), v) for v in x.tolist()]
    assert round_half_away(x).tolist() == want


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_ranges(bits):
    assert qrange(bits, True, True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert qrange(bits, False, False) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["weight", "act"])
def test_on_grid_roundtrip_and_range(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(1000, generator=g) * 3 + 1
    qp = choose_qparams(x.min(), x.max(), bits, symmetric=symmetric, narrow=symmetric)
    assert qp.scale.dtype == torch.float32 and qp.scale > 0
    q = quantize(x, qp)
    assert q.min() >= qp.qmin and q.max() <= qp.qmax
    on_grid = dequantize(q, qp)
    assert torch.equal(quantize(on_grid, qp), q)                     # on-grid values come back unchanged
    assert torch.equal(fake_quantize(on_grid, qp), on_grid)
    assert torch.equal(fake_quantize(x, qp), on_grid)
    big = torch.tensor([-1e6, 1e6])
    assert quantize(big, qp).tolist() == [qp.qmin, qp.qmax]          # saturates, never wraps
    zero = quantize(torch.zeros(1), qp)                              # zero is exact
    assert dequantize(zero, qp).item() == 0.0
    if symmetric:
        assert int(qp.zero_point) == 0


@pytest.mark.parametrize("lo,hi", [(0.0, 0.0), (3.0, 3.0), (-2.0, -2.0), (1e-30, 1e-30)],
                         ids=["zeros", "pos_const", "neg_const", "tiny"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["weight", "act"])
def test_constant_tensors(lo, hi, symmetric):
    x = torch.full((10,), lo)
    qp = choose_qparams(x.min(), x.max(), 8, symmetric=symmetric, narrow=symmetric)
    assert torch.isfinite(qp.scale).all() and qp.scale > 0
    y = fake_quantize(x, qp)
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() <= qp.scale / 2  # the range holds x (widened to 0): at most half a step off
    assert qp.qmin <= int(qp.zero_point) <= qp.qmax


def test_range_widened_to_zero():
    qp = choose_qparams(torch.tensor(2.0), torch.tensor(5.0), 8, symmetric=False, narrow=False)
    assert int(qp.zero_point) == -128 and qp.scale.item() == pytest.approx(5 / 255)


def test_nonfinite_range_is_an_error():
    with pytest.raises(QuantError):
        choose_qparams(torch.tensor(float("nan")), torch.tensor(1.0), 8, False, False)


@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"b{b}")
def test_ste_gradient(bits):
    qp = choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), bits, symmetric=False, narrow=False)
    x = torch.tensor([-5.0, -0.3, 0.0, 0.7, 5.0], requires_grad=True)
    fake_quantize(x, qp).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def _edge_values(scale: float, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values, every half-integer tie and integer of the grid, and the floats either side of each tie."""
    k = torch.arange(lo - 3, hi + 4, dtype=dtype)
    ties = (k + 0.5) * scale
    return torch.cat([torch.randn(500, generator=torch.Generator().manual_seed(lo - hi), dtype=dtype) * hi * scale,
                      ties, k * scale, ties.nextafter(ties + 1), ties.nextafter(ties - 1)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lo,hi", [(-8, 7), (0, 15), (-15, 0), (-128, 127), (-3, 12)])
def test_ste_python_bounds_equal_tensor_bounds(lo, hi, dtype):
    """Per-tensor fake quantization takes python bounds and a one-pass backward over the saved x / scale
    (``hardtanh_backward`` at lo - 1/2, hi + 1/2); it gives the tensor-bounds path's values and gradients
    exactly, at every tie and the floats beside it included."""
    from quant.qparams import _FakeQuantSTE
    scale = torch.tensor(0.0371, dtype=dtype)
    x = _edge_values(0.0371, lo, hi, dtype)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    outs = []
    for bounds in [(float(lo), float(hi)), (torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype))]:
        xg = x.clone().requires_grad_()
        out = _FakeQuantSTE.apply(xg, scale, *bounds)
        (out * w).sum().backward()
        outs.append((out.detach(), xg.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert 0 < int((outs[0][1] == 0).sum()) < x.numel()  # both clipped and passed gradients occur


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}-per_channel")
def test_per_channel(bits):
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7).reshape(-1, 1, 1, 1)
    obs = MinMaxObserver(bits, symmetric=True, narrow=True, axis=0)
    obs(w)
    qp = obs.calculate_qparams()
    assert qp.scale.shape == (6,) and qp.axis == 0
    amax = w.abs().reshape(6, -1).amax(1)
    assert torch.allclose(qp.scale, amax / (2 ** (bits - 1) - 1))
    q = quantize(w, qp)
    assert (q.reshape(6, -1).abs().amax(1) == 2 ** (bits - 1) - 1).all()  # every channel uses its full range
    assert torch.equal(fake_quantize(dequantize(q, qp), qp), dequantize(q, qp))


def test_qparams_dict_roundtrip():
    qp = QParams(torch.tensor([0.5, 0.25]), torch.tensor([0, 0], dtype=torch.int32), -7, 7, 0)
    back = QParams.from_dict(qp.to_dict())
    assert torch.equal(back.scale, qp.scale) and (back.qmin, back.qmax, back.axis) == (-7, 7, 0)
