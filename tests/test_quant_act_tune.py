"""quant.act_tune: learned activation steps lower the quantized network's divergence from the float one on
the calibration data, keep every zero point, leave weights alone, and give an ordinary calibrated model."""
import pytest
import torch

import quant
from quant import QuantConfig
from quant.act_tune import ActTuneConfig, act_tune
from quant.errors import QuantError
from quant.methods import fake_quant_off
from quant.qat import act_quantizers
from tests.conftest import case
from tests.graph_models import model_and_data


def kl_to_float(q, xs) -> float:
    """Mean KL(softmax(float) || softmax(quantized)) over the batches, eval mode (the engine's arithmetic)."""
    q.eval()
    with torch.no_grad():
        x = torch.cat(xs)
        quantized = torch.log_softmax(q(x), 1)
        with fake_quant_off(q):
            ref = torch.log_softmax(q(x), 1)
    return float((ref.exp() * (ref - quantized)).sum(1).mean())


@pytest.mark.parametrize("name", [case("seed_style", quick=True), case("resnet", quick=False)])
def test_act_tune_lowers_the_divergence_and_keeps_zero_points(name):
    model, _, batches, x = model_and_data(name)
    q = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=4, act_bits=4), batches)
    before = kl_to_float(q, batches)
    fqs = act_quantizers(q)
    old = [fq.qparams() for fq in fqs]
    weights = {k: v.clone() for k, v in q.state_dict().items() if k.endswith("weight") or k.endswith("bias")}
    report = act_tune(q, batches, ActTuneConfig(iterations=100, samples=128))
    after = kl_to_float(q, batches)
    assert after < 0.9 * before, (before, after)
    new = [fq.qparams() for fq in fqs]
    assert all(torch.equal(a.zero_point, b.zero_point) for a, b in zip(old, new))
    assert any(not torch.equal(a.scale, b.scale) for a, b in zip(old, new))
    assert all(fq.observer.frozen for fq in fqs)
    assert len(report) == len(fqs)
    for (_, learned), qp in zip(report.values(), new):
        assert learned == float(qp.scale)
    state = q.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in weights.items())  # weights, biases, BN untouched
    im = quant.convert(q)
    assert torch.equal(q(x), im(x))


def test_act_tune_rejects_bad_settings():
    with pytest.raises(QuantError, match="iterations"):
        ActTuneConfig(iterations=0)
    model, _, batches, _ = model_and_data("seed_style")
    q = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=4, act_bits=4), batches)
    with pytest.raises(QuantError, match="no calibration batches"):
        act_tune(q, [])
