"""Model transforms: ``quantize`` (module swap + fusion), ``calibration_mode`` / ``calibrate``, ``convert``.

Supported structures: an ``nn.Sequential`` whose entries are layers or nested ``nn.Sequential``s
(any depth; the execution order is the order of the leaves). Supported layers: Conv2d, BatchNorm2d
(right after a Conv2d), Linear, ReLU, MaxPool2d, Flatten, and the pass-throughs Identity and
Dropout. A custom module with its own ``forward`` cannot be walked safely (its data flow is unknown)
and raises ``QuantError``; express it as an ``nn.Sequential`` (``nn.Flatten`` instead of ``x.view``).

Fusion (greedy, longest pattern first, across nested Sequentials): Conv2d→BatchNorm2d→ReLU,
Conv2d→BatchNorm2d, Conv2d→ReLU, Linear→ReLU. The first module of a match is replaced by the fused
layer and the rest by ``nn.Identity``, so every other key of the float state dict is unchanged.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from quant.config import ROUNDINGS, QuantConfig
from quant.errors import QuantError
from quant.integer import Dequantize, IntModel, QuantizeInput, find_converter
from quant.modules import PASS_THROUGH, QUANT_PATTERNS, FakeQuantize, QMaxPool2d, QModule, _QWeighted, \
    act_quantizer

SUPPORTED = "Conv2d, BatchNorm2d, Linear, ReLU, MaxPool2d, Flatten, Identity, Dropout"


def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted path, module) of every layer in execution order; raises for unsupported containers."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, m: nn.Module) -> None:
        if isinstance(m, nn.Sequential):
            for name, child in m.named_children():
                walk(f"{prefix}.{name}" if prefix else name, child)
        elif isinstance(m, (QModule, *PASS_THROUGH)) or not any(True for _ in m.children()):
            out.append((prefix, m))
        else:
            raise QuantError(f"cannot quantize container {prefix or 'model'!r} of type {type(m).__name__}: "
                             f"only nn.Sequential trees are supported; rewrite it as an nn.Sequential")

    walk("", model)
    return out


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def float_signature(model: nn.Module) -> list[str]:
    """One string per layer (path, type, parameter shapes): identifies an architecture in checkpoints."""
    sig = []
    for path, m in leaves(model):
        shapes = ",".join(f"{k}{list(v.shape)}" for k, v in m.state_dict().items()
                          if isinstance(v, torch.Tensor) and ("quant" not in k))
        sig.append(f"{path}:{type(m).__name__}({shapes})")
    return sig


def quantize(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """A fake-quantized copy of ``model`` (``model`` is not modified).

    Layers are swapped by the type patterns of ``quant.modules.QUANT_PATTERNS`` (fusing Conv→BN→ReLU,
    Conv→BN, Conv→ReLU, Linear→ReLU); the first quantized layer gets the input quantizer (the
    normalised input quantized once at act_bits). Quantizers start enabled with observers recording:
    calibrate (``calibrate`` / ``calibration_mode``) before evaluating. An unsupported layer raises
    ``QuantError`` naming it. The result carries ``quant_config`` and ``float_signature`` attributes.
    """
    if not isinstance(cfg, QuantConfig):
        raise QuantError(f"quantize needs a QuantConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Sequential):
        raise QuantError(f"quantize supports nn.Sequential models, got {type(model).__name__}; "
                         f"rewrite the model as an nn.Sequential")
    signature = float_signature(model)
    qmodel = copy.deepcopy(model)
    items = leaves(qmodel)
    for path, m in items:
        if isinstance(m, QModule):
            raise QuantError(f"layer {path!r} is already quantized; pass the float model to quantize")
    i = 0
    while i < len(items):
        for cls in QUANT_PATTERNS:
            n = len(cls.pattern)
            mods = [m for _, m in items[i:i + n]]
            if len(mods) == n and all(type(m) is t for m, t in zip(mods, cls.pattern)):
                _set(qmodel, items[i][0], cls.from_float(mods, cfg))
                for path, _ in items[i + 1:i + n]:
                    _set(qmodel, path, nn.Identity())
                i += n
                break
        else:
            path, m = items[i]
            if isinstance(m, PASS_THROUGH):
                i += 1
                continue
            hint = " (BatchNorm2d must directly follow a Conv2d)" if isinstance(m, nn.BatchNorm2d) else ""
            raise QuantError(f"unsupported layer {path!r} of type {type(m).__name__}{hint}; quantize supports "
                             f"{SUPPORTED} in nn.Sequential trees")
    _link(qmodel, cfg)
    qmodel.quant_config = cfg
    qmodel.float_signature = signature
    return qmodel


def _link(qmodel: nn.Module, cfg: QuantConfig) -> None:
    """Give the first quantized layer the input quantizer and tell each layer which quantizer feeds it."""
    current: FakeQuantize | None = None
    previous: nn.Module | None = None
    for _, m in leaves(qmodel):
        if isinstance(m, nn.Identity):
            continue  # what fusion left behind
        if isinstance(m, QMaxPool2d) and isinstance(previous, _QWeighted):
            # a layer's output straight into max pooling: QAT quantizes after the pooling (same values)
            previous.quantize_after_pool = m.quantizes_input_after = True
        previous = m
        if not isinstance(m, QModule):
            continue
        if current is None:
            m.input_quant = act_quantizer(cfg)
            current = m.input_quant
        m.attach_input(current)
        if isinstance(m, _QWeighted):
            current = m.act_quant
            m.requant = cfg.rounding
    if current is None:
        raise QuantError("the model has no layer to quantize")


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
        if isinstance(m, _QWeighted):
            m.requant = mode


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Let observers record (True) or freeze them so qparams stay fixed (False)."""
    for fq in quantizers(model):
        fq.observer.frozen = not enabled


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

    rounding: 'ref' | 'builtin' | 'xnnpack' (default: ``qmodel.quant_config.rounding``).
    clamp: 'bits' clamps every activation to its b-bit range (the fake-quant semantics); 'int8'
    clamps to [-128, 127] as LiteRT does for b < 8 bits stored in int8 tensors (fused ReLU still
    clamps at the zero point).
    """
    if clamp not in ("bits", "int8"):
        raise QuantError(f"clamp must be 'bits' or 'int8', got {clamp!r}")
    cfg = getattr(qmodel, "quant_config", None)
    rounding = rounding or (cfg.rounding if cfg is not None else "ref")
    layers: list[nn.Module] = []
    qp = None
    for path, m in leaves(qmodel):
        if isinstance(m, QModule) and m.input_quant is not None:
            qp = m.input_quant.qparams()
            layers.insert(0, QuantizeInput(qp, clamp))  # quantization commutes with leading pass-throughs
        convert_fn: Callable[..., Any] | None = find_converter(m)
        if convert_fn is None:
            raise QuantError(f"cannot convert layer {path!r} of type {type(m).__name__}; convert a model made "
                             f"by quant.quantize")
        layer, qp = convert_fn(m, qp, clamp)
        if layer is not None:
            layers.append(layer)
    if qp is None:
        raise QuantError("the model has no quantized layer; build it with quant.quantize")
    layers.append(Dequantize(qp))
    meta = {"config": cfg.to_dict() if cfg is not None else None,
            "float_signature": getattr(qmodel, "float_signature", None)}
    return IntModel(layers, rounding=rounding, meta=meta)
