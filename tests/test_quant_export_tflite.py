"""quant.export_tflite: the .tflite file computes what the integer engine computes, bit for bit, in each LiteRT
kernel set; int8-input and float32 files; bad models are refused with the reason, missing packages with the pip
command."""
import sys

import pytest
import torch
import torch.nn as nn

import quant
from data import DataError, Loader, load_split, synthetic_split
from models import build_model
from quant import QuantConfig, QuantError, TFLiteRunner, calibrate, convert, export_tflite, quantize
from quant.export_tflite import MODES, RUNTIMES, make_runner
from tests.conftest import REPO, needs_litert
from utils.io import load_checkpoint


FMNIST = (1, 28, 28)


@pytest.fixture(scope="module")
def fmnist_data():
    """(calibration batches, test images): real Fashion-MNIST where present, else synthetic images.

    The test images are 500 real ones plus the same images times 4 (activations far outside the
    calibrated ranges, so every clamp is exercised)."""
    try:
        train, test = load_split("fashion_mnist", "train", verbose=False), load_split("fashion_mnist", "test", verbose=False)
    except DataError:
        train, test = synthetic_split("fashion_mnist", 1024, seed=1), synthetic_split("fashion_mnist", 500, seed=2)
    calib = list(Loader(train.images, train.labels, "fashion_mnist", 256, train=True))[:4]
    x = next(iter(Loader(test.images[:500], test.labels[:500], "fashion_mnist", 500)))[0]
    return calib, torch.cat([x, 4 * x])


def shipped_float(model: str) -> nn.Module:
    m = build_model(model, "fashion_mnist")
    m.load_state_dict(load_checkpoint(REPO / f"ckpt/fashion_mnist_{model}.pt", "train it first")["model"])
    return m.eval()


def ptq(float_model: nn.Module, calib, bits: int, clamp: str = "bits") -> quant.IntModel:
    q = quantize(float_model, QuantConfig(weight_bits=bits, act_bits=bits, observer="mse"))
    calibrate(q, calib)
    return convert(q, clamp=clamp)


def op_names(data: bytes) -> list[str]:
    return [op["op_name"] for op in TFLiteRunner(data, "ref").interp._get_ops_details()]


@pytest.mark.slow
@needs_litert
@pytest.mark.parametrize("bits", [8, 6, 4], ids=lambda b: f"w{b}a{b}")
@pytest.mark.parametrize("model", ["cnn", "cnn_bn"])
def test_bit_exact_with_every_runtime(fmnist_data, model, bits):
    calib, x = fmnist_data
    imodel = ptq(shipped_float(model), calib, bits)
    data = export_tflite(imodel, None, FMNIST)
    assert data[4:8] == b"TFL3"
    for mode in RUNTIMES:
        imodel.rounding = mode
        runner = make_runner(data, mode)
        ours, theirs = imodel.forward_int(x), runner(x).to(torch.int32)
        assert torch.equal(ours, theirs), f"{mode}: {int((ours != theirs).sum())} of {ours.numel()} logits differ"
        if mode == "xnnpack" and bits == 8:
            assert runner.delegated()  # XNNPACK ran the whole graph, not the builtin kernels
    # b < 8: the b-bit clamps are explicit ops, and these inputs drive logits onto a b-bit bound
    assert ("MINIMUM" in op_names(data)) == (bits < 8)
    if bits < 8:
        assert bool(((ours == 2 ** (bits - 1) - 1) | (ours == -2 ** (bits - 1))).any())


@pytest.mark.slow
@needs_litert
def test_int8_clamped_model_needs_no_clamp_ops_and_is_fully_delegated(fmnist_data):
    calib, x = fmnist_data
    imodel = ptq(shipped_float("cnn"), calib, 4, clamp="int8")
    data = export_tflite(imodel, None, FMNIST)
    assert not {"MINIMUM", "MAXIMUM"} & set(op_names(data))
    imodel.rounding = "xnnpack"
    runner = TFLiteRunner(data, "xnnpack")
    ours = imodel.forward_int(x)
    assert torch.equal(ours, runner(x).to(torch.int32)) and runner.delegated()
    assert int(ours.abs().max()) > 8  # the logits leave the 4-bit range: LiteRT's fused clamps are int8


@needs_litert
@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"w{b}a{b}")
def test_per_channel_fully_connected_is_bit_exact_with_every_runtime(bits):
    """fc_per_channel: the file's FULLY_CONNECTED weights carry one scale per output row, and each runtime
    computes what the engine computes in its rounding, including 'ref' and 'tflm', whose fully-connected
    roundings differ on these inputs (so the equality tells them apart)."""
    torch.manual_seed(bits)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 300), nn.ReLU(), nn.Linear(300, 200)).eval()
    with torch.no_grad():  # output rows of very different ranges: per-channel scales differ
        model[1].weight.mul_(torch.rand(300, 1) * 3)
        model[3].weight.mul_(torch.rand(200, 1) * 3)
    shape = (1, 16, 16)
    q = quantize(model, QuantConfig(weight_bits=bits, act_bits=bits, fc_per_channel=True))
    calibrate(q, [torch.randn(128, *shape) for _ in range(2)])
    imodel = convert(q)
    data = export_tflite(imodel, None, shape)
    scales = sorted(len(t["quantization_parameters"]["scales"])
                    for t in TFLiteRunner(data, "ref").interp.get_tensor_details() if t["name"].endswith("/weight"))
    assert scales == [200, 300]
    x = 1.5 * torch.randn(1000, *shape)
    outs = {}
    for mode in RUNTIMES:
        imodel.rounding = mode
        outs[mode] = imodel.forward_int(x)
        theirs = make_runner(data, mode)(x).to(torch.int32)
        assert torch.equal(outs[mode], theirs), f"{mode}: {int((outs[mode] != theirs).sum())} logits differ"
    assert not torch.equal(outs["ref"], outs["tflm"])


