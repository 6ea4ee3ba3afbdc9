"""Model transforms: ``quantize`` (graph capture, fusion, fake-quant modules), ``calibration_mode`` /
``calibrate``, ``convert``.

``quantize`` reads the model's normalised graph (``quant.graph.model_graph``: torch.fx tracing, so any
model written as a class with ``forward`` works, ``nn.Sequential`` included) and builds a
``torch.fx.GraphModule`` of fake-quant modules from it:

    conv [+bn] [+act]  -> QConv2d / QConvReLU / QConvBN / QConvBNReLU (BN folded; act: ReLU, ReLU6, clamp)
    linear [+act]      -> QLinear / QLinearReLU
    add [+act]         -> QAdd (own output quantizer)
    maxpool, avgpool   -> QMaxPool2d, QAvgPool2d (keep the input's quantizer)
    act (not fused)    -> QAct (keeps the input's quantizer)
    cat                -> QCat (its inputs and output share one quantizer)
    flatten            -> flatten_images
    the input          -> ``input_quant`` (the normalised input quantized once at act_bits)

Quantizers are grouped once: an op that keeps its input's grid joins its input's group, and a
concatenation joins its inputs' groups, so every producer in a group gets the same quantizer object.
Fused modules sit at the conv's / linear's path, so the float state-dict keys of weights are kept.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
import torch.nn as nn

from quant.config import ROUNDINGS, QuantConfig
from quant.errors import QuantError
from quant.graph import GNode, float_signature, model_graph
from quant.integer import IntModel, convert_graph
from quant.modules import FakeQuantize, QModule, _QWeighted, act_quantizer, flatten_images
from quant.ops import OPS

def _groups(nodes: list[GNode]) -> dict[str, str]:
    """Union-find of quantizer groups: node name -> the name of its group's root."""
    parent = {g.name: g.name for g in nodes}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for g in nodes:
        if g.kind in OPS and OPS[g.kind].qparams in ("input", "shared"):
            for i in g.inputs:
                parent[find(i)] = find(g.name)
    return {name: find(name) for name in parent}


def _layer_names(g: GNode) -> list[str]:
    """What a per-layer pattern may match: 'input', or the node's path, name, float type name and kind."""
    if g.kind == "input":
        return ["input"]
    return [n for n in (g.path, g.name, type(g.module).__name__ if g.module is not None else "", g.kind) if n]


def layer_config(cfg: QuantConfig, g: GNode) -> QuantConfig:
    """The settings of node ``g``: ``cfg.layers`` entries matching its path, name, float type or kind."""
    return cfg.for_layer(_layer_names(g)) if cfg.layers else cfg


def _check_layer_patterns(cfg: QuantConfig, nodes: list[GNode]) -> None:
    for pattern, _ in cfg.layers:
        if not any(fnmatch.fnmatchcase(n, pattern) for g in nodes for n in _layer_names(g)):
            paths = ["input" if g.kind == "input" else g.path or g.name for g in nodes
                     if g.kind not in ("output", "flatten")]
            raise QuantError(f"per-layer pattern {pattern!r} matches no layer; the layers are: {', '.join(paths)}")


def input_quantizer(cfg: QuantConfig) -> FakeQuantize:
    """The input's quantizer: asymmetric signed act_bits, observer ``cfg.observer``, eval-mode rounding of
    the config's runtime (``FakeQuantize.requant``)."""
    fq = act_quantizer(cfg)
    fq.requant = cfg.rounding
    return fq


def _place(root: nn.Module, path: str, m: nn.Module) -> str:
    """Put ``m`` at dotted ``path`` under ``root`` (creating empty parents); returns the path used."""
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    name = parts[-1]
    while name in parent._modules:  # noqa: SLF001 (a functional op named like an existing layer)
        name += "_"
    parent.add_module(name, m)
    return ".".join(parts[:-1] + [name])


