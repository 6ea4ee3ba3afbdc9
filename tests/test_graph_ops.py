"""Single-op files against LiteRT and TFLM, exact in every kernel set: QUANTIZE (ties), ADD (own scales, with and without ReLU,
ties), CONCATENATION, AVERAGE_POOL_2D (ties of the window sum, both signs), DEPTHWISE_CONV_2D (depth
multiplier 1 and 2) and PAD."""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant.export_tflite import RUNTIMES, make_runner
from quant.kernels import Dequantize, IntAdd, IntAvgPool2d, QuantizeInput
from quant.qparams import QParams

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                                reason="the LiteRT interpreter is not installed: pip install ai-edge-litert")


def qp(scale: float, zp: int) -> QParams:
    return QParams(torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.int32), -128, 127)


def every_int8(shape=(4, 8, 8)) -> torch.Tensor:
    """int8 images holding every value -128..127 (and a random rest)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (64, *shape), generator=g, dtype=torch.int32)
    x.view(-1)[:256] = torch.arange(-128, 128, dtype=torch.int32)
    return x


def assert_exact(im: quant.IntModel, shape, q_in: torch.Tensor) -> None:
    """The int8-input file equals the engine on ``q_in`` in every kernel set (LiteRT's three and TFLM)."""
    data = quant.export_tflite(im, None, shape, int8_input=True)
    for mode in RUNTIMES:
        im.rounding = mode
        ref = im.forward_int(im.layers[0].scale * (q_in - im.layers[0].zero_point).float())
        assert torch.equal(ref, _engine_from_int(im, q_in)), "the input round trip is exact"
        out = make_runner(data, mode)(q_in).to(torch.int32)
        if out.dim() == 4:
            out = out.permute(0, 3, 1, 2)
        assert torch.equal(out, ref), mode


def _engine_from_int(im: quant.IntModel, q_in: torch.Tensor) -> torch.Tensor:
    first = im.layers[0]
    try:
        im.layers[0] = nn.Identity()
        return im.forward_int(q_in)
    finally:
        im.layers[0] = first


@pytest.mark.parametrize("s_out,act", [(0.1, None), (0.4, None), (0.07, (0.0, float("inf"))), (0.4, (0.0, 6.0))],
                         ids=["s0.1", "s0.4-ties", "s0.07-relu", "s0.4-relu6"])
def test_add_of_a_tensor_with_itself(s_out, act):
    """x + x: with s_out = 4 s_in every odd (q - zp) is an exact rounding tie."""
    q_in, q_out = qp(0.1, 3), qp(s_out, -5)
    im = quant.IntModel([QuantizeInput(q_in), IntAdd(q_in, q_in, q_out, act), Dequantize(q_out)],
                        inputs=[[], [0, 0], [1]])
    assert_exact(im, (4, 8, 8), every_int8())


class AddNet(nn.Module):
    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(4, 4, 1), relu

    def forward(self, x):
        y = x + self.conv(x)  # two inputs with different scales (the conv weights are tripled)
        return F.relu(y) if self.relu else y


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, F.relu(self.conv(x))], 1)


def _from_model(model: nn.Module, shape, bits: int = 8) -> quant.IntModel:
    torch.manual_seed(0)
    q = quant.quantize(model, quant.QuantConfig(weight_bits=bits, act_bits=bits))
    quant.calibrate(q, [torch.randn(32, *shape) for _ in range(2)])
    return quant.convert(q)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
def test_add_with_different_input_scales(relu):
    torch.manual_seed(0)
    model = AddNet(relu)
    with torch.no_grad():
        model.conv.weight.mul_(3)
    im = _from_model(model, (4, 8, 8))
    assert_exact(im, (4, 8, 8), every_int8())


def test_concatenation():
    im = _from_model(CatNet(), (4, 8, 8))
    assert_exact(im, (4, 8, 8), every_int8())


