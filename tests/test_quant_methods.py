"""quant.methods: cross-layer equalisation keeps the float function and equalises ranges (and helps
per-tensor depthwise weights), high-bias absorption is exact, bias correction lowers the mean output error."""
import pytest
import torch
import torch.nn as nn

import quant
from quant import QuantConfig
from quant.methods import layer_inputs
from tests.graph_models import model_and_data


@pytest.mark.parametrize("name", ["seed_style", "depthwise_relu", "inverted_residual", "resnet"])
def test_cle_keeps_the_float_function_and_equalises_ranges(name):
    model, shape, batches, x = model_and_data(name)
    q = quant.quantize(model, QuantConfig(observer="minmax"))
    pairs = quant.equalize(q)
    expected = {"seed_style": 2, "depthwise_relu": 3, "inverted_residual": 0}  # ReLU6 ends a pair
    if name in expected:
        assert len(pairs) == expected[name], pairs
    quant.set_fake_quant(q, False)
    q.eval()
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), rtol=1e-4, atol=1e-4)
    for a, b in pairs:  # A's output channel c and B's input channel c now have the same range
        la, lb = q.get_submodule(a), q.get_submodule(b)
        r_a = la.float_weight_bias()[0].detach().reshape(la.weight.shape[0], -1).abs().amax(1)
        from quant.methods import _in_channel_view
        r_b = _in_channel_view(lb, la.weight.shape[0]).abs().amax(1)
        assert torch.allclose(r_a, r_b, rtol=1e-2)


def test_cle_helps_per_tensor_depthwise():
    """The case CLE is for: per-tensor weights and a depthwise conv whose channels differ a lot."""
    model, shape, batches, x = model_and_data("depthwise_relu")
    dw = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    with torch.no_grad():
        dw.weight.mul_(torch.logspace(-2, 1, dw.weight.shape[0]).reshape(-1, 1, 1, 1))
    errs = {}
    for methods in ((), ("cle",)):
        q = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=8, act_bits=8, per_channel=False), batches,
                      methods)
        q.eval()
        with torch.no_grad():
            errs[methods] = (q(x) - model(x)).pow(2).mean()
    assert errs[("cle",)] < errs[()]


class HighBias(nn.Module):
    """conv -> BN (beta far above 3 |gamma|) -> ReLU -> B, B a conv, a depthwise conv or a linear after flatten
    (no zero padding: absorption is exact where B reads only real inputs)."""

    def __init__(self, b: str) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.b = {"conv": nn.Conv2d(4, 5, 3), "depthwise": nn.Conv2d(4, 4, 3, groups=4),
                  "linear": nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5))}[b]
        with torch.no_grad():
            self.a[0].weight.mul_(0.01)               # A's output: beta + a little, always above beta - 3 |gamma|
            self.a[1].weight.copy_(torch.tensor([1.0, -0.5, 2.0, 1.0]))
            self.a[1].bias.copy_(torch.tensor([10.0, 4.0, 1.0, 0.0]))   # c = 7, 2.5, 0, 0

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("b", ["conv", "depthwise", "linear"])
def test_high_bias_absorption_moves_bias_past_the_relu_exactly(b):
    torch.manual_seed(0)
    model = HighBias(b).eval()
    x = torch.randn(8, 3, 8, 8)
    q = quant.quantize(model, QuantConfig())
    absorbed = quant.absorb_high_biases(q)
    assert list(absorbed) == ["a.0->b" if b != "linear" else "a.0->b.1"]
    assert absorbed[next(iter(absorbed))] == pytest.approx((7 + 2.5) / 4)
    assert torch.allclose(q.get_submodule("a.0").bn.bias, torch.tensor([3.0, 1.5, 1.0, 0.0]))
    quant.set_fake_quant(q, False)
    q.eval()
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), rtol=1e-5, atol=1e-4)
        assert q.get_submodule("a.0")(x).amax() < model.a(x).amax() - 6  # A's range shrank by about c


def test_bias_correction_lowers_mean_output_error():
    model, shape, batches, x = model_and_data("features_classifier")
    cfg = QuantConfig(observer="minmax", weight_bits=3, act_bits=8, per_channel=False)
    shift = {}
    for methods in ((), ("bias_correction",)):
        q = quant.ptq(model, cfg, batches, methods)
        path, layer = quant.weighted_layers(q)[-1]
        xf = layer_inputs(q, layer, batches, float_net=True)
        with torch.no_grad():
            quant.set_fake_quant(q, False)
            ref = model(torch.cat(batches))
            quant.set_fake_quant(q, True)
            out = q(torch.cat(batches))
        shift[methods] = (out - ref).mean(0).abs().mean()
        assert len(xf) == 128
    assert shift[("bias_correction",)] < 0.5 * shift[()]
