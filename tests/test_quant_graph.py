"""quant.graph: models written as classes with ``forward`` are traced, normalised and fused into one graph;
they quantize, convert and export, fake quantization equals the integer engine exactly, and LiteRT equals the
engine in each kernel set; what the graph cannot take is refused in one line naming the node and the line."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant import QuantConfig, QuantError
from quant.export_tflite import RUNTIMES, make_runner
from quant.graph import model_graph
from quant.transforms import calibrate, convert, quantize
from tests.conftest import case, needs_litert
from tests.graph_models import GRAPH_MODELS, build, calibrated


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
        if mode == "xnnpack" and bits == 8:
            ops = [op["op_name"] for op in runner.interp._get_ops_details()]
            if "HARD_SWISH" in ops:  # LiteRT 2.3's XNNPACK takes no int8 HARD_SWISH: one partition around each
                assert ops.count("DELEGATE") == ops.count("HARD_SWISH") + 1
            else:
                assert runner.delegated(), "XNNPACK should run the whole 8-bit graph"


@needs_litert
def test_padding_and_depthwise_lower_to_pad_and_depthwise_conv():
    for name, ops in (("stride2_pad1", {"PAD", "CONV_2D"}), ("depthwise_separable", {"DEPTHWISE_CONV_2D"}),
                      ("resnet", {"ADD", "PAD", "DEPTHWISE_CONV_2D"}), ("two_branch_cat", {"CONCATENATION"})):
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
    assert "\n" not in msg and "test_quant_graph.py:" in msg and "if x.sum() > 0" in msg


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
    assert "\n" not in msg and "'gelu'" in msg and "test_quant_graph.py:" in msg and "function gelu" in msg


@pytest.mark.parametrize("spelling", [nn.Sigmoid(), torch.sigmoid, F.sigmoid, lambda x: x.sigmoid()],
                         ids=["module", "torch", "functional", "method"])
def test_sigmoid_spellings_are_one_kind(spelling):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(1, 2, 3), spelling

        def forward(self, x):
            return self.act(self.conv(x))

    assert [g.kind for g in model_graph(Net())] == ["input", "conv", "sigmoid", "output"]


def test_tanh_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh())
    with pytest.raises(QuantError, match="a layer of type Tanh"):
        quant.quantize(model, QuantConfig())


def test_bn_without_its_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(QuantError, match="does not directly follow a Conv2d"):
        quant.quantize(model, QuantConfig())


class Tanhs(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Tanh()))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 3))

    def forward(self, x):
        return self.body(x)


def test_unsupported_layers_are_named():
    with pytest.raises(QuantError, match=r"layer '1\.0'.*Tanh") as e:
        quantize(Tanhs(), QuantConfig())
    assert "\n" not in str(e.value)
    with pytest.raises(QuantError, match="does not directly follow a Conv2d"):
        quantize(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm2d(2)), QuantConfig())


def test_custom_modules_inside_sequentials_quantize():
    """Containers with their own forward are traced through (graph mode), at any depth."""
    nested = nn.Sequential(nn.Linear(3, 3))
    nested.add_module("b", Custom())
    for model in (Custom(), nested):
        q = quantize(model, QuantConfig())
        x = torch.randn(16, 3)
        calibrate(q, [x])
        assert torch.equal(q.eval()(x), convert(q)(x))
