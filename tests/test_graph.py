"""Graph mode (quant.graph): models written as classes with ``forward`` quantize, convert and export;
fake quantization equals the integer engine exactly, and LiteRT equals the engine in each kernel set."""
import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant import QuantConfig, QuantError
from quant.export_tflite import RUNTIMES, make_runner
from tests.conftest import case, randomise_bn
from tests.graph_models import GRAPH_MODELS

needs_litert = pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                                  reason="the LiteRT interpreter is not installed: pip install ai-edge-litert")


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, int, int]]:
    make, shape = GRAPH_MODELS[name]
    torch.manual_seed(seed)
    return randomise_bn(make(), torch.Generator().manual_seed(seed + 1)), shape


def calibrated(model: nn.Module, shape, bits: int, rounding: str = "ref", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = quant.quantize(model, QuantConfig(weight_bits=bits, act_bits=bits, rounding=rounding))
    quant.calibrate(q, [torch.randn(32, *shape, generator=g) for _ in range(4)])
    x = torch.randn(64, *shape, generator=g)
    return q, torch.cat([x, 4 * x])  # 4x: far outside the calibrated ranges, every clamp is exercised


ROUNDINGS = ["ref", "builtin", "xnnpack", "tflm"]
#: every rounding x model x bits; the quick subset keeps model i at ROUNDINGS[i % 4] and (8, 4)[i // 4 % 2]:
#: each model once, each rounding at both bit widths
ENGINE_CASES = [case(rounding, name, bits, quick=rounding == ROUNDINGS[i % 4] and bits == (8, 4)[i // 4 % 2],
                     id=f"{rounding}-{name}-w{bits}a{bits}")
                for rounding in ROUNDINGS for i, name in enumerate(GRAPH_MODELS) for bits in (8, 4)]


@pytest.mark.parametrize("rounding,name,bits", ENGINE_CASES)
def test_fake_quant_equals_integer_engine(name, bits, rounding):
    model, shape = build(name)
    q, x = calibrated(model, shape, bits, rounding)
    q.eval()
    im = quant.convert(q)
    assert im.rounding == rounding
    assert torch.equal(q(x), im(x))
    with torch.no_grad():
        assert (q(x).argmax(1) == model(x).argmax(1)).float().mean() > (0.5 if bits == 8 else 0.2)


def test_sequential_subclass_follows_its_forward():
    """The silent case of the Sequential-only version: a Sequential whose forward is not its chain."""
    model, shape = build("sequential_forward")
    q, x = calibrated(model, shape, 8)
    q.eval()
    x = x[:64]  # inside the calibrated ranges
    with torch.no_grad():
        ref = model(x)
        assert (q(x).argmax(1) == ref.argmax(1)).float().mean() > 0.9
        assert (quant.convert(q)(x) - ref).abs().max() < 0.25 * ref.abs().max()


#: every model x bits; the quick subset keeps model i at (8, 6, 4)[i % 3]: each model once, each width 3 times
RUNTIME_CASES = [case(name, bits, quick=bits == (8, 6, 4)[i % 3], id=f"{name}-w{bits}a{bits}")
                 for i, name in enumerate(GRAPH_MODELS) for bits in (8, 6, 4)]


@needs_litert
@pytest.mark.parametrize("name,bits", RUNTIME_CASES)
def test_runtimes_equal_engine_every_mode(name, bits):
    """LiteRT in its three kernel sets and TFLM equal the engine with the matching rounding."""
    model, shape = build(name)
    q, x = calibrated(model, shape, bits)
    im = quant.convert(q)
    data = quant.export_tflite(im, None, shape)
    for mode in RUNTIMES:
        im.rounding = mode
        runner = make_runner(data, mode)
        assert torch.equal(runner(x).to(torch.int32), im.forward_int(x)), mode
        if mode == "xnnpack" and bits == 8 and "avgpool" not in name and name not in AVG_POOL_MODELS:
            assert runner.delegated(), "XNNPACK should run the whole 8-bit graph"


#: models with average pooling: LiteRT 2.3's XNNPACK delegate does not take int8 AVERAGE_POOL_2D, which
#: then runs on the builtin kernel (same integers)
AVG_POOL_MODELS = ("resnet", "depthwise_separable", "inverted_residual", "two_branch_cat")


@needs_litert
def test_padding_and_depthwise_lower_to_pad_and_depthwise_conv():
    for name, ops in (("stride2_pad1", {"PAD", "CONV_2D"}), ("depthwise_separable", {"DEPTHWISE_CONV_2D"}),
                      ("resnet", {"ADD", "PAD", "AVERAGE_POOL_2D"}), ("two_branch_cat", {"CONCATENATION"})):
        model, shape = build(name)
        q, _ = calibrated(model, shape, 8)
        data = quant.export_tflite(quant.convert(q), None, shape)
        names = {op["op_name"] for op in quant.TFLiteRunner(data, "ref").interp._get_ops_details()}
        assert ops <= names, (name, names)


def test_functional_and_module_forms_give_one_graph():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 13 * 13, 10)

        def forward(self, x):
            return self.fc(torch.flatten(F.max_pool2d(self.conv(x).relu(), 2), 1))

    torch.manual_seed(0)
    f = Functional()
    seq = nn.Sequential(f.conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), f.fc)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 1, 28, 28, generator=g) for _ in range(2)]
    outs = []
    for m in (f, seq):
        q = quant.quantize(m, QuantConfig())
        quant.calibrate(q, batches)
        outs.append(quant.convert(q).forward_int(batches[0]))
        kinds = [type(mod).__name__ for mod in q.modules() if isinstance(mod, quant.modules.QModule)]
        assert kinds == ["QConvReLU", "QMaxPool2d", "QLinear"]
    assert torch.equal(*outs)


