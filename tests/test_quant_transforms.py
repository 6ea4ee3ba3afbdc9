"""quant.transforms: ``quantize`` builds the fake-quant model (fused layers under the float model's keys,
one quantizer for the inputs of a concatenation, per-layer settings by name or type), ``calibration_mode`` /
``calibrate`` and ``convert`` (uncalibrated models refused, int8 clamps)."""
import pytest
import torch
import torch.nn as nn

import quant
from quant import QuantConfig, QuantError
from quant.transforms import calibrate, convert, quantize, set_fake_quant
from tests.conftest import randomise_bn_seeded as _randomise_bn
from tests.graph_models import build, model_and_data


class Toy(nn.Sequential):
    """A model the tests define themselves: nested Sequential, every supported layer and fusion."""

    def __init__(self):
        super().__init__(
            nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
            nn.Conv2d(6, 5, 3, stride=2, bias=False), nn.BatchNorm2d(5),
            nn.MaxPool2d(2),
            nn.Conv2d(5, 4, 1), nn.ReLU(),
            nn.Dropout(0.1),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 12), nn.ReLU(),
            nn.Linear(12, 3),
        )


def test_quantize_structure_keys_and_disabled_identity():
    torch.manual_seed(0)
    model = _randomise_bn(Toy())
    q = quantize(model, QuantConfig())
    types = [type(m).__name__ for m in q.modules() if isinstance(m, quant.modules.QModule)]
    assert types == ["QConvBNReLU", "QConvBN", "QMaxPool2d", "QConvReLU", "QLinearReLU", "QLinear"]
    sd = q.state_dict()
    for k in ("0.0.weight", "0.0.bias", "0.0.bn.running_var", "1.weight", "1.bn.weight", "4.bias", "8.weight",
              "10.bias"):
        assert k in sd, k
    assert q.input_quant is not None and q.get_submodule("8").input_fq is q.get_submodule("4").act_quant
    x = torch.randn(5, 2, 9, 9)
    set_fake_quant(q, False)
    q.eval()
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-5)
    # float shadow weights are never overwritten by quantization
    w0 = q.get_submodule("4").weight.detach().clone()
    calibrate(q, [x])
    q(x)
    assert torch.equal(q.get_submodule("4").weight, w0) and torch.equal(model[4].weight, w0)


def test_uncalibrated_convert_is_an_error():
    with pytest.raises(QuantError, match="calibrate"):
        convert(quantize(nn.Sequential(nn.Linear(3, 3)), QuantConfig()))


def test_calibration_mode_flags():
    q = quantize(nn.Sequential(nn.Flatten(), nn.Linear(2, 2)), QuantConfig())
    q.train()
    with quant.calibration_mode(q):
        assert not q.training and not torch.is_grad_enabled()
        assert all(not fq.enabled and not fq.observer.frozen for fq in quant.transforms.quantizers(q))
        q(torch.randn(3, 2))
    assert q.training
    assert all(fq.enabled and fq.observer.frozen for fq in quant.transforms.quantizers(q))


def test_clamp_int8_mode():
    q = quantize(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), QuantConfig(weight_bits=4, act_bits=4))
    calibrate(q, [torch.randn(10, 1, 2, 2)])
    im = convert(q, clamp="int8")
    out = im.forward_int(torch.randn(100, 1, 2, 2) * 100)
    assert out.min() >= -128 and out.max() <= 127 and (out.abs() > 8).any()


def test_cat_inputs_share_one_quantizer():
    model, shape = build("two_branch_cat")
    q = quant.quantize(model, QuantConfig())
    assert q.a.act_quant is q.b.act_quant


def test_per_layer_observer_and_type_pattern():
    model, shape, batches, x = model_and_data("seed_style")
    q = quant.quantize(model, QuantConfig(observer="minmax",
                                          layers=(("Linear", {"observer": "entropy", "act_bits": 6}),)))
    fqs = [layer.act_quant for _, layer in quant.weighted_layers(q)]
    assert type(fqs[-1].observer).__name__ == "EntropyObserver" and fqs[-1].observer.bits == 6
    assert type(fqs[0].observer).__name__ == "MinMaxObserver" and fqs[0].observer.bits == 8
