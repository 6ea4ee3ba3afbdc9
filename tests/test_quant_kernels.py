"""quant.kernels: single-op files against LiteRT and TFLM, exact in every kernel set: QUANTIZE (ties), ADD (own
scales, with and without ReLU, ties), CONCATENATION, AVERAGE_POOL_2D (ties of the window sum, both signs),
DEPTHWISE_CONV_2D (depth multiplier 1 and 2, the channel tail), LOGISTIC, HARD_SWISH, PAD, CONV_2D, MAX_POOL_2D and
FULLY_CONNECTED; and kernels alone: the input's QUANTIZE rounding, float32 accumulation, the fully connected
multiplier."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant import QuantConfig
from quant.export_tflite import RUNTIMES, make_runner
from quant.errors import QuantError
from quant.kernels import Dequantize, IntAdd, IntAvgPool2d, IntHardSwish, IntLogistic, QuantizeInput
from quant.qparams import quantize as quantize_tensor
from quant.transforms import calibrate, convert, quantize
from tests.conftest import needs_litert, qp


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


@needs_litert
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


@needs_litert
@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
def test_add_with_different_input_scales(relu):
    torch.manual_seed(0)
    model = AddNet(relu)
    with torch.no_grad():
        model.conv.weight.mul_(3)
    im = _from_model(model, (4, 8, 8))
    assert_exact(im, (4, 8, 8), every_int8())


@needs_litert
def test_concatenation():
    im = _from_model(CatNet(), (4, 8, 8))
    assert_exact(im, (4, 8, 8), every_int8())


@needs_litert
@pytest.mark.parametrize("kernel", [(2, 2), (3, 3), None], ids=["k2", "k3", "global"])
def test_average_pool(kernel):
    q_in = qp(0.05, -7)
    stride = kernel
    im = quant.IntModel([QuantizeInput(q_in), IntAvgPool2d(kernel, stride, q_in), Dequantize(q_in)])
    x = every_int8((4, 6, 6))
    c = torch.tensor([1, -1, 3, -3, 5, -5, 7, -7], dtype=torch.int32).reshape(8, 1, 1, 1)
    x[:8] = c - 7  # constant images (zero point -7)
    x[8:16, :, 0, 0] += 1
    x[16:24] = c - 7
    x[16:24, :, ::2, ::2] += 1  # with the next line, every 2x2 window and the whole 6x6 image sums
    x[16:24, :, 1::2, 1::2] += 1  # to n * c + n / 2 over (q - zp): a rounding tie
    assert_exact(im, (4, 6, 6), x.clamp(-128, 127))
    data = quant.export_tflite(im, None, (4, 6, 6))
    assert {op["op_name"] for op in quant.TFLiteRunner(data, "ref").interp._get_ops_details()} == {
        "QUANTIZE", "DEPTHWISE_CONV_2D"}  # int8 logits out
    assert quant.TFLiteRunner(data, "xnnpack").delegated()


@needs_litert
@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv(mult):
    model = nn.Sequential(nn.Conv2d(4, 4 * mult, 3, padding=1, groups=4), nn.ReLU6())
    im = _from_model(model, (4, 8, 8))
    data = quant.export_tflite(im, None, (4, 8, 8))
    assert "DEPTHWISE_CONV_2D" in {op["op_name"] for op in quant.TFLiteRunner(data, "ref").interp._get_ops_details()}
    assert_exact(im, (4, 8, 8), every_int8())


@needs_litert
@pytest.mark.parametrize("scale,zp", [(0.003, 40), (0.05, -7), (0.2, 100)])
def test_logistic_every_input(scale, zp):
    """LOGISTIC on every int8 input (input scales from saturating nowhere to saturating at both ends)."""
    q_in, q_out = qp(scale, zp), qp(1 / 256, -128)
    im = quant.IntModel([QuantizeInput(q_in), IntLogistic(q_in, q_out), Dequantize(q_out)])
    assert_exact(im, (4, 8, 8), every_int8())
    t = im.layers[1].table
    assert bool((t[1:] >= t[:-1]).all()) and int(t[-1]) > int(t[0])  # monotone, not constant


@needs_litert
@pytest.mark.parametrize("scale,zp,out_scale,out_zp", [(0.01, 5, 0.008, -100), (0.05, -7, 0.03, -90),
                                                       (0.3, 60, 0.35, -128), (0.002, -128, 0.0015, -20)])
def test_hardswish_every_input(scale, zp, out_scale, out_zp):
    """HARD_SWISH on every int8 input: TFLite's int16 fixed point (multipliers with a left and a right
    relu-ish shift among the cases)."""
    q_in, q_out = qp(scale, zp), qp(out_scale, out_zp)
    im = quant.IntModel([QuantizeInput(q_in), IntHardSwish(q_in, q_out), Dequantize(q_out)])
    assert_exact(im, (4, 8, 8), every_int8())
    x = scale * (torch.arange(-128, 128) - zp)
    ideal = torch.round(torch.nn.functional.hardswish(x) / out_scale) + out_zp
    assert (im.layers[1].table - ideal.clamp(-128, 127)).abs().max() <= 1  # a fixed-point approximation


@needs_litert
def test_hardswish_output_scale_too_small_is_refused():
    with pytest.raises(QuantError, match="HARD_SWISH refuses"):
        IntHardSwish(qp(0.5, 0), qp(0.001, 0))


@needs_litert
@pytest.mark.parametrize("channels", [12, 20])
def test_depthwise_conv_tail(channels, monkeypatch):
    """LiteRT's optimized depthwise conv rounds channels 8k.. O-1 (the O % 8 tail) as gemmlowp does and
    the blocks of 8 before them as ruy does; one rounding for all channels is off on the tail."""
    torch.manual_seed(1)
    im = _from_model(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels)), (channels, 8, 8))
    x = every_int8((channels, 8, 8))
    assert_exact(im, (channels, 8, 8), x)
    data = quant.export_tflite(im, None, (channels, 8, 8), int8_input=True)
    out = make_runner(data, "builtin")(x).to(torch.int32).permute(0, 3, 1, 2)
    monkeypatch.setattr("quant.kernels.DWCONV_TAIL", {})
    im.rounding = "builtin"
    off = (_engine_from_int(im, x) != out).sum((0, 2, 3))
    assert off[:8].sum() == 0 and off[channels - channels % 8:].sum() > 0


@needs_litert
@pytest.mark.parametrize("stride,padding", [(1, 2), (2, 1), (2, 3)])
def test_pad(stride, padding):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, stride=stride, padding=padding))
    im = _from_model(model, (4, 8, 8))
    data = quant.export_tflite(im, None, (4, 8, 8))
    assert "PAD" in {op["op_name"] for op in quant.TFLiteRunner(data, "ref").interp._get_ops_details()}
    assert_exact(im, (4, 8, 8), every_int8())


@needs_litert
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


@needs_litert
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


def test_integer_input_quantization_is_exact():
    q = quantize(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), QuantConfig(act_bits=8))
    calibrate(q, [torch.randn(10, 1, 2, 2)])
    im = convert(q)
    x = torch.randn(50, 1, 2, 2)
    assert torch.equal(im.layers[0](x), quantize_tensor(x, q.input_quant.qparams()))


def test_xnnpack_input_quantization_rounds_half_to_even():
    q = quantize(nn.Sequential(nn.Flatten(), nn.Linear(2, 2)), QuantConfig())
    calibrate(q, [torch.tensor([[0.0, 255 / 128]])])     # scale exactly 1/128, zero point -128
    im = convert(q, rounding="xnnpack")
    assert im.input_qparams().scale.item() == 1 / 128 and im.input_qparams().zero_point.item() == -128
    x = torch.tensor([[2.5, 5.5]]) / 128                    # exact ties
    assert im.layers[0](x).tolist() == [[2 - 128, 6 - 128]]  # XNNPACK: half to even
    im.rounding = "ref"
    assert im.layers[0](x).tolist() == [[3 - 128, 6 - 128]]  # TFLite QUANTIZE: half away from zero


def test_float32_accumulation_is_exact_when_bounded():
    """The engine uses float32 convs only when every partial sum < 2^24; check exactness at the bound."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-255, 256, (8, 40, 13, 13), generator=g).float()
    w = torch.randint(-127, 128, (40, 40, 3, 3), generator=g).float()
    assert (w.abs().reshape(40, -1).sum(1) * 255).max() < 2 ** 24
    assert torch.equal(nn.functional.conv2d(x, w).double(), nn.functional.conv2d(x.double(), w.double()))


