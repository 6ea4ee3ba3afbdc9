"""Quantization-aware training helpers: prepare a calibrated fake-quant model for training, freeze
BatchNorm statistics and activation ranges, keep LSQ step sizes positive.

    qmodel = quant.quantize(float_model, cfg)
    quant.calibrate(qmodel, train_batches, cfg.calib_batches)      # PTQ initialisation
    quant.prepare_qat(qmodel, quant.QATConfig(quantizer="lsq"))    # trainable quantizers
    ... train; quant.set_bn_frozen(qmodel, True); quant.set_act_observers(qmodel, False) ...
    imodel = quant.convert(qmodel)                                 # uses the learned / frozen qparams

The float weights stay the optimiser's ("shadow") parameters: every forward quantizes them anew and
nothing is written back. After both freezes, a fused Conv+BN layer folds with its running statistics
and every range is fixed, so the training forward is the integer engine's graph (up to the
requantization rounding, which eval mode simulates exactly).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from quant.config import QATConfig
from quant.errors import QuantError
from quant.modules import FakeQuantize, LSQQuantize, QConvBNReLU, QModule, _QWeighted
from quant.observers import EMAObserver
from quant.transforms import keep_attr


def act_quantizers(model: nn.Module) -> list[FakeQuantize]:
    """Every activation quantizer (the input's and each layer output's; a shared one once), in
    execution order; not those with constant qparams (``FakeQuantize.fixed``: LOGISTIC's output)."""
    out: dict[int, FakeQuantize] = {}
    for m in model.modules():
        if isinstance(m, QModule):
            for fq in [*m.input_fqs, getattr(m, "act_quant", None)]:
                if fq is not None and not fq.fixed:
                    out.setdefault(id(fq), fq)
    return list(out.values())


def set_act_observers(model: nn.Module, enabled: bool) -> None:
    """Let activation observers record (True) or freeze them (False); weight quantizers are untouched."""
    for fq in act_quantizers(model):
        if not isinstance(fq, LSQQuantize):
            fq.observer.frozen = not enabled


def set_bn_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (True) the BatchNorm statistics of every fused Conv+BN layer: train mode then folds with
    the running statistics and no longer updates them."""
    for m in model.modules():
        if isinstance(m, QConvBNReLU):
            m.bn_frozen = frozen


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """PyTorch momentum of the running statistics of every fused Conv+BN layer during QAT
    (running = (1 - momentum) * running + momentum * batch)."""
    if not 0 < momentum <= 1:
        raise QuantError(f"BN momentum must be in (0, 1], got {momentum!r}; PyTorch's default is 0.1")
    for m in model.modules():
        if isinstance(m, QConvBNReLU):
            m.bn.momentum = momentum


def set_fold_grad_scale(model: nn.Module, enabled: bool) -> None:
    """Scale (True) the conv weight gradient of every fused Conv+BN layer by (sigma_run / gamma)^2 in
    training, so that its folded weight takes the steps a plain conv's weight would (QConvBNReLU)."""
    for m in model.modules():
        if isinstance(m, QConvBNReLU):
            m.fold_grad_scale = enabled


@contextlib.contextmanager
def frozen_act_observers(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate without moving any range: activation observers frozen inside, restored on exit."""
    saved = [(fq, fq.observer.frozen) for fq in act_quantizers(model)]
    set_act_observers(model, False)
    try:
        yield model
    finally:
        for fq, frozen in saved:
            fq.observer.frozen = frozen


def sync_act_ranges(model: nn.Module,
                    reduce: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    """Make every activation observer combine each batch's (min, max) with ``reduce`` before it moves (a
    distributed run's all-reduce over the ranks' slices of the global batch: ``utils.distributed``), or
    stop (None). Weight ranges need none: every rank holds the same weights. Not saved with the model."""
    for fq in act_quantizers(model):
        fq.observer.reduce = reduce


def clamp_lsq_(model: nn.Module) -> None:
    """Keep every LSQ step size positive (call after each optimiser step)."""
    for m in model.modules():
        if isinstance(m, LSQQuantize):
            m.clamp_()


def _prepare_ste(model: nn.Module, qcfg: QATConfig) -> None:
    """EMA observers (initialised with the calibrated ranges) for activations, recording; weight
    ranges follow the current weights (dynamic min/max)."""
    for m in model.modules():
        if isinstance(m, _QWeighted):
            m.weight_quant.fixed = False  # QAT moves the weights: their ranges follow them again
            m.weight_quant.observer.frozen = False
    for fq in act_quantizers(model):
        fq.qparams()  # an mse observer clips its range on first use
        old = fq.observer
        ema = EMAObserver(old.bits, symmetric=old.symmetric, narrow=old.narrow, axis=old.axis,
                          momentum=qcfg.ema_momentum)
        ema.min_val, ema.max_val = old.min_val.clone(), old.max_val.clone()
        fq.observer = ema


def _prepare_lsq(model: nn.Module, qcfg: QATConfig) -> None:
    """Replace every quantizer by an ``LSQQuantize`` initialised from its calibrated QParams (weights:
    the min/max scale of the (folded) weights at calibration, i.e. the PTQ scale). A quantizer shared by
    several layers (a concatenation's inputs) becomes one shared LSQ quantizer."""
    swapped: dict[int, LSQQuantize] = {}

    def lsq(fq: FakeQuantize) -> LSQQuantize:
        if isinstance(fq, LSQQuantize) or (fq.fixed and not fq.dynamic):  # constant qparams stay
            return fq
        if id(fq) not in swapped:  # LSQ+: an offset for the asymmetric (activation) quantizers, not weights
            swapped[id(fq)] = LSQQuantize.from_fake_quant(fq, learn_offset=qcfg.quantizer == "lsq+" and not fq.dynamic)
        return swapped[id(fq)]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantize):
                setattr(parent, name, lsq(child))
    for m in model.modules():
        if isinstance(m, QModule):
            m.attach_input(*[lsq(fq) for fq in m.input_fqs])


#: quantizer name -> function turning a calibrated fake-quant model into a trainable one
QAT_PREPARE: dict[str, Callable[[nn.Module, QATConfig], None]] = {"ste": _prepare_ste, "lsq": _prepare_lsq,
                                                                  "lsq+": _prepare_lsq}


def prepare_qat(model: nn.Module, qcfg: QATConfig) -> nn.Module:
    """Make a calibrated model from ``quant.quantize`` trainable in place (see ``QATConfig.quantizer``)
    and return it. BN statistics and activation observers start unfrozen."""
    if getattr(model, "quant_config", None) is None:
        raise QuantError("prepare_qat needs a model made by quant.quantize and calibrated")
    for fq in act_quantizers(model):
        if not fq.observer.initialized:
            raise QuantError("prepare_qat needs a calibrated model; run quant.calibrate first")
    QAT_PREPARE[qcfg.quantizer](model, qcfg)
    set_bn_frozen(model, False)
    keep_attr(model, "qat_config", qcfg)
    return model
