"""quant.ptq: after every set of methods fake quant == integer engine == LiteRT (three kernel sets) and TFLM,
with a constant channel; per-layer bits (first and last layers at 8) reach the engine and the file."""
import pytest
import torch
import torch.nn as nn

import quant
from quant import QuantConfig
from quant.act_tune import ActTuneConfig
from quant.adaround import AdaRoundConfig
from quant.export_tflite import RUNTIMES, make_runner
from tests.conftest import case, needs_litert
from tests.graph_models import model_and_data


def zero_a_channel(model: nn.Module) -> None:
    """Make the first conv's output channel 0 constant (all-zero weights and bias)."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight[0].zero_()
        if conv.bias is not None:
            conv.bias[0] = 0.0


METHOD_SETS = [(), ("cle",), ("adaround",), ("bias_correction",), ("act_tune",), ("output_range",),
               ("cle", "adaround", "bias_correction", "act_tune", "output_range")]


@needs_litert
@pytest.mark.parametrize("name,methods,per_channel", [
    case(name, methods, per_channel, quick=name == "seed_style" and (per_channel or methods == ("cle",)),  # quick: 6
         id=f"{name}-{'+'.join(methods) or 'none'}-{'per_channel' if per_channel else 'per_tensor'}")
    for name in ("seed_style", "resnet") for methods in METHOD_SETS for per_channel in (True, False)])
def test_every_method_stays_exact_with_a_zero_channel(name, methods, per_channel):
    """fake quant == engine == LiteRT (3 kernel sets + TFLM) after the method, with a constant channel."""
    model, shape, batches, x = model_and_data(name)
    zero_a_channel(model)
    q = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=4, act_bits=4, per_channel=per_channel), batches,
                  methods, AdaRoundConfig(iterations=20, samples=64), act_tune_cfg=ActTuneConfig(iterations=20, samples=64))
    q.eval()
    im = quant.convert(q)
    assert torch.equal(q(x), im(x))
    data = quant.export_tflite(im, None, shape)
    for mode in RUNTIMES:
        im.rounding = mode
        assert torch.equal(make_runner(data, mode)(x).to(torch.int32), im.forward_int(x)), mode


@needs_litert
@pytest.mark.parametrize("name", ["seed_style", "resnet", "two_branch_cat"])
def test_per_layer_bits_reach_engine_and_file(name):
    """First and last layers at 8 bits, the rest at 3: each tensor has its own range in the engine, and
    LiteRT equals the engine."""
    model, shape, batches, x = model_and_data(name)
    layers = quant.first_last(model, 8)
    q = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=3, act_bits=3, layers=layers), batches)
    q.eval()
    weighted = quant.weighted_layers(q)
    first, last = weighted[0][1], weighted[-1][1]
    assert first.weight_quant.qparams().qmax == 127 and last.weight_quant.qparams().qmax == 127
    assert last.act_quant.qparams().qmax == 127 and first.act_quant.qparams().qmax == 3
    assert weighted[1][1].weight_quant.qparams().qmax == 3
    im = quant.convert(q)
    assert torch.equal(q(x), im(x))
    levels = {int(im.forward_int(x).max()) > 3}
    assert levels == {True}  # the logits use the 8-bit range
    data = quant.export_tflite(im, None, shape)
    for mode in RUNTIMES:
        im.rounding = mode
        assert torch.equal(make_runner(data, mode)(x).to(torch.int32), im.forward_int(x)), mode
