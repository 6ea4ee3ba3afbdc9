"""Post-training methods that change a fake-quant model's weights or biases, built on its graph (so they
work on any model ``quant.quantize`` accepts) and leaving it exact with the integer engine and LiteRT:

    qmodel = quant.quantize(model, cfg)
    quant.equalize(qmodel)                        # cross-layer equalisation: before calibration
    quant.calibrate(qmodel, batches, cfg.calib_batches)
    quant.adaround(qmodel, batches)               # learned rounding of every weight (quant.adaround)
    quant.bias_correction(qmodel, batches)        # empirical bias correction
    imodel = quant.convert(qmodel)

* ``equalize`` (Nagel et al. 2019, data-free quantization): for every pair of weighted layers A -> B
  joined by ReLU or nothing (max / average pooling and flatten may sit between; A's output feeds
  only B), output channel c of A is divided by s_c and input channel c of B multiplied by it, with
  s_c = sqrt(r_A[c] / r_B[c]) (r: the channel's max |w|, A's weights with BN folded), so both ranges
  become sqrt(r_A r_B). ReLU(x / s) = ReLU(x) / s for s > 0, so the float model's function does not
  change; depthwise convs take part as B (their channel c) and as A. Iterated over all pairs until
  the scales settle. ReLU6 and other clamps are not scale-invariant, so they end a pair.
* ``absorb_high_biases`` (same paper, section 4.2; after ``equalize``, whose scaling can leave large
  biases and so wide activation ranges): for a pair A -> ReLU -> B where A has a fused BN, A's output
  channel c is taken as N(beta_c, gamma_c^2) and c_c = max(0, beta_c - 3 |gamma_c|) moves from A's bias
  into B's (B's bias gains sum_k W_B[o, c, k] c_c), so ReLU(y - c) + c = ReLU(y) wherever y >= c; exact
  up to the rare values below c and the positions where B's zero padding reads no input.
* ``bias_correction`` (empirical, Nagel et al. 2019): layer by layer in graph order, the mean
  per-channel shift of its pre-activation output, E[float layer(x)] - E[quantized layer(x~)], is
  measured on calibration batches (x: the float model's input to the layer, x~: the quantized model's,
  with the layers before already corrected) and added to the layer's bias.

Both write the new parameters into the float shadow weights (a fused BN's gamma / beta for its
channel scales and bias), so conversion and export need nothing new.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from quant.errors import QuantError
from quant.transforms import quantizers
from quant.modules import FakeQuantize, QAvgPool2d, QConv2d, QConvBNReLU, QMaxPool2d, _QWeighted, \
    flatten_images
from quant.observers import HistogramObserver

RELU = (0.0, math.inf)


def _graph(qmodel: nn.Module) -> fx.GraphModule:
    if not isinstance(qmodel, fx.GraphModule) or getattr(qmodel, "quant_config", None) is None:
        raise QuantError("this method needs a model made by quant.quantize")
    return qmodel


def weighted_layers(qmodel: nn.Module) -> list[tuple[str, _QWeighted]]:
    """(path, layer) of every conv / linear of a quantized model, in graph (execution) order."""
    gm = _graph(qmodel)
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _QWeighted):
            out.append((str(node.target), gm.get_submodule(node.target)))
    return out


def _inputs(batches: Iterable[Any], num_batches: int | None) -> Iterator[torch.Tensor]:
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def calibration_samples(batches: Iterable[Any], n: int, method: str) -> torch.Tensor:
    """The first ``n`` images of ``batches`` (x or (x, y) items) in one tensor; ``method`` names the caller
    in the error raised when there are none."""
    xs, seen = [], 0
    for x in _inputs(batches, None):
        xs.append(x)
        seen += len(x)
        if seen >= n:
            break
    if not xs:
        raise QuantError(f"{method} got no calibration batches")
    return torch.cat(xs)[:n]


@contextlib.contextmanager
def _set_all(items: list[Any], attr: str, value: Any) -> Iterator[None]:
    """``item.attr = value`` for every item, the old values restored on exit."""
    saved = [(it, getattr(it, attr)) for it in items]
    for it, _ in saved:
        setattr(it, attr, value)
    try:
        yield
    finally:
        for it, old in saved:
            setattr(it, attr, old)


def fake_quant_off(qmodel: nn.Module) -> contextlib.AbstractContextManager:
    """The float network of a quantized model (every quantizer the identity), restored on exit."""
    return _set_all(list(quantizers(qmodel)), "enabled", False)


def frozen_observers(qmodel: nn.Module) -> contextlib.AbstractContextManager:
    """Nothing records (ranges fixed), restored on exit."""
    return _set_all([fq.observer for fq in quantizers(qmodel)], "frozen", True)


def act_quant_off(qmodel: nn.Module) -> contextlib.AbstractContextManager:
    """Quantized weights, float activations (every quantizer but the weights' the identity)."""
    weights = {id(m.weight_quant) for m in qmodel.modules() if isinstance(m, _QWeighted)}
    return _set_all([fq for fq in quantizers(qmodel) if id(fq) not in weights], "enabled", False)


def hold_range(fq: FakeQuantize, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Give an activation quantizer the range [lo, hi] (its qparams: ``choose_qparams(lo, hi)``), observer
    frozen and a calibrator's histogram dropped, so evaluation and conversion keep it (a later
    ``quant.calibrate`` records a new range over it)."""
    obs = fq.observer
    if isinstance(obs, HistogramObserver):
        obs.hist = None
    obs.min_val = torch.as_tensor(lo).to(obs.min_val.dtype).reshape(obs.min_val.shape)
    obs.max_val = torch.as_tensor(hi).to(obs.max_val.dtype).reshape(obs.max_val.shape)
    obs.frozen = True


def refit_weight_range(layer: _QWeighted) -> None:
    """Take the layer's weight range from its current (folded) weights, then hold it (observer frozen)."""
    obs = layer.weight_quant.observer
    obs.frozen = False
    obs.reset()
    obs(layer.float_weight_bias()[0].detach())
    obs.frozen = True


def layer_inputs(qmodel: nn.Module, layer: nn.Module, batches: Iterable[Any], num_batches: int | None = None,
                 float_net: bool = False, float_acts: bool = False) -> torch.Tensor:
    """The inputs ``layer`` sees over the batches, concatenated, from the quantized network (eval mode:
    what the integer engine computes), with ``float_acts`` from that network with float activations,
    with ``float_net`` from its float network."""
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    was = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad(), frozen_observers(qmodel), (fake_quant_off(qmodel) if float_net else
                                                         act_quant_off(qmodel) if float_acts
                                                         else contextlib.nullcontext()):
            for x in _inputs(batches, num_batches):
                qmodel(x)
    finally:
        hook.remove()
        qmodel.train(was)
    return torch.cat(seen)


def folded_factor(layer: _QWeighted) -> torch.Tensor | None:
    """gamma / sigma of a fused BN (per output channel), None without one."""
    if not isinstance(layer, QConvBNReLU):
        return None
    bn = layer.bn
    factor = torch.rsqrt(bn.running_var + bn.eps)
    return factor if bn.weight is None else bn.weight * factor


@torch.no_grad()
def set_folded_weight(layer: _QWeighted, w: torch.Tensor) -> None:
    """Make the layer's (BN-folded) weight ``w``: the conv weight is w / (gamma / sigma) under a BN
    (channels whose factor is 0 keep their weight: their folded weight is 0 either way)."""
    factor = folded_factor(layer)
    if factor is None:
        layer.weight.copy_(w)
        return
    f = factor.reshape(-1, *([1] * (w.dim() - 1)))
    layer.weight.copy_(torch.where(f != 0, w / torch.where(f != 0, f, 1.0), layer.weight))


@torch.no_grad()
def add_to_bias(layer: _QWeighted, delta: torch.Tensor) -> None:
    """Add ``delta`` (per output channel) to the layer's folded bias."""
    if isinstance(layer, QConvBNReLU) and layer.bn.bias is not None:
        layer.bn.bias.add_(delta)
        return
    factor = folded_factor(layer)
    if factor is not None:  # a BN without beta: through the conv bias, b' = (b - mu) * factor
        delta = torch.where(factor != 0, delta / torch.where(factor != 0, factor, 1.0), 0.0)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(delta))
    layer.bias.add_(delta)