@pytest.mark.parametrize("kernel", [(2, 2), (3, 3), None], ids=["k2", "k3", "global"])
def test_average_pool(kernel):
    q_in = qp(0.05, -7)
    stride = kernel
    im = quant.IntModel([QuantizeInput(q_in), IntAvgPool2d(kernel, stride), Dequantize(q_in)])
    x = every_int8((4, 6, 6))
    x[:8] = torch.tensor([1, -1, 3, -3, 5, -5, 7, -7], dtype=torch.int32).reshape(8, 1, 1, 1)  # sums at n/2
    x[8:16, :, 0, 0] += 1
    assert_exact(im, (4, 6, 6), x.clamp(-128, 127))


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv(mult):
    model = nn.Sequential(nn.Conv2d(4, 4 * mult, 3, padding=1, groups=4), nn.ReLU6())
    im = _from_model(model, (4, 8, 8))
    data = quant.export_tflite(im, None, (4, 8, 8))
    assert "DEPTHWISE_CONV_2D" in {op["op_name"] for op in quant.TFLiteRunner(data, "ref").interp._get_ops_details()}
    assert_exact(im, (4, 8, 8), every_int8())


@pytest.mark.parametrize("stride,padding", [(1, 2), (2, 1), (2, 3)])
def test_pad(stride, padding):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, stride=stride, padding=padding))
    im = _from_model(model, (4, 8, 8))
    data = quant.export_tflite(im, None, (4, 8, 8))
    assert "PAD" in {op["op_name"] for op in quant.TFLiteRunner(data, "ref").interp._get_ops_details()}
    assert_exact(im, (4, 8, 8), every_int8())


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (3, 2, 2)], ids=["1x1x1", "3x5x7", "3x2x2"])
def test_quantize_ties_in_every_runtime(shape):
    """Float input that is an exact rounding tie everywhere: QUANTIZE alone. LiteRT's optimized kernel
    rounds its 8-wide vector loop half to even and the numel % 8 tail half away from zero; XNNPACK half to
    even; the reference kernel and TFLM half away. Batches of 1, 3 and 85 give every tail length."""
    q = qp(1 / 128, -128)
    im = quant.IntModel([QuantizeInput(q), Dequantize(q)])
    data = quant.export_tflite(im, None, shape)
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 85):
        x = (torch.randint(-128, 127, (n, *shape), generator=g).float() + 0.5) / 128 + 1.0  # q - zp = k + 0.5
        for mode in RUNTIMES:
            im.rounding = mode
            out = make_runner(data, mode)(x).to(torch.int32)
            assert torch.equal(out.permute(0, 3, 1, 2), im.forward_int(x)), (mode, n)
    im.rounding = "builtin"
    x = torch.full((10, 1, 1, 1), 1.94140625)  # q - zp = 248.5: 248 in the vector loop, 249 in the tail
    assert im.forward_int(x).flatten().tolist() == [120] * 8 + [121] * 2


@pytest.mark.parametrize("op", ["conv", "conv-relu6", "maxpool", "fc"])
def test_conv_maxpool_and_fully_connected_alone(op):
    """The remaining ops one by one (the fully connected layer is where TFLM departs from LiteRT-ref)."""
    shape = (4, 8, 8)
    model = {"conv": nn.Sequential(nn.Conv2d(4, 6, 3)),
             "conv-relu6": nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU6()),
             "maxpool": nn.Sequential(nn.MaxPool2d(2)),
             "fc": nn.Sequential(nn.Flatten(), nn.Linear(256, 16))}[op]
    im = _from_model(model, shape)
    kinds = {"conv": "CONV_2D", "conv-relu6": "CONV_2D", "maxpool": "MAX_POOL_2D", "fc": "FULLY_CONNECTED"}
    data = quant.export_tflite(im, None, shape)
    assert kinds[op] in {o["op_name"] for o in quant.TFLiteRunner(data, "ref").interp._get_ops_details()}
    assert_exact(im, shape, every_int8(shape))
