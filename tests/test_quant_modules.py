"""quant.modules: the fake-quantized layers. The fused Conv+BN layer is the folding hook and in training
equals float BN with its momentum; eval-mode fake quantization rounds as the runtime it targets; int32 bias
overflow is refused; the LSQ and LSQ+ quantizers give the values and gradients of their definitions."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant import QuantConfig, QuantError
from quant.fold import fold_bn
from quant.modules import LSQQuantize, QConvBNReLU, QLinear
from quant.observers import build_observer
from quant.qparams import fake_quantize
from quant.qparams import quantize as quantize_tensor
from quant.transforms import calibrate, convert, quantize
from tests.conftest import randomise_bn_seeded as _randomise_bn
from tests.conftest import case, synthetic_setup
from tests.graph_models import model_and_data


def test_qconvbnrelu_is_the_folding_hook():
    conv, bn = nn.Conv2d(2, 3, 3), _randomise_bn(nn.BatchNorm2d(3))
    m = QConvBNReLU(conv, bn, QuantConfig())
    w, b = m.float_weight_bias()
    w_ref, b_ref = fold_bn(conv, bn)
    assert torch.allclose(w, w_ref) and torch.allclose(b, b_ref)
    assert isinstance(QLinear.from_float([nn.Linear(2, 2)], QuantConfig()), QLinear)


def test_int32_bias_overflow_is_detected():
    q = quantize(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), QuantConfig())
    calibrate(q, [torch.randn(10, 1, 2, 2) * 1e-3])
    with torch.no_grad():
        q.get_submodule("1").weight.mul_(1e-6)
        q.get_submodule("1").bias.fill_(1e6)
    with pytest.raises(QuantError, match="int32 bias overflow") as e:
        convert(q)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,bits,rounding", [  # quick: one case (the full run: every model x bits x rounding)
    case(name, bits, rounding, quick=(name, bits, rounding) == ("cnn", 8, "xnnpack"),
         id=f"{name}-w{bits}a{bits}-per_channel-{rounding}")
    for name in ("cnn", "cnn_bn") for bits in (8, 4) for rounding in ("ref", "builtin", "xnnpack")])
def test_eval_fake_quant_simulates_the_runtime_requantization(name, bits, rounding):
    """A frozen fake-quant model in eval mode rounds like the runtime it targets: with the same
    rounding its logits equal the integer engine's exactly, XNNPACK included (the model input's quantizer
    rounds as that runtime's QUANTIZE does: ``FakeQuantize.requant``)."""
    model, batch = synthetic_setup(name, "cifar10")
    q = quant.quantize(model, QuantConfig(observer="minmax", weight_bits=bits, act_bits=bits, rounding=rounding))
    quant.calibrate(q, [batch(256)[0] for _ in range(2)])
    im = quant.convert(q)
    x, _ = batch(500)
    with torch.no_grad():
        q_fq = quantize_tensor(q(x), im.output_qparams())
        assert torch.equal(q_fq, im.forward_int(x))
        quant.set_requant(q, "float")  # plain round(y / s_out): differs from the double-rounding kernels
        q_float = quantize_tensor(q(x), im.output_qparams())
    assert (q_float - q_fq).abs().max() <= 2
    with pytest.raises(quant.QuantError, match="unknown requantization"):
        quant.set_requant(q, "floor")


