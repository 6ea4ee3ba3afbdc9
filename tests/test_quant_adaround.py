"""quant.adaround: every learned weight is the floor or the ceiling of w / s, the layer's output error is
lower than with rounding to nearest, and a later calibration keeps the learned integers."""
import torch

import quant
from quant import QuantConfig
from quant.adaround import AdaRoundConfig, adaround_layer, rounding_choice
from quant.methods import layer_inputs
from tests.graph_models import model_and_data


def test_adaround_weights_are_floor_or_ceiling_and_lower_the_error():
    model, shape, batches, x = model_and_data("seed_style")
    q = quant.quantize(model, QuantConfig(observer="minmax", weight_bits=3, act_bits=8))
    quant.calibrate(q, batches)
    path, layer = quant.weighted_layers(q)[1]
    w0 = layer.float_weight_bias()[0].detach().clone()
    x_q, x_f = layer_inputs(q, layer, batches), layer_inputs(q, layer, batches, float_net=True)
    rep = adaround_layer(layer, x_q, x_f, AdaRoundConfig(iterations=300))
    assert rep["adaround"] < rep["nearest"]
    p = layer.integer_params()
    step = p["w_qp"].shaped(w0)[0]
    assert rounding_choice(w0, p["weight"].float(), step, p["w_qp"].qmin, p["w_qp"].qmax).all()
    assert layer.weight_quant.fixed
    quant.calibrate(q, batches)  # a later calibration keeps the learned integers
    assert torch.equal(layer.integer_params()["weight"], p["weight"])
