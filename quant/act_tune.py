"""Activation step sizes learned on the calibration set: PTQ without labels, weights untouched.

After calibration (and AdaRound), every activation quantizer's step size s is learned so that the
quantized network's outputs match the float network's on the calibration images. Adam minimises

    KL(softmax(float logits) || softmax(quantized logits))   (over dim 1, mean over images and positions)

over the step sizes alone, with LSQ's gradient for s (Esser et al. 2019; ``quant.modules.LSQQuantize``);
weights, biases, BN statistics and zero points stay as they are. This is LAPQ's idea (Nahshan et al.
2019: choose the clipping ranges for the network's loss, not each tensor's own error) with a gradient
instead of a Powell search, and the activation half of what BRECQ / QDrop learn together with the
rounding, here for the whole network at once, after AdaRound.

Each quantizer gets its own Adam learning rate, ``lr`` times its calibrated step (so every step moves
by about ``lr`` of itself per iteration), decayed to 0 on a cosine. The forward is the QAT training
graph with BN frozen (eval-mode BN statistics; ``quantize`` leaves no dropout), which equals the
integer engine's up to the requantization rounding.

The learned steps are written back as each quantizer's range [(qmin - zp) s, (qmax - zp) s], observer
frozen, so the model stays an ordinary calibrated fake-quant model: conversion, export and checkpoints
need nothing new, and a later ``quant.calibrate`` would record new ranges over them.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from quant.config import QATConfig
from quant.errors import QuantError
from quant.methods import calibration_samples, fake_quant_off, hold_range
from quant.qat import _prepare_lsq, act_quantizers, clamp_lsq_, set_bn_frozen


@dataclass
class ActTuneConfig:
    """Adam iterations, batch size (samples), learning rate relative to each step size, calibration
    images used (at most)."""

    iterations: int = 500
    batch_size: int = 64
    lr: float = 0.01
    samples: int = 1024

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1 or self.samples < 1 or self.lr <= 0:
            raise QuantError("act_tune needs iterations, batch_size and samples >= 1 and lr > 0")


def _kl(logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, 1)
    return (target_logp.exp() * (target_logp - logp)).sum(1).mean()


def act_tune(qmodel: nn.Module, batches: Iterable[Any], cfg: ActTuneConfig | None = None, seed: int = 0,
             progress: bool = False) -> dict[str, tuple[float, float]]:
    """Learn the step size of every activation quantizer of a calibrated fake-quant model in place (see
    the module docstring). Returns {quantizer path: (calibrated step, learned step)}."""
    cfg = cfg or ActTuneConfig()
    fqs = act_quantizers(qmodel)
    if not fqs:
        return {}
    data = calibration_samples(batches, cfg.samples, "act_tune")
    was = qmodel.training
    qmodel.eval()
    with torch.no_grad(), fake_quant_off(qmodel):
        target = torch.cat([torch.log_softmax(qmodel(data[i:i + 256]), 1) for i in range(0, len(data), 256)])
    qmodel.train(was)
    if target.dim() < 2:
        raise QuantError("act_tune needs a model whose output has a class dimension (dim 1)")

    work = copy.deepcopy(qmodel)
    _prepare_lsq(work, QATConfig(quantizer="lsq"))
    lsqs = act_quantizers(work)
    if len(lsqs) != len(fqs):
        raise QuantError("act_tune: the model's activation quantizers changed while being copied")
    for p in work.parameters():
        p.requires_grad_(False)
    steps = [q.scale for q in lsqs]
    for s in steps:
        s.requires_grad_(True)
    set_bn_frozen(work, True)
    work.train()  # the differentiable fake-quant path; the quantized graph holds no dropout (quant.graph)
    groups = [{"params": [s], "lr": cfg.lr * float(s.detach().abs().max())} for s in steps]
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    first = last = float("nan")
    for it in range(cfg.iterations):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * it / cfg.iterations))
        idx = torch.randint(0, len(data), (min(cfg.batch_size, len(data)),), generator=gen)
        loss = _kl(work(data[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp_lsq_(work)
        last = float(loss.detach())
        first = last if it == 0 else first
    if progress:
        print(f"  act_tune: KL to the float outputs {first:.4g} (first batch) -> {last:.4g} (last)", flush=True)

    names = {id(m): name for name, m in qmodel.named_modules()}
    report = {}
    for fq, lsq in zip(fqs, lsqs):
        old, qp = fq.qparams(), lsq.qparams()
        scale, zp = qp.scale.double(), qp.zero_point.double()
        if fq.observer.symmetric:  # choose_qparams: scale = max(-lo, hi) / ((qmax - qmin) / 2)
            hi = scale * (qp.qmax - qp.qmin) / 2
            lo = -hi
        else:
            lo, hi = (qp.qmin - zp) * scale, (qp.qmax - zp) * scale
        hold_range(fq, lo, hi)
        report[names.get(id(fq), "?")] = (float(old.scale.max()), float(fq.qparams().scale.max()))
    return report
