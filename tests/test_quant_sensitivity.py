"""quant.sensitivity: per-layer sensitivity (each layer alone, the first k together) and the greedy
mixed-precision search."""
import pytest
import torch

import quant
from quant import QuantConfig
from tests.graph_models import model_and_data


@pytest.mark.slow
def test_sensitivity_and_greedy_search():
    model, shape, batches, x = model_and_data("resnet")
    q = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=4, act_bits=8), batches)
    labels = model(x).argmax(1)
    rows = quant.layer_sensitivity(q, batches, labelled=[(x, labels)])
    assert [r["layer"] for r in rows] == [p for p, _ in quant.weighted_layers(q)]
    assert all(r["sqnr_cumulative_db"] <= r["sqnr_alone_db"] + 3 for r in rows[1:])
    was_training = q.training
    for (path, layer), r in zip(quant.weighted_layers(q), rows):  # acc_alone: only that layer's quantizers on
        quant.set_fake_quant(q, False)
        layer.weight_quant.enabled = layer.act_quant.enabled = True
        with torch.no_grad():
            alone = 100 * (q.eval()(x).argmax(1) == labels).float().mean().item()
        assert r["acc_alone"] == round(alone, 2) and r["acc_alone"] >= 90, (path, r["acc_alone"], alone)
    quant.set_fake_quant(q, True)
    q.train(was_training)
    steps = quant.greedy_weight_bits(q, batches, (8, 6, 4))
    sizes = [s["weight_bytes"] for s in steps]
    assert sizes == sorted(sizes, reverse=True) and len(steps) == 1 + 2 * len(rows)
    assert set(steps[0]["bits"].values()) == {8} and set(steps[-1]["bits"].values()) == {4}
    assert steps[0]["sqnr_db"] > steps[-1]["sqnr_db"]
    from quant.sensitivity import layer_settings
    q2 = quant.ptq(model, QuantConfig(observer="minmax", weight_bits=4, act_bits=8,
                                      layers=layer_settings(steps[3]["bits"])), batches)
    assert {p: l.weight_quant.qparams().qmax for p, l in quant.weighted_layers(q2)} == \
        {p: 2 ** (b - 1) - 1 for p, b in steps[3]["bits"].items()}
