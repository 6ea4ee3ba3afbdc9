"""quant.config: QuantConfig refuses bad settings in one line, round-trips through a dict, and parses
per-layer settings."""
import pytest

import quant
from quant import QuantConfig, QuantError
from tests.graph_models import GRAPH_MODELS


@pytest.mark.parametrize("kwargs,match", [
    ({"weight_bits": 9}, "weight_bits"), ({"act_bits": 1}, "act_bits"), ({"weight_bits": 4.0}, "weight_bits"),
    ({"observer": "percentile9"}, "observer"), ({"ema_momentum": 1.0}, "ema_momentum"),
    ({"calib_batches": 0}, "calib_batches"), ({"rounding": "tflite"}, "rounding"),
    ({"per_channel": "yes"}, "per_channel"), ({"weight_range": "entropy"}, "weight_range"),
    ({"fc_per_channel": 1}, "fc_per_channel"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(QuantError, match=match) as e:
        QuantConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_config_roundtrip():
    cfg = QuantConfig(weight_bits=4, act_bits=6, per_channel=False, observer="ema")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.tag == "w4a6-per_tensor"
    pc = QuantConfig(weight_bits=4, act_bits=4, fc_per_channel=True)
    assert QuantConfig.from_dict(pc.to_dict()) == pc and pc.tag == "w4a4-per_channel-fc_per_channel"
    old = cfg.to_dict()
    del old["fc_per_channel"]  # a checkpoint written before the field: per-tensor fully-connected weights
    assert QuantConfig.from_dict(old).fc_per_channel is False
    with pytest.raises(QuantError, match="unknown"):
        QuantConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_config_errors_are_one_line():
    with pytest.raises(QuantError, match="percentile"):
        QuantConfig(percentile=30)
    with pytest.raises(QuantError, match="per layer you can set"):
        QuantConfig(layers=(("fc", {"rounding": "ref"}),))
    with pytest.raises(QuantError, match="weight_bits"):
        QuantConfig(layers=(("fc", {"weight_bits": 9}),))
    with pytest.raises(QuantError, match="matches no layer"):
        quant.quantize(GRAPH_MODELS["seed_style"][0](), QuantConfig(layers=(("nope*", {"act_bits": 8}),)))
    assert quant.parse_layer_settings("layer1.*:w4a8") == ("layer1.*", {"weight_bits": 4, "act_bits": 8})
    assert QuantConfig(weight_bits=4, act_bits=8).tag == "w4a8-per_channel"
