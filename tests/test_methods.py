"""PTQ methods (quant.observers calibrators, quant.methods, quant.adaround, quant.ptq, per-layer settings):
each does what it claims on synthetic data and keeps fake quant == integer engine == LiteRT."""
import importlib.util

import pytest
import torch
import torch.nn as nn

import quant
from quant import QuantConfig, QuantError
from quant.adaround import AdaRoundConfig, adaround_layer, rounding_choice
from quant.export_tflite import RUNTIMES, make_runner
from quant.methods import layer_inputs
from quant.observers import OBSERVERS, WEIGHT_RANGES, build_observer
from quant.qparams import fake_quantize
from tests.conftest import case, randomise_bn
from tests.graph_models import GRAPH_MODELS

needs_litert = pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                                  reason="the LiteRT interpreter is not installed: pip install ai-edge-litert")


def observed(name: str, x: torch.Tensor, bits: int = 8, **kw) -> tuple[float, float]:
    obs = build_observer(name, bits, **kw)
    for chunk in x.split(len(x) // 4):
        obs(chunk)
    qp = obs.calculate_qparams()
    lo = float((qp.qmin - qp.zero_point) * qp.scale)
    return lo, float((qp.qmax - qp.zero_point) * qp.scale)


def test_percentile_100_is_minmax_on_uniform():
    x = torch.rand(40_000, generator=torch.Generator().manual_seed(0)) * 6 - 1
    assert observed("percentile", x, percentile=100.0) == pytest.approx(observed("minmax", x), rel=1e-6)


@pytest.mark.parametrize("name", ["percentile", "mse", "entropy"])
def test_one_outlier_is_clipped_except_by_minmax(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, generator=g).relu()
    x[123] = 100.0
    assert observed("minmax", x)[1] == pytest.approx(100.0, rel=0.01)
    assert observed(name, x, bits=4)[1] < 30.0  # mse searches down to 20% of the range


def test_histogram_observers_widen_their_range_across_batches():
    """Batches with growing ranges: the histogram is rebinned, its total count kept."""
    obs = build_observer("percentile", 8)
    for k in range(1, 5):
        obs(torch.linspace(0, k, 1000))
    assert obs.hist.sum() == 4000 and float(obs.max_val) == 4.0
    ent = build_observer("entropy", 8)
    ent(torch.linspace(0, 1, 1000))
    assert ent.hist.sum() == 999  # the exact zero is left out (see EntropyObserver.skip_zeros)
    assert 0 < observed("entropy", torch.linspace(0, 4, 4000))[1] <= 4.0 + 1e-6


def test_mse_never_worse_than_minmax_on_its_error():
    g = torch.Generator().manual_seed(1)
    for bits in (2, 4, 8):
        x = torch.randn(20_000, generator=g) ** 3
        errs = {}
        for name in ("minmax", "mse"):
            obs = build_observer(name, bits)
            obs(x)
            errs[name] = (fake_quantize(x, obs.calculate_qparams()) - x).pow(2).mean()
        assert errs["mse"] <= errs["minmax"] * (1 + 1e-6)


def test_weight_percentile_range_clips_per_channel():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    w[1, 0, 0, 0] = 50.0
    pct = WEIGHT_RANGES["percentile"](4, symmetric=True, narrow=True, axis=0, percentile=90.0)
    pct(w)
    mm = WEIGHT_RANGES["minmax"](4, symmetric=True, narrow=True, axis=0)
    mm(w)
    assert float(mm.max_val[1]) == 50.0 and float(pct.max_val[1]) < 5.0
    assert (pct.max_val <= w.abs().reshape(4, -1).amax(1)).all()


def test_every_calibrator_is_registered():
    assert {"minmax", "ema", "mse", "percentile", "entropy"} <= set(OBSERVERS)
    assert {"minmax", "mse", "percentile"} <= set(WEIGHT_RANGES)


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


# --- models and data -------------------------------------------------------------------------------------

class DepthwiseReLU(nn.Module):
    """conv -> dw -> pw with BN and ReLU (CLE's case: ReLU6 would end every pair)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.pw(self.dw(self.conv(x))).flatten(1))


MODELS = {**GRAPH_MODELS, "depthwise_relu": (DepthwiseReLU, (3, 16, 16))}


def model_and_data(name: str, seed: int = 0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = randomise_bn(make(), torch.Generator().manual_seed(seed + 1)).eval()
    g = torch.Generator().manual_seed(seed + 2)
    batches = [torch.randn(32, *shape, generator=g) for _ in range(4)]
    return model, shape, batches, torch.randn(64, *shape, generator=g)


def zero_a_channel(model: nn.Module) -> None:
    """Make the first conv's output channel 0 constant (all-zero weights and bias)."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight[0].zero_()
        if conv.bias is not None:
            conv.bias[0] = 0.0


@pytest.mark.parametrize("name", ["seed_style", "depthwise_relu", "inverted_residual", "resnet"])
def test_cle_keeps_the_float_function_and_equalises_ranges(name):
    model, shape, batches, x = model_and_data(name)
    q = quant.quantize(model, QuantConfig())
    pairs = quant.equalize(q)
    expected = {"seed_style": 2, "depthwise_relu": 3, "inverted_residual": 0}  # ReLU6 ends a pair
    if name in expected:
        assert len(pairs) == expected[name], pairs
    quant.set_fake_quant(q, False)
    q.eval()
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), rtol=1e-4, atol=1e-4)
    for a, b in pairs:  # A's output channel c and B's input channel c now have the same range
        la, lb = q.get_submodule(a), q.get_submodule(b)
        r_a = la.float_weight_bias()[0].detach().reshape(la.weight.shape[0], -1).abs().amax(1)
        from quant.methods import _in_channel_view
        r_b = _in_channel_view(lb, la.weight.shape[0]).abs().amax(1)
        assert torch.allclose(r_a, r_b, rtol=1e-2)


