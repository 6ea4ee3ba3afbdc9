"""quant.qat: a calibrated fake-quant model prepared for training (ste, lsq): the float shadow weights train,
the BN and range freezes, BN momentum, the folded-weight gradient scale, quantizing after a max pool; after the
freezes eval mode equals the integer engine, on graph models too."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant.modules import LSQQuantize
from quant.qparams import fake_quantize
from tests.graph_models import build, calibrated


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 10))


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 10, 10, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _qat_model(bits=4, quantizer="ste", observer="minmax"):
    cfg = quant.QuantConfig(weight_bits=bits, act_bits=bits, observer=observer)
    qmodel = quant.quantize(_net(), cfg)
    quant.calibrate(qmodel, _batches())
    return quant.prepare_qat(qmodel, quant.QATConfig(quantizer=quantizer)).train()


def _step(qmodel, x, y, lr=0.05):
    opt = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=0.9)
    loss = F.cross_entropy(qmodel(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    quant.clamp_lsq_(qmodel)
    return loss


@pytest.mark.parametrize("quantizer", ["ste", "lsq"])
def test_step_updates_float_shadow_weights_off_grid(quantizer):
    qmodel = _qat_model(quantizer=quantizer)
    conv, fc = qmodel.get_submodule("0"), qmodel.get_submodule("7")
    before = {k: v.detach().clone() for k, v in qmodel.named_parameters()}
    x, y = _batches(1, seed=3)[0]
    _step(qmodel, x, y)
    for name in ("0.weight", "4.weight", "7.weight", "0.bn.weight"):
        assert not torch.equal(before[name], dict(qmodel.named_parameters())[name]), name
    # the float weights are not snapped to the grid: quantizing them changes them
    w = fc.weight.detach()
    assert not torch.equal(fake_quantize(w, fc.weight_quant.qparams()), w)
    wf = conv.float_weight_bias()[0].detach()
    assert not torch.equal(fake_quantize(wf, conv.weight_quant.qparams()), wf)


def test_frozen_observers_do_not_move():
    qmodel = _qat_model(quantizer="ste")
    quant.set_act_observers(qmodel, False)
    ranges = [(fq.observer.min_val.clone(), fq.observer.max_val.clone()) for fq in quant.qat.act_quantizers(qmodel)]
    for x, y in _batches(3, seed=5):
        _step(qmodel, x * 3, y)  # wider inputs would widen any recording range
    for fq, (lo, hi) in zip(quant.qat.act_quantizers(qmodel), ranges):
        assert torch.equal(fq.observer.min_val, lo) and torch.equal(fq.observer.max_val, hi)
    quant.set_act_observers(qmodel, True)
    _step(qmodel, _batches(1, seed=6)[0][0] * 3, _batches(1, seed=6)[0][1])
    assert not torch.equal(qmodel.input_quant.observer.max_val, ranges[0][1])  # recording again: moves


def test_bn_freeze_stops_running_statistics():
    qmodel = _qat_model(quantizer="ste")
    bn = qmodel.get_submodule("0").bn
    x, y = _batches(1, seed=7)[0]
    before = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    _step(qmodel, x, y)
    assert not torch.equal(bn.running_mean, before[0])  # unfrozen: statistics move
    quant.set_bn_frozen(qmodel, True)
    frozen = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    _step(qmodel, x, y)
    assert all(torch.equal(a, b) for a, b in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), frozen))
    # frozen + train mode folds with the running statistics: the same forward as eval mode's fold
    quant.set_act_observers(qmodel, False)
    quant.set_requant(qmodel, "float")
    with torch.no_grad():
        torch.testing.assert_close(qmodel.train()(x), qmodel.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("quantizer,bits", [("ste", 8), ("ste", 4), ("lsq", 4), ("lsq", 2)])
def test_after_freeze_eval_equals_integer_engine(quantizer, bits):
    qmodel = _qat_model(bits=bits, quantizer=quantizer)
    for i, (x, y) in enumerate(_batches(4, seed=8)):
        if i == 2:
            quant.set_bn_frozen(qmodel, True)
            quant.set_act_observers(qmodel, False)
        _step(qmodel, x, y, lr=0.01)
    qmodel.eval()
    imodel = quant.convert(qmodel)
    x = _batches(1, seed=9)[0][0]
    with torch.no_grad():
        fq, ref = qmodel(x), imodel(x)
    assert torch.equal(fq, ref)  # eval mode simulates the engine's requantization exactly


@pytest.mark.parametrize("quantizer", ["ste", "lsq"])
def test_first_and_last_layers_at_8_bits_train_and_reach_the_engine(quantizer):
    """QuantConfig.layers under QAT: with the first and last layers at 8 bits and the rest at 4, the
    trained weights keep each layer's own grid and eval mode still equals the integer engine."""
    net = _net()
    cfg = quant.QuantConfig(weight_bits=4, act_bits=4, observer="minmax", layers=quant.first_last(net, 8))
    qmodel = quant.quantize(net, cfg)
    quant.calibrate(qmodel, _batches())
    qmodel = quant.prepare_qat(qmodel, quant.QATConfig(quantizer=quantizer)).train()
    for i, (x, y) in enumerate(_batches(4, seed=8)):
        if i == 2:
            quant.set_bn_frozen(qmodel, True)
            quant.set_act_observers(qmodel, False)
        _step(qmodel, x, y, lr=0.01)
    imodel = quant.convert(qmodel.eval())
    x = _batches(1, seed=9)[0][0]
    with torch.no_grad():
        assert torch.equal(qmodel(x), imodel(x))
    weights = [b for name, b in imodel.named_buffers() if name.endswith(".weight")]
    assert [int(w.abs().max()) > 7 for w in weights] == [True, False, True]  # conv 8, conv 4, fc 8 bits
    logits = imodel.forward_int(x)
    assert int(logits.max()) - int(logits.min()) > 15  # the logits are 8-bit, not 16 levels


