"""The model's graph: trace with torch.fx, normalise every op to one node kind, fuse, group qparams.

    nodes = model_graph(model)      # [GNode(name, kind, inputs, module, attrs, where), ...]

Every stage reads this one list: ``quant.transforms.quantize`` builds the fake-quant GraphModule from
it, ``convert`` walks that module's graph into the integer engine, and the exporter walks the engine.

Normalisation (module and functional forms of an op become one kind):

==========  ========================================================================================
kind        sources
==========  ========================================================================================
input       the ``forward`` argument (exactly one)
conv        nn.Conv2d (any stride, dilation, groups, zero padding); ``bn``: a BatchNorm2d folded in
bn          nn.BatchNorm2d (must directly follow a conv with no other user: it is folded into it)
linear      nn.Linear
act         clamp to [lo, hi]: nn.ReLU / F.relu / torch.relu / x.relu() (0, inf), nn.ReLU6 / F.relu6
            (0, 6), nn.Hardtanh / F.hardtanh, torch.clamp / x.clamp with constant bounds
maxpool     nn.MaxPool2d, F.max_pool2d
avgpool     nn.AvgPool2d, F.avg_pool2d; nn.AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(x, 1) and
            x.mean((2, 3)) / torch.mean (global: ``attrs['kernel'] = None``)
flatten     nn.Flatten / torch.flatten / x.flatten(1), x.view / x.reshape to (N, -1) or (N, K)
add         ``+``, torch.add, x.add (two tensors)
sigmoid     nn.Sigmoid, torch.sigmoid, F.sigmoid, x.sigmoid()
hardswish   nn.Hardswish, F.hardswish
cat         torch.cat on the channel axis (dim 1)
output      the returned tensor (exactly one)
==========  ========================================================================================

Dropout, Identity, ``contiguous`` and ``x.size`` / ``x.shape`` feeding a view vanish. Fusion, matched
once here: conv→bn, then (conv | linear | add)→act, each only when the producer has no other user
(what TFLite fuses: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and ADD have a fused activation).

Anything else, and a model torch.fx cannot trace, raises ``QuantError`` with the node, the op and
the file:line of the user's ``forward`` it comes from.
"""
from __future__ import annotations

import math
import operator
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from quant.errors import QuantError
from quant.ops import OPS

INF = math.inf


@dataclass
class GNode:
    """One op of the normalised graph. ``inputs`` name earlier nodes; ``module`` is the float module
    (conv, bn, linear) and ``path`` its dotted name in the model; ``where`` is 'file:line'."""

    name: str
    kind: str
    inputs: list[str]
    module: nn.Module | None = None
    path: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    where: str = ""


class _Tracer(fx.Tracer):
    """Symbolic tracer that records the user's stack for every node (for error messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _user_where(stack: str | None) -> str:
    """'file:line' of the innermost frame of a node's recorded stack trace outside torch."""
    frames = [f for f in _FRAME.findall(stack or "") if "/torch/" not in f[0].replace("\\", "/")]
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else "unknown location"


