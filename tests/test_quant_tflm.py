"""quant.tflm: the 'tflm' kernel set against the tflite-micro interpreter (single ops where it differs from
LiteRT's reference kernels), the arena measurement, the C array and the uint8-pixel map."""
import re
import shutil
import subprocess

import pytest
import torch

import quant
from quant import QuantConfig
from data import STATS, Loader, load_split, normalise, synthetic_split
from data.errors import DataError
from models import build_model
from quant.kernels import Dequantize, IntFlatten, IntLinear, QuantizeInput
from quant.qparams import QParams, quantize as quantize_tensor
from quant.tflm import TFLMRunner, captured_stderr, pixel_map, tflm_arena_bytes, write_c_array
from tests.conftest import qp


def fc_model(seed: int = 0) -> quant.IntModel:
    """QUANTIZE -> FULLY_CONNECTED(64 -> 32) with scales whose multipliers need a right shift of several bits."""
    g = torch.Generator().manual_seed(seed)
    q_in, q_out = qp(0.05, 3), qp(0.0446, -7)
    w = torch.randint(-127, 128, (32, 64), generator=g).to(torch.int32)
    p = dict(in_qp=q_in, w_qp=QParams(torch.full((1,), 0.004), torch.zeros(1, dtype=torch.int32), -127, 127),
             out_qp=q_out, weight=w, bias=torch.randint(-3000, 3000, (32,), generator=g), act=None)
    return quant.IntModel([QuantizeInput(q_in), IntFlatten(), IntLinear(p), Dequantize(q_out)])


def test_fully_connected_rounds_like_conv_in_tflm():
    """The one kernel where TFLM departs from LiteRT's reference: fully connected requantizes with
    SRDHM + rounding shift (as conv), not LiteRT-ref's single rounding. Inputs chosen so both occur."""
    im = fc_model()
    x = torch.randn(2000, 64, 1, 1) * 0.5
    tflm = TFLMRunner(quant.export_tflite(im, None, (64, 1, 1)))(x).to(torch.int32)
    im.rounding = "tflm"
    ours = im.forward_int(x)
    im.rounding = "ref"
    ref = im.forward_int(x)
    assert torch.equal(tflm, ours)
    assert not torch.equal(ref, ours), "the inputs must reach outputs where the two roundings differ"


def test_arena_is_the_smallest_that_runs():
    """The bisection's arena runs, one byte less does not, and it covers what TFLM's RecordingMicroAllocator
    reports (which can be less than the arena needs: 1544 against 1624 bytes for this file)."""
    im = fc_model()
    data = quant.export_tflite(im, None, (64, 1, 1))
    arena = tflm_arena_bytes(data)
    runner = TFLMRunner(data, arena=arena)
    with captured_stderr() as err:
        runner.interp.print_allocations()
    total = int(re.search(r"Arena allocation total (\d+) bytes", err[0]).group(1))
    assert arena >= total
    with pytest.raises(quant.QuantError, match="could not allocate"):
        TFLMRunner(data, arena=arena - 1)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on this machine")
def test_c_array_compiles_and_holds_the_file(tmp_path):
    data = quant.export_tflite(fc_model(), None, (64, 1, 1))
    src, hdr = write_c_array(data, tmp_path / "ptq-model.v1")
    assert src.name == "ptq-model.v1.c" and "ptq_model_v1_tflite_len" in hdr.read_text()
    (tmp_path / "main.c").write_text(
        '#include <stdio.h>\n#include <stdint.h>\n#include "ptq-model.v1.h"\n'
        "int main(void) {\n"
        "  if ((uintptr_t)ptq_model_v1_tflite % 16 != 0) return 2;\n"
        "  fwrite(ptq_model_v1_tflite, 1, ptq_model_v1_tflite_len, stdout);\n"
        "  return 0;\n}\n")
    exe = tmp_path / "dump"
    subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", "-o", str(exe), str(src), str(tmp_path / "main.c")],
                   check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True).stdout
    assert out == data


def _pixel_check(dataset: str, images: torch.Tensor, scale: float, zp: int) -> None:
    """The folded affine map equals normalise-then-QUANTIZE on every pixel of ``images``."""
    q_ref = quantize_tensor(normalise(images, dataset), qp(scale, zp))
    a, b = pixel_map(*STATS[dataset], scale, zp)
    a = torch.tensor(a, dtype=torch.float64).view(1, -1, 1, 1)
    b = torch.tensor(b, dtype=torch.float64).view(1, -1, 1, 1)
    y = images.double() * a + b
    q = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5)).clamp(-128, 127).to(torch.int32)
    assert torch.equal(q, q_ref)


@pytest.mark.slow
@pytest.mark.parametrize("observer", ["mse", "minmax"])
@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_uint8_pixel_map_equals_the_float_path(dataset, observer):
    """Every uint8 value of every channel, and every pixel of the real test split where present, with the
    input quantization PTQ.py calibrates (its training batches; the input's range needs no weights)."""
    every_value = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, len(STATS[dataset][0]), 16, 16)
    try:
        train, test = load_split(dataset, "train", verbose=False), load_split(dataset, "test", verbose=False)
    except DataError:
        train, test = synthetic_split(dataset, 2048, seed=1), None
    q = quant.quantize(build_model("cnn", dataset), QuantConfig(observer=observer))
    quant.calibrate(q, Loader(train.images, train.labels, dataset, 256, train=True, augment=""), num_batches=8)
    qin = q.input_quant.qparams()
    for images in [every_value] + ([test.images] if test is not None else []):
        _pixel_check(dataset, images, float(qin.scale), int(qin.zero_point))
