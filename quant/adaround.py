"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Each weight w of a layer, with step s (its channel's scale, from the layer's weight range), becomes
s * clamp(floor(w / s) + h, qmin, qmax) with h in {0, 1} learned, layer by layer in graph order, on
the calibration set. During learning h is the rectified sigmoid h(V) = clamp(sigmoid(V) (zeta - gamma)
+ gamma, 0, 1) (zeta = 1.1, gamma = -0.1), V initialised so that h(V) = w / s - floor(w / s), and
Adam minimises

    || act(W~ x~ + b) - act(W x + b) ||^2  (summed over channels, mean over samples and positions)
      + lambda * sum(1 - |2 h(V) - 1|^beta)

where x~ is the input the layer gets from the network with quantized weights (the layers before already
rounded) and float activations, and x the float network's (the paper's asymmetric reconstruction, with
the layer's fused activation). Taking x~ with the activations quantized as well measured worse:
Fashion-MNIST cnn W4A4, 90.44% against 90.89% (notes/methods.md). The regulariser is off for the first ``warmup`` share of the iterations,
then beta anneals from 20 to 2 (cosine in the paper, linear in AIMET; here linear), pushing every h to
0 or 1. At the end h = 1 exactly where V >= 0 (h(V) >= 0.5).

The result is written as float weights that lie on the integer grid (a fused BN's conv weight is set
so that the folded weight does) and the layer's weight quantizer is fixed at the scale it was learned
with (``FakeQuantize.fixed``), so conversion, export and later calibrations keep the learned
integers: every weight is its floor or its ceiling, as ``rounding_choice`` reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from quant.errors import QuantError
from quant.methods import _pre_activation, calibration_samples, layer_inputs, refit_weight_range, set_folded_weight, weighted_layers
from quant.modules import _activation, _QWeighted
from quant.qparams import round_half_away

ZETA, GAMMA = 1.1, -0.1


@dataclass
class AdaRoundConfig:
    """iterations per layer, batch size (samples), Adam learning rate on V, regulariser weight lambda,
    share of iterations without regulariser, beta's start and end, calibration images used (at most)."""

    iterations: int = 2000
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    samples: int = 1024

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1 or self.samples < 1 or self.lr <= 0:
            raise QuantError("AdaRound needs iterations, batch_size and samples >= 1 and lr > 0")
        if not 0.0 <= self.warmup < 1.0:
            raise QuantError(f"AdaRound warmup is a share of the iterations in [0, 1), got {self.warmup}")


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _grid(layer: _QWeighted) -> tuple[torch.Tensor, int, int]:
    """(step per weight, broadcastable; qmin; qmax) of the layer's weight quantizer, fixed at the current
    folded weights."""
    refit_weight_range(layer)
    qp = layer.weight_quant.qparams()
    scale, _ = qp.shaped(layer.weight)
    return scale.float(), qp.qmin, qp.qmax


def adaround_layer(layer: _QWeighted, x_q: torch.Tensor, x_f: torch.Tensor, cfg: AdaRoundConfig,
                   seed: int = 0) -> dict[str, float]:
    """Learn the rounding of one layer from its quantized-network inputs ``x_q`` and float-network inputs
    ``x_f``; writes the rounded weights and fixes the weight quantizer. Returns the reconstruction error
    (mean squared) of nearest rounding and of the learned rounding on these samples."""
    w, b = layer.float_weight_bias()
    w, b = w.detach(), (None if b is None else b.detach())
    step, qmin, qmax = _grid(layer)
    base = torch.floor(w / step)
    rest = (w / step - base).clamp(0.0, 1.0)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA).clamp_min(1e-6) - 1.0).clamp(-20.0, 20.0))
    with torch.no_grad():
        target = _activation(_pre_activation(layer, x_f, False), layer.act)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    warm = int(cfg.warmup * cfg.iterations)

    def weights(h: torch.Tensor) -> torch.Tensor:
        return step * torch.clamp(base + h, qmin, qmax)

    def recon(wq: torch.Tensor, idx: Any = slice(None)) -> torch.Tensor:
        y = _activation(layer._op(x_q[idx], wq, b), layer.act)  # noqa: SLF001
        return (y - target[idx]).pow(2).sum(1).mean() if y.dim() > 1 else (y - target[idx]).pow(2).mean()

    with torch.no_grad():
        nearest = float(recon(step * torch.clamp(round_half_away(w / step), qmin, qmax)))
    for it in range(cfg.iterations):
        idx = torch.randint(0, len(x_q), (min(cfg.batch_size, len(x_q)),), generator=gen)
        h = rectified_sigmoid(v)
        loss = recon(weights(h), idx)
        if it >= warm:
            t = (it - warm) / max(cfg.iterations - warm, 1)
            beta = cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * t
            loss = loss + cfg.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = weights((v >= 0).float())
        learned = float(recon(hard))
        set_folded_weight(layer, hard)
    layer.weight_quant.fixed = True
    return {"nearest": nearest, "adaround": learned}


def adaround(qmodel: nn.Module, batches: Iterable[Any], cfg: AdaRoundConfig | None = None,
             progress: bool = False) -> dict[str, dict[str, float]]:
    """AdaRound every conv / linear of a calibrated quantized model in place (graph order); returns each
    layer's reconstruction error with nearest and with learned rounding. Re-calibrate the activations
    afterwards (``quant.calibrate``: the fixed weights stay) so later ranges see the rounded weights."""
    cfg = cfg or AdaRoundConfig()
    data = [calibration_samples(batches, cfg.samples, "adaround")]
    report = {}
    layers = weighted_layers(qmodel)
    for i, (path, layer) in enumerate(layers):
        x_q = layer_inputs(qmodel, layer, data, float_acts=True)
        x_f = layer_inputs(qmodel, layer, data, float_net=True)
        report[path] = adaround_layer(layer, x_q, x_f, cfg, seed=i)
        if progress:
            r = report[path]
            print(f"  adaround {path}: reconstruction error {r['nearest']:.4g} (nearest) -> {r['adaround']:.4g}",
                  flush=True)
    return report


def rounding_choice(w: torch.Tensor, w_int: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per weight: True where the integer ``w_int`` is the clamped floor or ceiling of w / step."""
    r = w / step
    lo = torch.clamp(torch.floor(r), qmin, qmax)
    hi = torch.clamp(torch.ceil(r), qmin, qmax)
    return (w_int == lo) | (w_int == hi)