def quantize(model: nn.Module, cfg: QuantConfig) -> fx.GraphModule:
    """A fake-quantized copy of ``model`` (``model`` is not modified), as a ``torch.fx.GraphModule``.

    Any model ``torch.fx`` can trace works (see ``quant.graph`` for the ops and the fusion patterns:
    Conv→BN→act, Conv→act, Linear→act, add→act; BN folded). Quantizers start enabled with observers
    recording: calibrate (``calibrate`` / ``calibration_mode``) before evaluating. An unsupported op
    raises ``QuantError`` naming the node and the line of ``forward``. The result carries
    ``quant_config`` and ``float_signature`` attributes.
    """
    if not isinstance(cfg, QuantConfig):
        raise QuantError(f"quantize needs a QuantConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise QuantError(f"quantize needs an nn.Module, got {type(model).__name__}")
    for path, m in model.named_modules():
        if isinstance(m, (QModule, FakeQuantize)):
            raise QuantError(f"layer {path!r} is already quantized; pass the float model to quantize")
    signature = float_signature(model)
    nodes = model_graph(copy.deepcopy(model))
    _check_layer_patterns(cfg, nodes)
    group = _groups(nodes)
    for g in nodes:  # a constant-qparams output (LOGISTIC's) cannot share its quantizer with another producer
        if g.kind in OPS and OPS[g.kind].qparams == "fixed":
            shared = [h.name for h in nodes if group[h.name] == group[g.name] and h is not g
                      and (h.kind == "input" or (h.kind in OPS and OPS[h.kind].qparams in ("own", "fixed")))]
            if shared:
                raise QuantError(f"node {g.name!r} ({g.kind}{' at ' + g.where if g.where else ''}) has TFLite's "
                                 f"fixed output scale and would share it with {shared[0]!r} (a concatenation); "
                                 f"put a conv between them")
    users: dict[str, list[GNode]] = {}
    for g in nodes:
        for i in g.inputs:
            users.setdefault(i, []).append(g)
    root, graph = nn.Module(), fx.Graph()
    env: dict[str, fx.Node] = {}
    fq_of: dict[str, FakeQuantize] = {}  # group root -> its quantizer
    made: dict[str, QModule] = {}

    def owner(g: GNode, fq: FakeQuantize) -> FakeQuantize:
        """The group's quantizer (the first producer's), shared by every producer of the group."""
        return fq_of.setdefault(group[g.name], fq)

    for g in nodes:
        args = tuple(env[i] for i in g.inputs)
        in_fqs = [fq_of[group[i]] for i in g.inputs]
        if g.kind == "input":
            fq = owner(g, input_quantizer(layer_config(cfg, g)))
            env[g.name] = graph.call_module(_place(root, "input_quant", fq), (graph.placeholder(g.name),))
            continue
        if g.kind == "output":
            graph.output(args[0])
            continue
        if g.kind == "flatten":
            env[g.name] = graph.call_function(flatten_images, (args[0], g.attrs["size"]))
            continue
        if g.kind not in OPS or OPS[g.kind].module is None:
            raise QuantError(f"internal: no fake-quant module for node kind {g.kind!r}")
        m: QModule = OPS[g.kind].module(g, layer_config(cfg, g))
        if OPS[g.kind].qparams in ("own", "fixed"):
            m.act_quant = owner(g, m.act_quant)
        if g.kind == "maxpool":
            src = made.get(g.inputs[0])
            if isinstance(src, _QWeighted) and len(users[g.inputs[0]]) == 1:
                # a layer's output straight into max pooling: QAT quantizes after the pooling (same values)
                src.quantize_after_pool = m.quantizes_input_after = True
        path = g.path or g.name
        m.attach_input(*in_fqs)
        m.requant = cfg.rounding
        made[g.name] = m
        env[g.name] = graph.call_module(_place(root, path, m), args)
    if not made:
        raise QuantError("the model has no layer to quantize")
    qmodel = fx.GraphModule(root, graph, f"Quantized{type(model).__name__}")
    qmodel.train(model.training)
    keep_attr(qmodel, "quant_config", cfg)
    keep_attr(qmodel, "float_signature", signature)
    return qmodel


def keep_attr(gm: fx.GraphModule, name: str, value: Any) -> None:
    """Set ``gm.name = value`` so that it survives ``copy.deepcopy`` (fx rebuilds a copied GraphModule)."""
    setattr(gm, name, value)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[name] = value


def quantizers(model: nn.Module) -> Iterator[FakeQuantize]:
    """Every FakeQuantize in ``model``."""
    return (m for m in model.modules() if isinstance(m, FakeQuantize))


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off everywhere (off: every quantizer is the identity)."""
    for fq in quantizers(model):
        fq.enabled = enabled


def set_requant(model: nn.Module, mode: str) -> None:
    """How frozen fake-quant layers round their outputs in eval mode: 'float' (round(y / s_out)) or the
    fixed-point requantization of a runtime ('ref', 'builtin', 'xnnpack'; the default is the config's)."""
    if mode not in ("float", *ROUNDINGS):
        raise QuantError(f"unknown requantization {mode!r}; choose one of: float, {', '.join(ROUNDINGS)}")
    for m in model.modules():
        if isinstance(m, QModule):
            m.requant = mode
    if isinstance(model, fx.GraphModule):  # the input quantizers: FakeQuantize modules called by the graph
        for node in model.graph.nodes:
            if node.op == "call_module" and isinstance(model.get_submodule(node.target), FakeQuantize):
                model.get_submodule(node.target).requant = mode


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Let observers record (True) or freeze them so qparams stay fixed (False). Quantizers whose qparams a
    method fixed (``FakeQuantize.fixed``: AdaRound's weights) stay frozen."""
    for fq in quantizers(model):
        fq.observer.frozen = fq.fixed or not enabled


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """PTQ calibration: eval mode, no grad, observers recording, fake quantization off (the observers
    see the float network's tensors).

    On exit the training flag is restored, fake quantization is switched on and the observers are
    frozen: the ranges are final and the model is ready to evaluate or ``convert``.
    """
    was_training = model.training
    model.eval()
    set_observers(model, True)
    set_fake_quant(model, False)
    try:
        with torch.no_grad():
            yield model
    finally:
        set_fake_quant(model, True)
        set_observers(model, False)
        model.train(was_training)


def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None,
              progress: bool = False) -> nn.Module:
    """Run ``calibration_mode`` over up to ``num_batches`` of ``batches`` (x or (x, y) items)."""
    it: Iterable[Any] = batches
    if progress:
        from tqdm import tqdm
        it = tqdm(batches, total=num_batches, desc="calibrate", leave=False)
    with calibration_mode(model):
        for i, batch in enumerate(it):
            if num_batches is not None and i >= num_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return model


def convert(qmodel: nn.Module, rounding: str | None = None, clamp: str = "bits") -> IntModel:
    """The integer-only model of a calibrated fake-quant model (see ``quant.integer``).

    rounding: 'ref' | 'builtin' | 'xnnpack' | 'tflm' (default: ``qmodel.quant_config.rounding``).
    clamp: 'bits' clamps every activation to its b-bit range (the fake-quant semantics); 'int8'
    clamps to [-128, 127] as LiteRT does for b < 8 bits stored in int8 tensors (fused activations still
    clamp at their bounds).
    """
    if clamp not in ("bits", "int8"):
        raise QuantError(f"clamp must be 'bits' or 'int8', got {clamp!r}")
    cfg = getattr(qmodel, "quant_config", None)
    if cfg is None or not isinstance(qmodel, fx.GraphModule):
        raise QuantError("convert needs a model made by quant.quantize (and calibrated)")
    rounding = rounding or cfg.rounding
    meta = {"config": cfg.to_dict(), "float_signature": getattr(qmodel, "float_signature", None)}
    return convert_graph(qmodel, rounding, clamp, meta)