def test_cle_helps_per_tensor_depthwise():
    """The case CLE is for: per-tensor weights and a depthwise conv whose channels differ a lot."""
    model, shape, batches, x = model_and_data("depthwise_relu")
    dw = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    with torch.no_grad():
        dw.weight.mul_(torch.logspace(-2, 1, dw.weight.shape[0]).reshape(-1, 1, 1, 1))
    errs = {}
    for methods in ((), ("cle",)):
        q = quant.ptq(model, QuantConfig(weight_bits=8, act_bits=8, per_channel=False), batches, methods)
        q.eval()
        with torch.no_grad():
            errs[methods] = (q(x) - model(x)).pow(2).mean()
    assert errs[("cle",)] < errs[()]


class HighBias(nn.Module):
    """conv -> BN (beta far above 3 |gamma|) -> ReLU -> B, B a conv, a depthwise conv or a linear after flatten
    (no zero padding: absorption is exact where B reads only real inputs)."""

    def __init__(self, b: str) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.b = {"conv": nn.Conv2d(4, 5, 3), "depthwise": nn.Conv2d(4, 4, 3, groups=4),
                  "linear": nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5))}[b]
        with torch.no_grad():
            self.a[0].weight.mul_(0.01)               # A's output: beta + a little, always above beta - 3 |gamma|
            self.a[1].weight.copy_(torch.tensor([1.0, -0.5, 2.0, 1.0]))
            self.a[1].bias.copy_(torch.tensor([10.0, 4.0, 1.0, 0.0]))   # c = 7, 2.5, 0, 0

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("b", ["conv", "depthwise", "linear"])
def test_high_bias_absorption_moves_bias_past_the_relu_exactly(b):
    torch.manual_seed(0)
    model = HighBias(b).eval()
    x = torch.randn(8, 3, 8, 8)
    q = quant.quantize(model, QuantConfig())
    absorbed = quant.absorb_high_biases(q)
    assert list(absorbed) == ["a.0->b" if b != "linear" else "a.0->b.1"]
    assert absorbed[next(iter(absorbed))] == pytest.approx((7 + 2.5) / 4)
    assert torch.allclose(q.get_submodule("a.0").bn.bias, torch.tensor([3.0, 1.5, 1.0, 0.0]))
    quant.set_fake_quant(q, False)
    q.eval()
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), rtol=1e-5, atol=1e-4)
        assert q.get_submodule("a.0")(x).amax() < model.a(x).amax() - 6  # A's range shrank by about c


def test_bias_correction_lowers_mean_output_error():
    model, shape, batches, x = model_and_data("features_classifier")
    cfg = QuantConfig(weight_bits=3, act_bits=8, per_channel=False)
    shift = {}
    for methods in ((), ("bias_correction",)):
        q = quant.ptq(model, cfg, batches, methods)
        path, layer = quant.weighted_layers(q)[-1]
        xf = layer_inputs(q, layer, batches, float_net=True)
        with torch.no_grad():
            quant.set_fake_quant(q, False)
            ref = model(torch.cat(batches))
            quant.set_fake_quant(q, True)
            out = q(torch.cat(batches))
        shift[methods] = (out - ref).mean(0).abs().mean()
        assert len(xf) == 128
    assert shift[("bias_correction",)] < 0.5 * shift[()]


def test_adaround_weights_are_floor_or_ceiling_and_lower_the_error():
    model, shape, batches, x = model_and_data("seed_style")
    q = quant.quantize(model, QuantConfig(weight_bits=3, act_bits=8))
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


METHOD_SETS = [(), ("cle",), ("adaround",), ("bias_correction",), ("cle", "adaround", "bias_correction")]


@needs_litert
@pytest.mark.parametrize("name,methods,per_channel", [
    case(name, methods, per_channel, quick=name == "seed_style" and (per_channel or methods == ("cle",)),  # quick: 6
         id=f"{name}-{'+'.join(methods) or 'none'}-{'per_channel' if per_channel else 'per_tensor'}")
    for name in ("seed_style", "resnet") for methods in METHOD_SETS for per_channel in (True, False)])