def test_fully_connected_multiplier_is_a_double_product():
    # Scales of the Fashion-MNIST cnn_bn FC layer (8-bit PTQ) whose accumulator -13911 lies 5e-7 from a
    # rounding tie: a float32 product s_in * s_w gives M0 = 1699338613 and output -48, while LiteRT's
    # BUILTIN_REF kernel printed -49 (export.py --verify); the double product gives M0 = 1699338658.
    from quant.kernels import IntLinear
    from quant.qparams import QParams
    s_in, s_w, s_out = 0.026003697887063026, 0.0026513454504311085, 0.04460887983441353
    qp = lambda s, zp, lo: QParams(torch.tensor(s), torch.tensor(zp, dtype=torch.int32), lo, 127, None)  # noqa: E731
    fc = IntLinear({"weight": torch.ones(1, 109, dtype=torch.int8), "bias": torch.zeros(1, dtype=torch.int32),
                    "in_qp": qp(s_in, 0, -128), "w_qp": qp(s_w, 0, -127), "out_qp": qp(s_out, -27, -128), "act": None})
    assert (int(fc.m0.reshape(-1)[0]), int(fc.shift.reshape(-1)[0])) == (1699338658, -9)
    x = torch.full((1, 109), -128, dtype=torch.int32)
    x[0, -1] = -87                                           # sum = -13824 - 87 = -13911
    fc.rounding = "ref"
    assert fc(x).item() == -49                               # LiteRT BUILTIN_REF
    fc.rounding = "builtin"
    assert fc(x).item() == -48                               # LiteRT BUILTIN (ruy), same file