@torch.no_grad()
def _scale_out_channels(layer: _QWeighted, inv: torch.Tensor) -> None:
    """Multiply output channel c of the layer (its folded weight and bias) by inv[c] > 0."""
    if isinstance(layer, QConvBNReLU):
        if layer.bn.weight is None:
            raise QuantError("internal: equalising a BN without affine parameters")
        layer.bn.weight.mul_(inv)
        if layer.bn.bias is not None:
            layer.bn.bias.mul_(inv)
        return
    layer.weight.mul_(inv.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    if layer.bias is not None:
        layer.bias.mul_(inv)


def _depthwise(layer: _QWeighted) -> bool:
    return isinstance(layer, QConv2d) and layer.groups == layer.in_channels == layer.out_channels \
        and layer.groups > 1


def _in_channel_view(layer: _QWeighted, channels: int) -> torch.Tensor | None:
    """B's weight as (channels, values of input channel c), or None when B's input does not split so
    (grouped convs other than depthwise)."""
    w = layer.weight.detach()
    if _depthwise(layer):
        return w.reshape(channels, -1)
    if isinstance(layer, QConv2d):
        return w.transpose(0, 1).reshape(channels, -1) if layer.groups == 1 else None
    per = w.shape[1] // channels  # linear after flatten: channel c holds features [c * HW, (c + 1) * HW)
    if per * channels != w.shape[1]:
        return None
    return w.reshape(w.shape[0], channels, per).transpose(0, 1).reshape(channels, -1)


@torch.no_grad()
def _scale_in_channels(layer: _QWeighted, s: torch.Tensor) -> None:
    """Multiply what input channel c of B contributes by s[c]."""
    w = layer.weight
    if _depthwise(layer):
        w.mul_(s.reshape(-1, 1, 1, 1))
    elif isinstance(layer, QConv2d):
        w.mul_(s.reshape(1, -1, 1, 1))
    else:
        per = w.shape[1] // s.numel()
        w.mul_(s.repeat_interleave(per).reshape(1, -1))


def equalization_pairs(qmodel: nn.Module) -> list[tuple[str, str]]:
    """(A, B) paths of the layer pairs ``equalize`` rescales (see the module docstring)."""
    gm = _graph(qmodel)
    users: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for a in node.args:
            if isinstance(a, fx.Node):
                users.setdefault(a.name, []).append(node)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        a = gm.get_submodule(node.target)
        if not isinstance(a, _QWeighted) or a.act not in (None, RELU):
            continue
        if isinstance(a, QConvBNReLU) and a.bn.weight is None:
            continue
        cur = node
        while True:
            nxt = users.get(cur.name, [])
            if len(nxt) != 1:
                break
            cur = nxt[0]
            m = gm.get_submodule(cur.target) if cur.op == "call_module" else None
            if isinstance(m, (QMaxPool2d, QAvgPool2d)) or (cur.op == "call_function" and cur.target is flatten_images):
                continue
            if isinstance(m, _QWeighted) and _in_channel_view(m, a.weight.shape[0]) is not None:
                pairs.append((str(node.target), str(cur.target)))
            break
    return pairs


@torch.no_grad()
def equalize(qmodel: nn.Module, iterations: int = 20, tol: float = 1e-3) -> list[tuple[str, str]]:
    """Cross-layer equalisation in place (before calibration); returns the equalised pairs."""
    gm = _graph(qmodel)
    pairs = [(gm.get_submodule(a), gm.get_submodule(b)) for a, b in equalization_pairs(qmodel)]
    for _ in range(iterations):
        worst = 0.0
        for a, b in pairs:
            r_a = a.float_weight_bias()[0].detach().reshape(a.weight.shape[0], -1).abs().amax(1)
            r_b = _in_channel_view(b, a.weight.shape[0]).abs().amax(1)
            ok = (r_a > 0) & (r_b > 0)
            s = torch.where(ok, torch.sqrt(r_a / torch.where(ok, r_b, 1.0)), 1.0)
            worst = max(worst, float((s.log().abs()).max()) if s.numel() else 0.0)
            _scale_out_channels(a, 1.0 / s)
            _scale_in_channels(b, s)
        if worst < tol:
            break
    return [(a, b) for a, b in equalization_pairs(qmodel)]


@torch.no_grad()
def absorb_high_biases(qmodel: nn.Module, sigmas: float = 3.0) -> dict[str, float]:
    """High-bias absorption in place (after ``equalize``, before calibration): see the module docstring.
    Returns the mean absorbed amount per pair A -> B that absorbed anything ('A->B': mean c)."""
    gm = _graph(qmodel)
    absorbed = {}
    for pa, pb in equalization_pairs(qmodel):
        a, b = gm.get_submodule(pa), gm.get_submodule(pb)
        if not isinstance(a, QConvBNReLU) or a.act != RELU or a.bn.bias is None or a.bn.weight is None:
            continue
        c = (a.bn.bias - sigmas * a.bn.weight.abs()).clamp_min(0)
        if not bool((c > 0).any()):
            continue
        a.bn.bias.sub_(c)
        w = b.weight.detach()
        if _depthwise(b):
            delta = w.reshape(w.shape[0], -1).sum(1) * c
        elif isinstance(b, QConv2d):
            delta = w.sum((2, 3)) @ c
        else:  # linear after flatten: input channel c holds features [c * HW, (c + 1) * HW)
            delta = w.reshape(w.shape[0], c.numel(), -1).sum(2) @ c
        add_to_bias(b, delta)
        absorbed[f"{pa}->{pb}"] = float(c.mean())
    return absorbed


def _pre_activation(layer: _QWeighted, x: torch.Tensor, quantized: bool) -> torch.Tensor:
    """The layer's output before its activation, with float or fake-quantized weights (and bias grid)."""
    from quant.modules import fake_quantize_bias
    w, b = layer.float_weight_bias()
    if quantized:
        w = layer.weight_quant(w)
        if b is not None and layer.input_fq is not None and layer.input_fq.enabled:
            b = fake_quantize_bias(b, layer.input_qparams().scale, layer.weight_quant.qparams().scale)
    return layer._op(x, w, b)  # noqa: SLF001


def _channel_mean(y: torch.Tensor) -> torch.Tensor:
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(1) if y.dim() > 2 else y.mean(0)


@torch.no_grad()
def bias_correction(qmodel: nn.Module, batches: Iterable[Any], num_batches: int | None = 8,
                    chunk: int = 256) -> dict[str, float]:
    """Empirical bias correction in place (after calibration); returns each layer's mean |shift|."""
    batches = list(_inputs(batches, num_batches))
    layers = weighted_layers(qmodel)

    def mean_output(layer: _QWeighted, x: torch.Tensor, quantized: bool) -> torch.Tensor:
        with frozen_observers(qmodel):
            total = sum(_channel_mean(_pre_activation(layer, x[i:i + chunk], quantized)) * len(x[i:i + chunk])
                        for i in range(0, len(x), chunk))
        return total / len(x)

    # the float network's means first: correcting a bias changes the float network too
    targets = [mean_output(layer, layer_inputs(qmodel, layer, batches, float_net=True), False) for _, layer in layers]
    shifts = {}
    for (path, layer), target in zip(layers, targets):
        delta = target - mean_output(layer, layer_inputs(qmodel, layer, batches), True)
        add_to_bias(layer, delta)
        shifts[path] = float(delta.abs().mean())
    return shifts