@pytest.mark.slow
@needs_litert
def test_int8_input_and_resizable_batch(fmnist_data):
    calib, x = fmnist_data
    imodel = ptq(shipped_float("cnn"), calib, 8)
    data = export_tflite(imodel, None, FMNIST, int8_input=True)
    assert "QUANTIZE" not in op_names(data)
    runner = TFLiteRunner(data, "builtin")
    imodel.rounding = "builtin"
    q = imodel.layers[0](x[:9])
    full = runner(q)
    assert torch.equal(full.to(torch.int32), imodel.forward_int(x[:9]))
    assert torch.equal(runner(q[:1]), full[:1]) and torch.equal(runner(q[2:9]), full[2:9])


@pytest.mark.slow
@needs_litert
def test_float_file_matches_pytorch_and_int8_file_is_small(fmnist_data, tmp_path):
    calib, x = fmnist_data
    model = shipped_float("cnn_bn")
    f32 = export_tflite(model, tmp_path / "f.tflite", FMNIST)
    i8 = export_tflite(ptq(model, calib, 8), tmp_path / "i.tflite", FMNIST)
    assert (tmp_path / "f.tflite").read_bytes() == f32 and "QUANTIZE" not in op_names(f32)
    with torch.no_grad():
        ref = model(x[:500])
    for mode in MODES:
        out = TFLiteRunner(f32, mode)(x[:500])
        assert torch.allclose(out, ref, atol=1e-3, rtol=1e-4), mode
    assert len(i8) <= 0.3 * len(f32)


def _tiny_int_model(layers: list[nn.Module], channels: int = 1) -> quant.IntModel:
    q = quantize(nn.Sequential(*layers), QuantConfig(observer="minmax"))
    calibrate(q, [torch.randn(8, channels, 8, 8)])
    return convert(q)


def test_unsupported_layers_are_named():
    im = _tiny_int_model([nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(144, 3)], channels=4)
    with pytest.raises(QuantError, match=r"layers\.1 \(IntConv2d\).*groups=2") as e:
        export_tflite(im, None, (4, 8, 8))
    assert "\n" not in str(e.value)
    with pytest.raises(QuantError, match="Tanh"):
        export_tflite(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh()), None, (1, 8, 8))
    with pytest.raises(QuantError, match="groups=2"):
        export_tflite(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), None, (4, 8, 8))
    with pytest.raises(QuantError, match="GELU"):
        export_tflite(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()), None, (1, 8, 8))


@needs_litert
def test_stand_alone_relu_and_odd_padding_export_exactly():
    """A ReLU after a max pool (not fusable) becomes a clamp at the zero point; padding TFLite's SAME cannot
    express becomes an explicit PAD."""
    im = _tiny_int_model([nn.Conv2d(1, 2, 3, stride=2, padding=2), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3)])
    data = export_tflite(im, None, (1, 8, 8))
    assert {"PAD", "MAXIMUM"} <= set(op_names(data))
    x = torch.randn(64, 1, 8, 8)
    for mode in RUNTIMES:
        im.rounding = mode
        assert torch.equal(make_runner(data, mode)(x).to(torch.int32), im.forward_int(x)), mode


@needs_litert
def test_same_padding_is_exported_exactly():
    im = _tiny_int_model([nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)])
    x = torch.randn(16, 1, 8, 8) * 2
    data = export_tflite(im, None, (1, 8, 8))
    for mode in RUNTIMES:
        im.rounding = mode
        assert torch.equal(im.forward_int(x), make_runner(data, mode)(x).to(torch.int32)), mode


def test_bias_overflow_and_degenerate_scales_are_refused():
    def fresh():
        return _tiny_int_model([nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)])

    im = fresh()
    im.layers[1].bias[0] = 2 ** 31 - 100
    with pytest.raises(QuantError, match="overflow the int32 accumulator"):
        export_tflite(im, None, (1, 8, 8))
    im = fresh()
    im.layers[3].out_scale.fill_(1e-30)
    with pytest.raises(QuantError, match="degenerate scales.*multiplier"):
        export_tflite(im, None, (1, 8, 8))
    for bad in (0.0, float("nan"), float("inf")):
        im = fresh()
        im.layers[1].w_scale[1] = bad
        with pytest.raises(QuantError, match="degenerate weight scale"):
            export_tflite(im, None, (1, 8, 8))
    im = fresh()
    im.layers[0].scale.fill_(0.0)
    with pytest.raises(QuantError, match="degenerate input scale"):
        export_tflite(im, None, (1, 8, 8))


def test_missing_packages_give_install_hints(monkeypatch):
    im = _tiny_int_model([nn.Flatten(), nn.Linear(64, 3)])
    data = export_tflite(im, None, (1, 8, 8))
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(QuantError, match="pip install ai-edge-litert"):
        TFLiteRunner(data)
    monkeypatch.setitem(sys.modules, "tflite", None)
    with pytest.raises(QuantError, match="pip install flatbuffers tflite"):
        export_tflite(im, None, (1, 8, 8))
