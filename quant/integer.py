"""The integer-only engine: runs the integer kernels of ``quant.kernels`` node by node, b-bit integer
tensors end to end (TFLite numerics), over the graph of the fake-quant model.

``IntModel`` = QuantizeInput → integer layers (each reading the outputs of the layers named in
``inputs``) → Dequantize. ``convert_graph`` builds it from a model made by ``quant.quantize``: every
fake-quant module gives its kernel and output qparams (``int_layer``; ops that keep their input's
grid return the input's qparams).

Flatten keeps NCHW order (an exporter to NHWC permutes the next weights). ``forward_int`` returns the
integer logits, ``forward`` dequantizes them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from quant.errors import QuantError
from quant.fixed_point import KERNEL_ROUNDING
from quant.kernels import INT_LAYERS, Dequantize, IntConv2d, IntFlatten, IntMaxPool2d, QuantizeInput
from quant.modules import flatten_images
from quant.qparams import QParams


def convert_graph(gm: fx.GraphModule, rounding: str, clamp: str, meta: dict[str, Any]) -> "IntModel":
    """The ``IntModel`` of a calibrated fake-quant GraphModule from ``quant.quantize``."""
    layers: list[nn.Module] = []
    inputs: list[list[int]] = []
    where: dict[str, tuple[int, QParams | None]] = {}  # fx node -> (layer index, its qparams)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            where[node.name] = (-1, None)
            continue
        srcs = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op == "output":
            idx, qp = where[srcs[0].name]
            layers.append(Dequantize(qp))
            inputs.append([idx])
            break
        ins = [where[a.name] for a in srcs]
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if not hasattr(m, "int_layer"):
                raise QuantError(f"cannot convert a {type(m).__name__}; convert a model made by quant.quantize")
            layer, qp = m.int_layer(clamp)
        elif node.op == "call_function" and node.target is flatten_images:
            layer, qp = IntFlatten(1, -1), ins[0][1]
        else:
            raise QuantError(f"cannot convert node {node.name!r} ({node.op} {node.target}); convert a model made by "
                             f"quant.quantize")
        where[node.name] = (len(layers), qp)
        layers.append(layer)
        inputs.append([i for i, _ in ins])
    if not layers or not isinstance(layers[0], QuantizeInput) or inputs[0] != [-1]:
        raise QuantError("the model's input is not quantized first; build it with quant.quantize")
    inputs[0] = []
    return IntModel(layers, rounding=rounding, meta=meta, inputs=inputs)


class IntModel(nn.Module):
    """Integer-only model: ``forward(x)`` float logits, ``forward_int(x)`` the b-bit integer logits.

    x is the normalised float input, quantized once by the first layer (round half away from zero).
    ``rounding`` ('ref' | 'builtin' | 'xnnpack' | 'tflm') selects the requantization of every layer.
    """

    def __init__(self, layers: list[nn.Module], rounding: str = "ref", meta: dict[str, Any] | None = None,
                 inputs: list[list[int]] | None = None) -> None:
        super().__init__()
        if not layers or not isinstance(layers[0], QuantizeInput) or not isinstance(layers[-1], Dequantize):
            raise QuantError("an IntModel starts with QuantizeInput and ends with Dequantize")
        self.layers = nn.ModuleList(layers)
        #: inputs[i]: the layers whose outputs layer i reads (default: a chain)
        self.inputs = [list(v) for v in inputs] if inputs is not None else [[]] + [[i] for i in range(len(layers) - 1)]
        if len(self.inputs) != len(layers) or any(j >= i or j < 0 for i, v in enumerate(self.inputs) for j in v):
            raise QuantError("IntModel inputs must name earlier layers, one list per layer")
        self.meta = dict(meta or {})
        self.rounding = rounding
        users: dict[int, list[int]] = {}
        for i, v in enumerate(self.inputs):
            for j in v:
                users.setdefault(j, []).append(i)
        self.users = users
        #: when each value is read for the last time (to free it)
        self.last_use = {j: max(v) for j, v in users.items()}

    @property
    def rounding(self) -> str:
        return self._rounding

    @rounding.setter
    def rounding(self, mode: str) -> None:
        if mode not in KERNEL_ROUNDING:
            raise QuantError(f"unknown rounding {mode!r}; choose one of: {', '.join(KERNEL_ROUNDING)}")
        self._rounding = mode
        for layer in self.layers:
            layer.rounding = mode

    def input_qparams(self) -> QParams:
        return self.layers[0].qparams()

    def output_qparams(self) -> QParams:
        return self.layers[-1].qparams()

    @torch.no_grad()
    def forward_int(self, x: torch.Tensor, fuse_pool: bool = True) -> torch.Tensor:
        """Integer logits (int32 tensor of b-bit values) of the normalised float input ``x``.

        fuse_pool: run conv→maxpool pairs as one step, pooling the accumulators before
        requantization (identical integers, since requantization is monotone; about 4x less work).

        On the CPU a large batch runs in chunks whose largest tensor holds about ``cpu_chunk_elements``
        values: the int64 requantization passes are memory-bound, and batches of 1000 ResNet-20 images
        took 2.8x as long whole as in such chunks (bench/int_engine.py). Each image's integers depend on
        that image alone, so the result is the same.
        """
        if x.device.type != "cpu" or x.shape[0] <= 1 or not self.cpu_chunk_elements:
            return self._forward_int(x, fuse_pool)[0]
        outs, start = [], 0
        if self._peak_per_image is None:  # the largest tensor per image, from a first small chunk (unfused:
            head, peak = self._forward_int(x[:8], False)  # a fused conv's accumulators are its unpooled output)
            self._peak_per_image = max(1, peak // len(head))
            outs, start = [head], len(head)
        step = max(1, self.cpu_chunk_elements // self._peak_per_image)
        outs += [self._forward_int(x[i:i + step], fuse_pool)[0] for i in range(start, x.shape[0], step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    #: elements of the largest tensor of one CPU chunk (12 MB of int64), 0: no chunks. On ResNet-20 500k
    #: was 9% faster and 6M 55% slower (bench/int_engine.py --chunk-elements 0 500000 1500000 6000000);
    #: MobileNetV2's chunks of 786k were slower than 1.5M (more, smaller calls)
    cpu_chunk_elements = 1_500_000
    _peak_per_image: int | None = None

    def _forward_int(self, x: torch.Tensor, fuse_pool: bool) -> tuple[torch.Tensor, int]:
        """forward_int on one batch, and the number of elements of its largest tensor."""
        layers, inputs, users = self.layers, self.inputs, self.users
        n = len(layers) - 1
        vals: dict[int, torch.Tensor] = {0: layers[0](x)}
        peak = vals[0].numel()
        i = 1
        while i < n:
            layer = layers[i]
            args = [vals[j] for j in inputs[i]]
            if (fuse_pool and isinstance(layer, IntConv2d) and i + 1 < n and isinstance(layers[i + 1], IntMaxPool2d)
                    and users.get(i) == [i + 1] and layer.pool_fusable):
                vals[i + 1] = layer(*args, pool=layers[i + 1])
                step = 2
            else:
                vals[i] = layer(*args)
                step = 1
            peak = max(peak, vals[i + step - 1].numel())
            for j in set(inputs[i]):
                if self.last_use[j] <= i + step - 1:
                    del vals[j]
            i += step
        return vals[inputs[n][0]], peak

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantized float32 logits: scale * (forward_int(x) - zero_point)."""
        return self.layers[-1](self.forward_int(x))

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild the model (layer types, int tensors, qparams, M0/shift)."""
        return {"rounding": self.rounding, "meta": self.meta, "layers": [layer.spec() for layer in self.layers],
                "inputs": self.inputs}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "IntModel":
        layers = []
        for s in spec["layers"]:
            if s["type"] not in INT_LAYERS:
                raise QuantError(f"unknown integer layer {s['type']!r} in checkpoint; it was made by another "
                                 f"version of quant/, re-run PTQ.py")
            layers.append(INT_LAYERS[s["type"]].from_spec(s))
        return cls(layers, rounding=spec["rounding"], meta=spec.get("meta"), inputs=spec.get("inputs"))