@pytest.mark.parametrize("quantizer", ["ste", "lsq"])
def test_quantizing_after_the_pool_in_training_gives_the_same_values(quantizer):
    """Conv(+BN)+ReLU directly before MaxPool2d: in training mode the output quantizer runs after the
    pooling (a quarter of the values); fake quantization is monotone, so the forward is unchanged."""
    qmodel = _qat_model(bits=4, quantizer=quantizer)
    assert qmodel.get_submodule("0").quantize_after_pool and qmodel.get_submodule("3").quantizes_input_after
    assert not qmodel.get_submodule("4").quantize_after_pool  # its output goes to Flatten
    quant.set_act_observers(qmodel, False)
    quant.set_bn_frozen(qmodel, True)
    x = _batches(1, seed=7)[0][0]
    deferred = qmodel(x)
    qmodel.get_submodule("0").quantize_after_pool = qmodel.get_submodule("3").quantizes_input_after = False
    assert torch.equal(qmodel(x), deferred)


def test_ema_ranges_after_the_pool_equal_those_before_it():
    """ste in training mode: the EMA observer of a layer before a max pool sees the pooled values. Their
    maximum is the same and every range holds 0, so the ranges (qparams) equal those of the unpooled
    tensor after several steps."""
    import copy
    deferred = _qat_model(bits=4, quantizer="ste")
    plain = copy.deepcopy(deferred)
    plain.get_submodule("0").quantize_after_pool = plain.get_submodule("3").quantizes_input_after = False
    for x, _ in _batches(3, seed=11):
        with torch.no_grad():
            torch.testing.assert_close(deferred(x), plain(x), rtol=0, atol=0)
    a, b = deferred.get_submodule("0").act_quant.qparams(), plain.get_submodule("0").act_quant.qparams()
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert not deferred.get_submodule("0").act_quant.observer.frozen


def test_lsq_weight_scales_per_channel_and_integer_model_uses_them():
    qmodel = _qat_model(bits=4, quantizer="lsq")
    conv = qmodel.get_submodule("0")
    assert isinstance(conv.weight_quant, LSQQuantize) and conv.weight_quant.scale.shape == (6,)
    assert isinstance(qmodel.input_quant, LSQQuantize) and qmodel.get_submodule("4").input_fq is conv.act_quant
    init = conv.weight_quant.scale.detach().clone()
    for x, y in _batches(2, seed=10):
        _step(qmodel, x, y, lr=0.05)
    assert not torch.equal(conv.weight_quant.scale.detach(), init) and (conv.weight_quant.scale > 0).all()
    quant.set_bn_frozen(qmodel, True)
    imodel = quant.convert(qmodel.eval())
    int_conv = next(m for m in imodel.modules() if hasattr(m, "w_scale"))
    assert torch.equal(int_conv.w_scale.float(), conv.weight_quant.qparams().scale)


