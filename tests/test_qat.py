"""Quantization-aware training: quant/qat.py, the QAT parts of quant/modules.py, and QAT.py end to end."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant.modules import LSQQuantize, QConvBNReLU
from quant.qparams import fake_quantize
from tests.conftest import check_resume, run_script


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


def test_bn_before_freeze_matches_float_bn_in_train_mode_and_momentum():
    """Fake quant off: the folded/corrected layer equals conv -> BatchNorm2d(train) -> ReLU, and the
    running statistics follow PyTorch's momentum update."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    layer = QConvBNReLU(conv, bn, quant.QuantConfig()).train()
    quant.set_fake_quant(layer, False)
    ref_bn = nn.BatchNorm2d(5, momentum=0.3)
    ref_bn.load_state_dict(bn.state_dict())
    x = torch.randn(8, 3, 9, 9)
    expected = F.relu(ref_bn.train()(conv(x)))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)


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


def test_lsq_forward_equals_fake_quantize_and_scale_learns_positive():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 2
    obs = quant.observers.MinMaxObserver(4, symmetric=False)
    obs(x)
    lsq = LSQQuantize(obs, obs.calculate_qparams())
    xg = x.clone().requires_grad_(True)
    out = lsq(xg)
    assert torch.equal(out.detach(), fake_quantize(x, lsq.qparams()))
    out.pow(2).sum().backward()
    assert lsq.scale.grad is not None and lsq.scale.grad.abs() > 0
    # LSQ gradient: sum over elements of dL/dout * (-x/s + round(x/s) inside, qmin-zp / qmax-zp outside) * g
    s, zp, qp = lsq.scale.detach(), lsq.zero_point.float(), lsq.qparams()
    v = x / s
    r = quant.qparams.round_half_away(v)
    inside = (v >= qp.qmin - zp) & (v <= qp.qmax - zp)  # the paper clips v = x / s before rounding
    d = torch.where(inside, r - v, torch.where(v < qp.qmin - zp, qp.qmin - zp, qp.qmax - zp))
    g = 1 / math.sqrt(x[0].numel() * (qp.qmax - qp.qmin))
    torch.testing.assert_close(lsq.scale.grad, (2 * out.detach() * d).sum() * g, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        lsq.scale -= 10 * lsq.scale.abs() + 1  # a step that would make it negative
    lsq.clamp_()
    assert lsq.scale > 0 and lsq.qparams().scale > 0 and torch.equal(lsq.scale.detach(), lsq.scale_floor)


@pytest.mark.parametrize("axis", [None, 0, 1], ids=["per_tensor", "weight_axis0", "act_axis1"])
def test_lsq_fused_gradients_equal_plain_autograd(axis):
    """The fused LSQ function gives the values and gradients of the textbook composition
    s_g = grad_scale(s, g); out = round_ste(clamp(x / s_g, lo, hi)) * s_g, in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 4, 4, generator=g, dtype=torch.float64) * 3
    shape = [1] * 4
    if axis is not None:
        shape[axis] = x.shape[axis]
    s0 = torch.rand(shape, generator=g, dtype=torch.float64) + 0.2
    zp = torch.full(shape, -2.0 if axis != 0 else 0.0, dtype=torch.float64)
    lo, hi, gs = -8 - zp, 7 - zp, 0.37
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)

    x1, s1 = x.clone().requires_grad_(), s0.clone().requires_grad_()
    out1 = quant.modules._LSQFunction.apply(x1, s1, lo, hi, gs)
    (out1 * w).sum().backward()

    x2, s2 = x.clone().requires_grad_(), s0.clone().requires_grad_()
    s_g = s2 * gs + (s2 - s2 * gs).detach()                  # value s, gradient times gs
    v = torch.minimum(torch.maximum(x2 / s_g, lo), hi)       # clamp: zero gradient outside [lo, hi]
    out2 = (v + (quant.qparams.round_half_away(v) - v).detach()) * s_g
    (out2 * w).sum().backward()

    assert torch.equal(out1.detach(), out2.detach())
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(s1.grad, s2.grad)
    assert s1.grad.shape == s0.shape and (s1.grad != 0).all()


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


@pytest.mark.slow
def test_from_scratch_dry_run_json(tmp_path):
    csv_path = tmp_path / "qat.csv"
    r = run_script("QAT.py", "--from-scratch", "--dry-run", "--device", "cpu", "--model", "cnn_bn", "--bits", "4",
                   "--calib-batches", "2", "--results", str(csv_path), "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("float_acc", "fq_acc", "int_acc", "agreement", "tag", "observer", "calib_batches", "rounding",
                "float_ckpt", "seconds", "git_commit"):  # PTQ.py's keys
        assert key in row, key
    assert row["agreement"] == 100.0 and row["quantizer"] == "lsq" and row["bits"] == 4
    assert csv_path.exists()


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    common = ("QAT.py", "--from-scratch", "--dry-run", "--device", "cpu", "--model", "cnn_bn", "--bits", "4",
              "--epochs", "2", "--calib-batches", "2", "--freeze-bn", "1.5", "--freeze-observers", "1.5")
    resumed, straight = check_resume(common, 2, tmp_path)
    wa, wb = resumed["model"], straight["model"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) if torch.is_tensor(wb[k]) else wa[k] == wb[k] for k in wb)
    assert (tmp_path / "resumed.int.pt").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_missing_checkpoint_names_the_train_command(tmp_path):
    r = run_script("QAT.py", "--dataset", "cifar10", "--model", "cnn", "--bits", "4", "--ckpt", str(tmp_path / "no.pt"))
    assert r.returncode == 2 and "python train.py --dataset cifar10 --model cnn" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_script("QAT.py", "--bits", "9", "--dry-run")
    assert r.returncode == 2 and "2..8" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_recipe_augmentation_fine_tuning_uses_the_data_sets_from_scratch_the_models(monkeypatch):
    import QAT
    from utils import recipes

    def cfg(*argv):
        return QAT.fill_recipe(QAT.parse_args(["--dataset", "fashion_mnist", "--model", "cnn_bn", "--bits", "4", *argv]))

    # a model recipe with its own augmentation (no shipped recipe has one now)
    own = dict(recipes.MODEL_RECIPES.get(("fashion_mnist", "cnn_bn"), {}), augment="flip")
    monkeypatch.setitem(recipes.MODEL_RECIPES, ("fashion_mnist", "cnn_bn"), own)
    assert recipes.model_recipe("fashion_mnist", "cnn_bn")["augment"] != recipes.RECIPES["fashion_mnist"]["augment"]
    assert cfg()["augment"] == recipes.RECIPES["fashion_mnist"]["augment"]
    assert cfg("--from-scratch")["augment"] == recipes.model_recipe("fashion_mnist", "cnn_bn")["augment"]
    assert cfg("--augment", "flip,erase20")["augment"] == "flip,erase20"


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


@pytest.mark.slow
def test_distillation_flags_recorded_and_checked(tmp_path):
    import QAT
    from utils import recipes

    def cfg(*argv):
        return QAT.fill_recipe(QAT.parse_args(["--bits", "4", *argv]))

    assert cfg()["kd_weight"] == recipes.COMMON["kd_weight"] and cfg()["bn_momentum"] is None
    c = cfg("--kd-weight", "0.5", "--kd-temp", "2", "--bn-momentum", "0.02")
    assert (c["kd_weight"], c["kd_temp"], c["bn_momentum"]) == (0.5, 2.0, 0.02)
    csv_path = tmp_path / "qat.csv"
    r = run_script("QAT.py", "--dry-run", "--device", "cpu", "--model", "cnn_bn", "--bits", "4", "--calib-batches", "2",
                   "--kd-weight", "0.5", "--bn-momentum", "0.02", "--results", str(csv_path), "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["kd_weight"] == 0.5 and row["bn_momentum"] == 0.02 and row["agreement"] == 100.0
    # another teacher than the float checkpoint: train.py's --teacher list, recorded in the row
    teachers = "ckpt/fashion_mnist_cnn.pt,ckpt/fashion_mnist_cnn_bn.pt"
    r = run_script("QAT.py", "--dry-run", "--device", "cpu", "--model", "cnn_bn", "--bits", "4", "--calib-batches", "2",
                   "--kd-weight", "0.5", "--teacher", teachers, "--results", str(csv_path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["teacher"] == teachers
    for argv, expected in ((("--from-scratch", "--kd-weight", "0.5"), "no trained float model to distil"),
                           (("--kd-weight", "0.5", "--teacher", "ckpt/cifar10_cnn.pt"), "not a fashion_mnist model"),
                           (("--bn-momentum", "1.5"), "--bn-momentum must be in (0, 1]")):
        r = run_script("QAT.py", "--dry-run", "--device", "cpu", *argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (argv, r.stderr)


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