def test_every_method_stays_exact_with_a_zero_channel(name, methods, per_channel):
    """fake quant == engine == LiteRT (3 kernel sets + TFLM) after the method, with a constant channel."""
    model, shape, batches, x = model_and_data(name)
    zero_a_channel(model)
    q = quant.ptq(model, QuantConfig(weight_bits=4, act_bits=4, per_channel=per_channel), batches, methods,
                  AdaRoundConfig(iterations=20, samples=64))
    q.eval()
    im = quant.convert(q)
    assert torch.equal(q(x), im(x))
    data = quant.export_tflite(im, None, shape)
    for mode in RUNTIMES:
        im.rounding = mode
        assert torch.equal(make_runner(data, mode)(x).to(torch.int32), im.forward_int(x)), mode


@needs_litert
@pytest.mark.parametrize("name", ["seed_style", "resnet", "two_branch_cat"])
def test_per_layer_bits_reach_engine_and_file(name):
    """First and last layers at 8 bits, the rest at 3: each tensor has its own range in the engine, and
    LiteRT equals the engine."""
    model, shape, batches, x = model_and_data(name)
    layers = quant.first_last(model, 8)
    q = quant.ptq(model, QuantConfig(weight_bits=3, act_bits=3, layers=layers), batches)
    q.eval()
    weighted = quant.weighted_layers(q)
    first, last = weighted[0][1], weighted[-1][1]
    assert first.weight_quant.qparams().qmax == 127 and last.weight_quant.qparams().qmax == 127
    assert last.act_quant.qparams().qmax == 127 and first.act_quant.qparams().qmax == 3
    assert weighted[1][1].weight_quant.qparams().qmax == 3
    im = quant.convert(q)
    assert torch.equal(q(x), im(x))
    levels = {int(im.forward_int(x).max()) > 3}
    assert levels == {True}  # the logits use the 8-bit range
    data = quant.export_tflite(im, None, shape)
    for mode in RUNTIMES:
        im.rounding = mode
        assert torch.equal(make_runner(data, mode)(x).to(torch.int32), im.forward_int(x)), mode


def test_per_layer_observer_and_type_pattern():
    model, shape, batches, x = model_and_data("seed_style")
    q = quant.quantize(model, QuantConfig(layers=(("Linear", {"observer": "entropy", "act_bits": 6}),)))
    fqs = [layer.act_quant for _, layer in quant.weighted_layers(q)]
    assert type(fqs[-1].observer).__name__ == "EntropyObserver" and fqs[-1].observer.bits == 6
    assert type(fqs[0].observer).__name__ == "MinMaxObserver" and fqs[0].observer.bits == 8


@pytest.mark.slow
def test_sensitivity_and_greedy_search():
    model, shape, batches, x = model_and_data("resnet")
    q = quant.ptq(model, QuantConfig(weight_bits=4, act_bits=8), batches)
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
    q2 = quant.ptq(model, QuantConfig(weight_bits=4, act_bits=8, layers=layer_settings(steps[3]["bits"])), batches)
    assert {p: l.weight_quant.qparams().qmax for p, l in quant.weighted_layers(q2)} == \
        {p: 2 ** (b - 1) - 1 for p, b in steps[3]["bits"].items()}


def test_lsq_plus_learns_an_integer_zero_point_and_stays_exact():
    """LSQ+: the offset gets gradient only from clipped values; after training steps the zero point is
    an integer in range and fake quant equals the integer engine."""
    from quant.modules import LSQQuantize
    from quant.qparams import QParams
    qp = QParams(torch.tensor(0.1), torch.tensor(-20, dtype=torch.int32), -128, 127, None)
    fq = LSQQuantize(build_observer("minmax", 8), qp, learn_offset=True)
    inside = torch.linspace(-1.0, 1.0, 50)
    fq(inside).sum().backward()
    assert fq.offset.grad == 0
    fq.offset.grad = None
    fq(torch.tensor([100.0, -100.0, 0.0])).sum().backward()
    assert fq.offset.grad != 0
    model, shape, batches, x = model_and_data("resnet")
    q = quant.quantize(model, QuantConfig(weight_bits=4, act_bits=4))
    quant.calibrate(q, batches)
    quant.prepare_qat(q, quant.QATConfig(quantizer="lsq+", freeze_bn=0.0))
    offsets = [m.offset for m in q.modules() if isinstance(m, LSQQuantize) and m.offset is not None]
    assert offsets and all(m.offset is None for m in q.modules() if isinstance(m, LSQQuantize) and m.dynamic)
    start = [float(o.detach()) for o in offsets]
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    q.train()
    quant.set_bn_frozen(q, True)
    for b in batches:
        opt.zero_grad()
        q(b).pow(2).mean().backward()
        opt.step()
        quant.clamp_lsq_(q)
    assert any(float(o.detach()) != s for o, s in zip(offsets, start))
    q.eval()
    im = quant.convert(q)
    assert torch.equal(q(x), im(x))
