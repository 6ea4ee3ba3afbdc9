"""quant.output_range: the output quantizer's range keeps the float network's top-1 class on at least as many
calibration images as the calibrated range, changes nothing but that range, and gives an ordinary calibrated
model (fake quant == engine); outputs it cannot choose for are refused."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant import QuantConfig
from quant.errors import QuantError
from quant.methods import fake_quant_off
from quant.output_range import output_quantizer, output_range
from quant.qat import act_quantizers
from tests.conftest import case
from tests.graph_models import model_and_data


def top1_agreement(q, xs) -> float:
    """Share of the images whose quantized (eval-mode, engine arithmetic) arg-max is the float network's."""
    q.eval()
    with torch.no_grad():
        x = torch.cat(xs)
        quantized = q(x).argmax(1)
        with fake_quant_off(q):
            ref = q(x).argmax(1)
    return float((quantized == ref).float().mean())


@pytest.mark.parametrize("name,bits", [case("seed_style", 3, quick=True), case("resnet", 4, quick=False),
                                       case("inverted_residual", 4, quick=False)])
def test_output_range_keeps_more_top1_and_only_moves_the_output_range(name, bits):
    model, _, batches, x = model_and_data(name)
    q = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=bits, act_bits=bits), batches)
    fqs = act_quantizers(q)
    out = output_quantizer(q)
    assert out is fqs[-1]
    old = [fq.qparams() for fq in fqs]
    state = {k: v.clone() for k, v in q.state_dict().items() if k.endswith(("weight", "bias", "running_mean", "running_var"))}
    before = top1_agreement(q, batches)
    report = output_range(q, batches, samples=128)
    after = top1_agreement(q, batches)
    # the search scores the calibrated range too, so it never keeps the float class on fewer images
    assert report["agreement_after"] >= report["agreement_before"]
    assert after >= before - 1e-9, (before, after)
    assert report["agreement_after"] == pytest.approx(100.0 * after, abs=1.0)  # the engine rounds like the search
    new = [fq.qparams() for fq in fqs]
    assert all(torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
               for a, b in zip(old[:-1], new[:-1]))
    assert out.observer.frozen
    lo, hi = report["range_after"]
    assert lo <= 0.0 < hi
    assert new[-1].scale.item() == pytest.approx((hi - lo) / (new[-1].qmax - new[-1].qmin), rel=1e-6)
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in state.items())  # weights, biases, BN untouched
    im = quant.convert(q)
    assert torch.equal(q(x), im(x))


def test_output_range_beats_a_range_that_wastes_levels():
    """Logits whose calibrated range is far wider than their top values (one outlier image): at 3 bits the
    calibrated range puts several classes on one level; the chosen one separates them again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 10)).eval()
    xs = [torch.randn(64, 16) for _ in range(4)]
    xs[0][0] *= 40  # one image with huge logits stretches the min/max range
    q = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=8, act_bits=3,
                                     layers=(("input", {"act_bits": 8}),)), xs)
    before = top1_agreement(q, xs)
    report = output_range(q, xs)
    assert top1_agreement(q, xs) > before + 0.2, (before, report)


@pytest.mark.parametrize("quantizer", ["lsq", "lsq+"])
def test_output_range_sets_the_step_of_an_lsq_output(quantizer):
    """On a QAT model the output's qparams are the LSQ quantizer's own: the chosen range must land there."""
    model, _, batches, x = model_and_data("seed_style")
    q = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=3, act_bits=3), batches)
    q = quant.prepare_qat(q, quant.QATConfig(quantizer=quantizer))
    quant.set_bn_frozen(q, True)
    quant.set_act_observers(q, False)
    out = output_quantizer(q)
    before = top1_agreement(q, batches)
    report = output_range(q, batches, samples=128)
    lo, hi = report["range_after"]
    qp = out.qparams()
    assert qp.scale.item() == pytest.approx((hi - lo) / (qp.qmax - qp.qmin), rel=1e-6)
    assert top1_agreement(q, batches) >= before - 1e-9
    q.eval()
    assert torch.equal(q(x), quant.convert(q)(x))


class _CatOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 5), nn.Linear(8, 5)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class _OutputAlsoRead(nn.Module):
    """The returned tensor also feeds another layer (here one whose result is unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 10), nn.Linear(10, 10)

    def forward(self, x):
        y = self.a(x)
        self.b(y)
        return y


class _SigmoidOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


class _ImageOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.relu(self.conv(x))


@pytest.mark.parametrize("make,shape,match", [(_CatOutput, (8,), "concatenation"),
                                              (_OutputAlsoRead, (8,), "another layer reads"),
                                              (_SigmoidOutput, (8,), "constant qparams"),
                                              (_ImageOutput, (3, 8, 8), "logits")])
def test_output_range_refuses_outputs_it_cannot_choose_for(make, shape, match):
    torch.manual_seed(0)
    xs = [torch.randn(16, *shape) for _ in range(2)]
    q = quant.ptq(make().eval(), QuantConfig(observer="minmax"), xs)
    with pytest.raises(QuantError, match=match):
        output_range(q, xs)