def _short(path: str) -> str:
    """A path relative to the working directory when it is below it."""
    try:
        rel = os.path.relpath(path)
        return path if rel.startswith("..") else rel
    except ValueError:
        return path


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` of ``model`` (standard torch.nn layers stay leaf modules); a model fx
    cannot follow raises ``QuantError`` naming the line of its ``forward`` and what to do."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 (any failure inside fx becomes one line)
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if "/torch/" not in f.filename.replace("\\", "/") and not f.filename.endswith("quant/graph.py")]
        where = f" at {_short(frames[-1].filename)}:{frames[-1].lineno} ({(frames[-1].line or '').strip()})" \
            if frames else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantError(f"cannot trace {type(model).__name__} with torch.fx{where}: {first}; quantize needs a "
                         f"forward without data-dependent control flow (no if/for on tensor values), so rewrite "
                         f"that line, e.g. compute the branch in the model's __init__") from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _bound(v: Any, default: float) -> float:
    if v is None:
        return default
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise ValueError("a clamp bound must be a Python number")


class _Unsupported(Exception):
    """Raised while normalising one node; turned into the one-line QuantError with its location."""


SUPPORTED = ("Conv2d (any stride, dilation, groups, zero padding), BatchNorm2d after a conv, Linear, ReLU, ReLU6, "
             "Hardtanh/clamp, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), mean over (2, 3), Flatten/view/reshape "
             "to (N, -1), add, cat on dim 1, Sigmoid, Hardswish, Dropout, Identity")

_ACT_MODULES = {nn.ReLU: lambda m: (0.0, INF), nn.ReLU6: lambda m: (0.0, 6.0),
                nn.Hardtanh: lambda m: (float(m.min_val), float(m.max_val))}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
#: spellings without arguments, from the op records (``quant.ops.Op.modules`` / ``functions`` / ``methods``)
_SPELLED_MODULES = {t: op.kind for op in OPS.values() for t in op.modules}
_SPELLED_FUNCTIONS = {f: op.kind for op in OPS.values() for f in op.functions}
_SPELLED_METHODS = {m: op.kind for op in OPS.values() for m in op.methods}


def _pool_attrs(kernel: Any, stride: Any, padding: Any, **extra: Any) -> dict[str, Any]:
    k = _pair(kernel)
    s = _pair(stride) if stride not in (None, []) else k
    return {"kernel": k, "stride": s, "padding": _pair(padding), **extra}


def _global_avg(output_size: Any) -> dict[str, Any]:
    if _pair(output_size if output_size is not None else 1) != (1, 1):
        raise _Unsupported(f"adaptive average pooling to {output_size} (only to 1x1: global average pooling)")
    return {"kernel": None, "stride": None, "padding": (0, 0), "ceil_mode": False, "count_include_pad": True}


def _mean_dims(dims: Any) -> bool:
    d = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
    return sorted(int(v) % 4 for v in d) == [2, 3]


class _Normaliser:
    """fx graph -> list of GNode, one kind per op (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.nodes: list[GNode] = []
        self.alias: dict[str, str] = {}  # vanished node -> the node whose value it is
        self.shape_nodes: set[str] = set()  # x.size(0) / x.shape[0]: only allowed inside a view

    def ref(self, a: Any) -> str:
        if not isinstance(a, fx.Node):
            raise _Unsupported(f"a constant operand {a!r} (only tensors computed from the input)")
        if a.name in self.shape_nodes:
            raise _Unsupported("a tensor shape used as a value (only x.view(x.size(0), -1) is supported)")
        return self.alias.get(a.name, a.name)

    def add(self, node: fx.Node, kind: str, inputs: list[Any], **kw: Any) -> None:
        if node.op == "call_module":
            kw.setdefault("path", node.target)
        self.nodes.append(GNode(node.name, kind, [self.ref(a) for a in inputs], where=_user_where(node.stack_trace),
                                **kw))

    def vanish(self, node: fx.Node, a: Any) -> None:
        self.alias[node.name] = self.ref(a)

    def run(self) -> list[GNode]:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except _Unsupported as e:
                target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__",
                                                                                  str(node.target))
                what = f"layer {target!r}" if node.op == "call_module" else f"node {node.name!r} ({node.op} {target})"
                where = _user_where(node.stack_trace)
                at = "" if where == "unknown location" else f" at {_short(where)}"
                raise QuantError(f"unsupported op in {type(self.gm).__name__}: {what}{at}: {e}; quantize supports "
                                 f"{SUPPORTED}") from None
        return self.nodes

    def visit(self, node: fx.Node) -> None:
        op = node.op
        if op == "placeholder":
            if any(n.kind == "input" for n in self.nodes):
                raise _Unsupported("a second forward argument (the model must take one input tensor)")
            self.nodes.append(GNode(node.name, "input", []))
        elif op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise _Unsupported("a forward that returns several values (return one tensor of logits)")
            self.add(node, "output", [out])
        elif op == "call_module":
            self.visit_module(node, self.modules[node.target])
        elif op == "call_function":
            self.visit_function(node, node.target)
        elif op == "call_method":
            self.visit_method(node, node.target)
        else:  # get_attr: a parameter or buffer used directly in forward
            raise _Unsupported("a parameter or buffer used directly in forward (wrap it in a layer module)")

    def visit_module(self, node: fx.Node, m: nn.Module) -> None:
        x = node.args[0] if node.args else None
        t = type(m)
        if t is nn.Conv2d:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise _Unsupported(f"Conv2d with padding={m.padding!r}, padding_mode={m.padding_mode!r} (give "
                                   f"integer zero padding)")
            self.add(node, "conv", [x], module=m, path=node.target)
        elif t is nn.BatchNorm2d:
            self.add(node, "bn", [x], module=m, path=node.target)
        elif t is nn.Linear:
            self.add(node, "linear", [x], module=m, path=node.target)
        elif t in _ACT_MODULES:
            lo, hi = _ACT_MODULES[t](m)
            self.add(node, "act", [x], attrs={"lo": lo, "hi": hi})
        elif t is nn.MaxPool2d:
            if m.return_indices:
                raise _Unsupported("MaxPool2d(return_indices=True)")
            self.add(node, "maxpool", [x], attrs=_pool_attrs(m.kernel_size, m.stride, m.padding,
                                                             dilation=_pair(m.dilation), ceil_mode=m.ceil_mode))
        elif t is nn.AvgPool2d:
            self.add(node, "avgpool", [x], attrs=_pool_attrs(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode,
                                                             count_include_pad=m.count_include_pad,
                                                             divisor_override=m.divisor_override))
        elif t is nn.AdaptiveAvgPool2d:
            self.add(node, "avgpool", [x], attrs=_global_avg(m.output_size))
        elif t is nn.Flatten:
            self.flatten(node, x, m.start_dim, m.end_dim)
        elif t in _PASS_MODULES:
            self.vanish(node, x)
        elif t in _SPELLED_MODULES:
            self.add(node, _SPELLED_MODULES[t], [x])
        else:
            raise _Unsupported(f"a layer of type {t.__name__}")

    def flatten(self, node: fx.Node, x: Any, start: int, end: int, size: int = -1) -> None:
        if start != 1 or end != -1:
            raise _Unsupported(f"flatten(start_dim={start}, end_dim={end}) (only start_dim=1, end_dim=-1)")
        self.add(node, "flatten", [x], attrs={"size": size})

    def visit_function(self, node: fx.Node, f: Any) -> None:
        a = node.args
        if f in (F.relu, torch.relu, torch.relu_, F.relu_):
            self.add(node, "act", [a[0]], attrs={"lo": 0.0, "hi": INF})
        elif f is F.relu6:
            self.add(node, "act", [a[0]], attrs={"lo": 0.0, "hi": 6.0})
        elif f is F.hardtanh:
            self.add(node, "act", [a[0]], attrs={"lo": float(_arg(node, 1, "min_val", -1.0)),
                                                 "hi": float(_arg(node, 2, "max_val", 1.0))})
        elif f in (torch.clamp, torch.clip):
            self.clamp(node, a[0], _arg(node, 1, "min", None), _arg(node, 2, "max", None))
        elif f is F.max_pool2d:
            if _arg(node, 6, "return_indices", False):
                raise _Unsupported("max_pool2d(return_indices=True)")
            self.add(node, "maxpool", [a[0]], attrs=_pool_attrs(
                _arg(node, 1, "kernel_size", None), _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0),
                dilation=_pair(_arg(node, 4, "dilation", 1)), ceil_mode=bool(_arg(node, 5, "ceil_mode", False))))
        elif f is F.avg_pool2d:
            self.add(node, "avgpool", [a[0]], attrs=_pool_attrs(
                _arg(node, 1, "kernel_size", None), _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0),
                ceil_mode=bool(_arg(node, 4, "ceil_mode", False)),
                count_include_pad=bool(_arg(node, 5, "count_include_pad", True)),
                divisor_override=_arg(node, 6, "divisor_override", None)))
        elif f is F.adaptive_avg_pool2d:
            self.add(node, "avgpool", [a[0]], attrs=_global_avg(_arg(node, 1, "output_size", None)))
        elif f is torch.mean:
            self.mean(node, a[0], _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
        elif f is torch.flatten:
            self.flatten(node, a[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        elif f in (operator.add, torch.add, operator.iadd):
            if node.kwargs.get("alpha", 1) != 1:
                raise _Unsupported("add with alpha != 1")
            self.add(node, "add", [a[0], a[1]])
        elif f is torch.cat:
            tensors, dim = _arg(node, 0, "tensors", None), _arg(node, 1, "dim", 0)
            if dim not in (1, -3):
                raise _Unsupported(f"cat on dim {dim} (only the channel axis, dim 1)")
            self.add(node, "cat", list(tensors))
        elif f in (F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout):
            self.vanish(node, a[0])
        elif f is getattr and len(a) == 2 and a[1] == "shape":
            self.shape_nodes.add(node.name)
        elif f is operator.getitem and isinstance(a[0], fx.Node) and a[0].name in self.shape_nodes and a[1] == 0:
            self.shape_nodes.add(node.name)
        elif f in _SPELLED_FUNCTIONS:
            self.add(node, _SPELLED_FUNCTIONS[f], [a[0]])
        else:
            raise _Unsupported(f"function {getattr(f, '__name__', f)}")

    def clamp(self, node: fx.Node, x: Any, lo: Any, hi: Any) -> None:
        try:
            lo_f, hi_f = _bound(lo, -INF), _bound(hi, INF)
        except ValueError as e:
            raise _Unsupported(f"clamp with tensor bounds ({e})") from None
        self.add(node, "act", [x], attrs={"lo": lo_f, "hi": hi_f})

    def mean(self, node: fx.Node, x: Any, dims: Any, keepdim: bool) -> None:
        if dims is None or not _mean_dims(dims):
            raise _Unsupported(f"mean over dims {dims} (only over H and W: dims (2, 3))")
        self.nodes.append(GNode(node.name + "_pool", "avgpool", [self.ref(x)], attrs=_global_avg(1),
                                where=_user_where(node.stack_trace)))
        if keepdim:
            self.alias[node.name] = node.name + "_pool"
        else:
            self.nodes.append(GNode(node.name, "flatten", [node.name + "_pool"], attrs={"size": -1},
                                    where=_user_where(node.stack_trace)))

    def visit_method(self, node: fx.Node, name: str) -> None:
        a = node.args
        if name in ("relu", "relu_"):
            self.add(node, "act", [a[0]], attrs={"lo": 0.0, "hi": INF})
        elif name in ("clamp", "clip", "clamp_", "clip_"):
            self.clamp(node, a[0], _arg(node, 1, "min", None), _arg(node, 2, "max", None))
        elif name == "flatten":
            self.flatten(node, a[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        elif name in ("view", "reshape"):
            self.view(node, a[0], a[1:] if not (len(a) == 2 and isinstance(a[1], (tuple, list))) else tuple(a[1]))
        elif name == "size":
            if _arg(node, 1, "dim", None) != 0:
                raise _Unsupported("x.size() other than x.size(0)")
            self.shape_nodes.add(node.name)
        elif name == "mean":
            self.mean(node, a[0], _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
        elif name in ("add", "add_", "__add__"):
            self.add(node, "add", [a[0], a[1]])
        elif name == "contiguous":
            self.vanish(node, a[0])
        elif name in _SPELLED_METHODS:
            self.add(node, _SPELLED_METHODS[name], [a[0]])
        else:
            raise _Unsupported(f"method x.{name}()")

    def view(self, node: fx.Node, x: Any, shape: tuple[Any, ...]) -> None:
        ok = len(shape) == 2 and (shape[0] == -1 or (isinstance(shape[0], fx.Node) and
                                                      shape[0].name in self.shape_nodes))
        if not ok or not isinstance(shape[1], int) or not (shape[1] == -1 or shape[1] > 0):
            raise _Unsupported(f"{node.target} to shape {tuple(str(s) for s in shape)} (only (N, -1) or (N, K): "
                               f"a flatten of each image)")
        self.flatten(node, x, 1, -1, size=int(shape[1]))


def _fuse(nodes: list[GNode]) -> list[GNode]:
    """conv→bn, then (conv | linear | add)→act, where the producer has no other user."""
    def users() -> dict[str, int]:
        n: dict[str, int] = {}
        for g in nodes:
            for i in g.inputs:
                n[i] = n.get(i, 0) + 1
        return n

    def drop(g: GNode, into: str) -> None:
        nodes.remove(g)
        for other in nodes:
            other.inputs = [into if i == g.name else i for i in other.inputs]

    by_name = {g.name: g for g in nodes}
    for g in [g for g in nodes if g.kind == "bn"]:
        p = by_name[g.inputs[0]]
        if p.kind != "conv" or users()[p.name] != 1 or "bn" in p.attrs:
            raise QuantError(f"BatchNorm2d {g.path!r} at {_short(g.where)} does not directly follow a Conv2d whose "
                             f"output feeds nothing else, so it cannot be folded; put it right after its conv")
        if g.module.num_features != p.module.out_channels:
            raise QuantError(f"BatchNorm2d {g.path!r} has {g.module.num_features} features but the conv before it "
                             f"has {p.module.out_channels} output channels")
        p.attrs["bn"], p.attrs["bn_path"] = g.module, g.path
        drop(g, p.name)
    for g in [g for g in nodes if g.kind == "act"]:
        p = by_name[g.inputs[0]]
        if OPS[p.kind].fuses_act and users()[p.name] == 1 and "act" not in p.attrs:
            p.attrs["act"] = (g.attrs["lo"], g.attrs["hi"])
            drop(g, p.name)
    return nodes


def model_graph(model: nn.Module) -> list[GNode]:
    """The normalised, fused graph of a float model (see the module docstring)."""
    nodes = _fuse(_Normaliser(trace(model)).run())
    if not any(g.kind == "input" for g in nodes):
        raise QuantError(f"{type(model).__name__}.forward takes no input tensor; quantize needs one")
    return nodes


def float_signature(model: nn.Module) -> list[str]:
    """One string per leaf module (path, type, parameter shapes): identifies an architecture in checkpoints."""
    sig = []
    for path, m in model.named_modules():
        if any(True for _ in m.children()):
            continue
        shapes = ",".join(f"{k}{list(v.shape)}" for k, v in m.state_dict().items()
                          if isinstance(v, torch.Tensor) and ("quant" not in k))
        sig.append(f"{path}:{type(m).__name__}({shapes})")
    return sig