def test_bn_before_freeze_matches_float_bn_in_train_mode_and_momentum():
    """Fake quant off: the folded/corrected layer equals conv -> BatchNorm2d(train) -> ReLU, and the
    running statistics follow PyTorch's momentum update."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    layer = QConvBNReLU(conv, bn, quant.QuantConfig()).train()
    quant.set_fake_quant(layer, False)
    ref_bn = nn.BatchNorm2d(5, momentum=0.3)
    ref_bn.load_state_dict(bn.state_dict())
    x = torch.randn(8, 3, 9, 9)
    expected = F.relu(ref_bn.train()(conv(x)))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)


def test_lsq_forward_equals_fake_quantize_and_scale_learns_positive():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 2
    obs = quant.observers.MinMaxObserver(4, symmetric=False)
    obs(x)
    lsq = LSQQuantize(obs, obs.calculate_qparams())
    xg = x.clone().requires_grad_(True)
    out = lsq(xg)
    assert torch.equal(out.detach(), fake_quantize(x, lsq.qparams()))
    out.pow(2).sum().backward()
    assert lsq.scale.grad is not None and lsq.scale.grad.abs() > 0
    # LSQ gradient: sum over elements of dL/dout * (-x/s + round(x/s) inside, qmin-zp / qmax-zp outside) * g
    s, zp, qp = lsq.scale.detach(), lsq.zero_point.float(), lsq.qparams()
    v = x / s
    r = quant.qparams.round_half_away(v)
    inside = (v >= qp.qmin - zp) & (v <= qp.qmax - zp)  # the paper clips v = x / s before rounding
    d = torch.where(inside, r - v, torch.where(v < qp.qmin - zp, qp.qmin - zp, qp.qmax - zp))
    g = 1 / math.sqrt(x[0].numel() * (qp.qmax - qp.qmin))
    torch.testing.assert_close(lsq.scale.grad, (2 * out.detach() * d).sum() * g, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        lsq.scale -= 10 * lsq.scale.abs() + 1  # a step that would make it negative
    lsq.clamp_()
    assert lsq.scale > 0 and lsq.qparams().scale > 0 and torch.equal(lsq.scale.detach(), lsq.scale_floor)


@pytest.mark.parametrize("axis", [None, 0, 1], ids=["per_tensor", "weight_axis0", "act_axis1"])
def test_lsq_fused_gradients_equal_plain_autograd(axis):
    """The fused LSQ function gives the values and gradients of the textbook composition
    s_g = grad_scale(s, g); out = round_ste(clamp(x / s_g, lo, hi)) * s_g, in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 4, 4, generator=g, dtype=torch.float64) * 3
    shape = [1] * 4
    if axis is not None:
        shape[axis] = x.shape[axis]
    s0 = torch.rand(shape, generator=g, dtype=torch.float64) + 0.2
    zp = torch.full(shape, -2.0 if axis != 0 else 0.0, dtype=torch.float64)
    lo, hi, gs = -8 - zp, 7 - zp, 0.37
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)

    x1, s1 = x.clone().requires_grad_(), s0.clone().requires_grad_()
    out1 = quant.modules._LSQFunction.apply(x1, s1, lo, hi, gs)
    (out1 * w).sum().backward()

    x2, s2 = x.clone().requires_grad_(), s0.clone().requires_grad_()
    s_g = s2 * gs + (s2 - s2 * gs).detach()                  # value s, gradient times gs
    v = torch.minimum(torch.maximum(x2 / s_g, lo), hi)       # clamp: zero gradient outside [lo, hi]
    out2 = (v + (quant.qparams.round_half_away(v) - v).detach()) * s_g
    (out2 * w).sum().backward()

    assert torch.equal(out1.detach(), out2.detach())
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(s1.grad, s2.grad)
    assert s1.grad.shape == s0.shape and (s1.grad != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lo,hi", [(-8, 7), (0, 15), (-15, 0), (-3, 12)])
def test_lsq_python_bounds_equal_tensor_bounds(lo, hi, dtype):
    """Per-tensor LSQ takes python bounds, a float 0/1 mask and a scalar clamp; values, input gradients and
    step-size gradients equal the tensor-bounds path's exactly, with values on the bounds, on every tie and
    beside them (the range is inclusive: a value exactly on a bound passes its gradient)."""
    k = torch.arange(lo - 3, hi + 4, dtype=dtype)
    s0 = torch.tensor(0.0371, dtype=dtype)
    ties = (k + 0.5) * s0
    x = torch.cat([torch.randn(500, generator=torch.Generator().manual_seed(2), dtype=dtype) * hi,
                   ties, k * s0, ties.nextafter(ties + 1), ties.nextafter(ties - 1)])
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    outs = []
    for bounds in [(float(lo), float(hi)), (torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype))]:
        xg, sg = x.clone().requires_grad_(), s0.clone().requires_grad_()
        out = quant.modules._LSQFunction.apply(xg, sg, *bounds, 0.37)
        (out * w).sum().backward()
        outs.append((out.detach(), xg.grad, sg.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    on_bound = (x / s0 == lo) | (x / s0 == hi)
    assert on_bound.any() and (outs[0][1][on_bound] == w[on_bound]).all()


def test_lsq_plus_learns_an_integer_zero_point_and_stays_exact():
    """LSQ+: the offset gets gradient only from clipped values; after training steps the zero point is
    an integer in range and fake quant equals the integer engine."""
    from quant.modules import LSQQuantize
    from quant.qparams import QParams
    qp = QParams(torch.tensor(0.1), torch.tensor(-20, dtype=torch.int32), -128, 127, None)
    fq = LSQQuantize(build_observer("minmax", 8), qp, learn_offset=True)
    inside = torch.linspace(-1.0, 1.0, 50)
    fq(inside).sum().backward()
    assert fq.offset.grad == 0
    fq.offset.grad = None
    fq(torch.tensor([100.0, -100.0, 0.0])).sum().backward()
    assert fq.offset.grad != 0
    model, shape, batches, x = model_and_data("resnet")
    q = quant.quantize(model, QuantConfig(observer="minmax", weight_bits=4, act_bits=4))
    quant.calibrate(q, batches)
    quant.prepare_qat(q, quant.QATConfig(quantizer="lsq+", freeze_bn=0.0))
    offsets = [m.offset for m in q.modules() if isinstance(m, LSQQuantize) and m.offset is not None]
    assert offsets and all(m.offset is None for m in q.modules() if isinstance(m, LSQQuantize) and m.dynamic)
    start = [float(o.detach()) for o in offsets]
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    q.train()
    quant.set_bn_frozen(q, True)
    for b in batches:
        opt.zero_grad()
        q(b).pow(2).mean().backward()
        opt.step()
        quant.clamp_lsq_(q)
    assert any(float(o.detach()) != s for o, s in zip(offsets, start))
    q.eval()
    im = quant.convert(q)
    assert torch.equal(q(x), im(x))