def test_qat_config_errors_are_one_line():
    with pytest.raises(quant.QuantError, match="unknown QAT quantizer 'pact'"):
        quant.QATConfig(quantizer="pact")
    with pytest.raises(quant.QuantError, match="freeze_bn must be"):
        quant.QATConfig(freeze_bn=-1)
    with pytest.raises(quant.QuantError, match="calibrate"):
        quant.prepare_qat(quant.quantize(_net(), quant.QuantConfig()), quant.QATConfig())


def test_bn_momentum_sets_the_running_statistics_update():
    qmodel = _qat_model(quantizer="lsq")
    bn = qmodel.get_submodule("0").bn
    quant.set_bn_momentum(qmodel, 0.01)
    x, _ = _batches(1, seed=3)[0]
    before, seen = bn.running_mean.clone(), []
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].mean((0, 2, 3))))
    with torch.no_grad():
        qmodel.train()(x)
    hook.remove()
    torch.testing.assert_close(bn.running_mean, 0.99 * before + 0.01 * seen[0])
    with pytest.raises(quant.QuantError, match="BN momentum must be in"):
        quant.set_bn_momentum(qmodel, 0.0)


@pytest.mark.parametrize("frozen", [False, True])
def test_fold_grad_scale_scales_only_the_folded_conv_weight_gradient(frozen):
    """--fold-grad-scale: the forward is unchanged, the fused conv weight's gradient is multiplied by
    (sigma_run / gamma)^2 per output channel, every other gradient is unchanged."""
    qmodel = _qat_model(quantizer="lsq")
    layer = qmodel.get_submodule("0")
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 3.0)
        layer.bn.running_var.uniform_(0.1, 2.0)
    quant.set_bn_frozen(qmodel, frozen)
    x, y = _batches(1, seed=5)[0]
    state = {k: v.clone() for k, v in layer.bn.state_dict().items()}
    outs, grads = [], []
    for on in (False, True):
        layer.bn.load_state_dict(state)  # the unfrozen forward moves the running statistics
        quant.set_fold_grad_scale(qmodel, on)
        qmodel.zero_grad()
        out = qmodel(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in qmodel.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    bn = layer.bn
    ratio = ((state["running_var"] + bn.eps) / bn.weight.detach().square()).reshape(-1, 1, 1, 1)
    name = "0.weight"
    assert not torch.allclose(ratio, torch.ones_like(ratio))
    torch.testing.assert_close(grads[1][name], grads[0][name] * ratio)
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0] if n != name)


@pytest.mark.parametrize("name,rounding", [("resnet", "ref"), ("resnet", "xnnpack"), ("hardswish_sigmoid", "ref")])
def test_qat_on_graph_models_trains_and_converts(name, rounding):
    model, shape = build(name)
    q, x = calibrated(model, shape, 4, rounding)
    for quantizer in ("ste", "lsq"):
        qq = quant.prepare_qat(copy.deepcopy(q), quant.QATConfig(quantizer=quantizer))
        qq.train()
        opt = torch.optim.SGD(qq.parameters(), lr=0.01)
        y = torch.randint(0, 10, (len(x),))
        before = [p.detach().clone() for p in qq.parameters()]
        for _ in range(2):
            loss = F.cross_entropy(qq(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            quant.clamp_lsq_(qq)
        assert any(not torch.equal(a, b) for a, b in zip(before, qq.parameters()))
        quant.set_bn_frozen(qq, True)
        quant.set_act_observers(qq, False)
        qq.eval()
        assert torch.equal(qq(x), quant.convert(qq)(x))
        for m in qq.modules():
            if isinstance(m, quant.modules.QSigmoid):  # LOGISTIC's output grid stays TFLite's
                qp = m.act_quant.qparams()
                assert float(qp.scale) == 1 / 256 and int(qp.zero_point) == -128 and type(m.act_quant).__name__ == \
                    "FixedQuantize"
