"""The CIFAR-10 zoo (models/resnet.py, models/mobilenetv2.py): architecture, and the whole pipeline on
random weights and synthetic data: quantize -> calibrate -> convert -> export, the engine equal to LiteRT
(three kernel sets) and TFLM; train.py and QAT.py dry runs."""
import json

import pytest
import torch
import torch.nn as nn

import quant
from models import build_model
from quant import QuantConfig
from quant.export_tflite import RUNTIMES, make_runner
from tests.conftest import case, randomise_bn, run_script

ZOO = ["resnet8", "resnet20", "mobilenetv2"]
#: parameters (the references: MLPerf Tiny's ResNet-8 78k, He et al.'s ResNet-20 0.27M; MobileNetV2 <= 0.7M)
PARAMS = {"resnet8": 77_946, "resnet20": 272_474, "mobilenetv2": 590_410}


@pytest.mark.parametrize("name", ZOO)
def test_architecture(name):
    model = build_model(name, "cifar10").eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if name == "mobilenetv2":
        assert sum(c.groups > 1 and c.groups == c.in_channels for c in convs) == 17  # one depthwise per block
        assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 2 + 16 * 2 + 1
    else:
        assert len(convs) == (1 + 2 * 3 + 2 if name == "resnet8" else 1 + 2 * 9 + 2)  # stem, blocks, projections


@pytest.mark.parametrize("name,bits", [case(name, bits, quick=(name, bits) == ("resnet8", 4),  # quick: one case
                                            id=f"{name}-w{bits}a{bits}") for name in ZOO for bits in (8, 4)])
def test_pipeline_is_bit_exact_on_random_weights(name, bits):
    torch.manual_seed(0)
    model = randomise_bn(build_model(name, "cifar10"), torch.Generator().manual_seed(1)).eval()
    g = torch.Generator().manual_seed(2)
    q = quant.quantize(model, QuantConfig(observer="minmax", weight_bits=bits, act_bits=bits))
    quant.calibrate(q, [torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)])
    x = torch.randn(12, 3, 32, 32, generator=g)
    x = torch.cat([x, 3 * x])
    q.eval()
    im = quant.convert(q)
    assert torch.equal(q(x), im(x)), "fake quantization equals the engine"
    data = quant.export_tflite(im, None, (3, 32, 32))
    for mode in RUNTIMES:
        im.rounding = mode
        assert torch.equal(make_runner(data, mode)(x).to(torch.int32), im.forward_int(x)), mode


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_train_and_qat_dry_runs(name, tmp_path):
    r = run_script("train.py", "--dataset", "cifar10", "--model", name, "--dry-run", "--device", "cpu",
                   "--out", str(tmp_path / "f.pt"), "--json")
    assert r.returncode == 0, r.stderr
    assert f"training cifar10/{name}" in r.stdout and "test_acc" in json.loads(r.stdout.strip().splitlines()[-1])
    assert (tmp_path / "f.pt").exists()
    r = run_script("QAT.py", "--dataset", "cifar10", "--model", name, "--from-scratch", "--dry-run", "--device",
                   "cpu", "--bits", "4", "--calib-batches", "2", "--results-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["model"] == name and row["agreement"] == 100.0