def test_cat_inputs_share_one_quantizer():
    model, shape = build("two_branch_cat")
    q = quant.quantize(model, QuantConfig())
    assert q.a.act_quant is q.b.act_quant


@pytest.mark.parametrize("rounding", ["ref", "xnnpack"])
def test_qat_on_a_residual_model_trains_and_converts(rounding):
    model, shape = build("resnet")
    q, x = calibrated(model, shape, 4, rounding)
    for quantizer in ("ste", "lsq"):
        qq = quant.prepare_qat(copy.deepcopy(q), quant.QATConfig(quantizer=quantizer))
        qq.train()
        opt = torch.optim.SGD(qq.parameters(), lr=0.01)
        y = torch.randint(0, 10, (len(x),))
        before = [p.detach().clone() for p in qq.parameters()]
        for _ in range(2):
            loss = F.cross_entropy(qq(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            quant.clamp_lsq_(qq)
        assert any(not torch.equal(a, b) for a, b in zip(before, qq.parameters()))
        quant.set_bn_frozen(qq, True)
        quant.set_act_observers(qq, False)
        qq.eval()
        assert torch.equal(qq(x), quant.convert(qq)(x))


def test_untraceable_model_is_one_line_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return -self.conv(x)

    with pytest.raises(QuantError) as e:
        quant.quantize(Branchy(), QuantConfig())
    msg = str(e.value)
    assert "\n" not in msg and "test_graph.py:" in msg and "if x.sum() > 0" in msg


def test_unsupported_op_names_node_and_line():
    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return F.gelu(self.conv(x)).flatten(1)

    with pytest.raises(QuantError) as e:
        quant.quantize(Gelu(), QuantConfig())
    msg = str(e.value)
    assert "\n" not in msg and "'gelu'" in msg and "test_graph.py:" in msg and "function gelu" in msg


def test_sigmoid_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid())
    with pytest.raises(QuantError, match="LOGISTIC"):
        quant.quantize(model, QuantConfig())


def test_bn_without_its_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(QuantError, match="does not directly follow a Conv2d"):
        quant.quantize(model, QuantConfig())
