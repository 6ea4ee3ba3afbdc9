"""Observers: ``forward(x)`` records a range, ``calculate_qparams()`` turns it into QParams.

Registry by name (``OBSERVERS``); ``build_observer(name, ...)`` makes one. A frozen observer
(``observer.frozen = True``) passes tensors through without recording, so its qparams stay fixed.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from quant.errors import QuantError
from quant.qparams import QParams, choose_qparams, fake_quantize, qrange, round_half_away

OBSERVERS: dict[str, type["Observer"]] = {}


def register_observer(name: str) -> Callable[[type["Observer"]], type["Observer"]]:
    """Class decorator adding an observer to ``OBSERVERS`` under ``name``."""
    def deco(cls: type["Observer"]) -> type["Observer"]:
        OBSERVERS[name] = cls
        cls.name = name
        return cls
    return deco


class Observer(nn.Module):
    """Base: holds ``min_val``/``max_val`` buffers (scalars, or (C,) per channel along ``axis``).

    bits, symmetric, narrow: passed to ``choose_qparams``.
    """

    name = "base"

    def __init__(self, bits: int, symmetric: bool = False, narrow: bool = False, axis: int | None = None,
                 momentum: float = 0.9) -> None:
        super().__init__()
        self.bits, self.symmetric, self.narrow, self.axis = bits, symmetric, narrow, axis
        self.momentum = momentum
        self.frozen = False
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    @property
    def initialized(self) -> bool:
        return self.min_val.numel() > 0

    def reset(self) -> None:
        """Forget the recorded range."""
        self.min_val = torch.empty(0, device=self.min_val.device)
        self.max_val = torch.empty(0, device=self.max_val.device)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` detached, in float, as (channels along ``axis``, values)."""
        x = x.detach().float()
        return x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axis is None:
            return torch.aminmax(x.detach().float())
        return torch.aminmax(self._channels(x), dim=1)

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            if x.numel() == 0:
                return x
            lo, hi = self._batch_range(x)
            if not self.initialized:
                self.min_val, self.max_val = lo.clone(), hi.clone()
            else:
                self._update(lo, hi)
        return x

    def calculate_qparams(self) -> QParams:
        """QParams of the recorded range (see ``choose_qparams``)."""
        if not self.initialized:
            raise QuantError("an observer has seen no data; calibrate the model (quant.calibrate or "
                             "quant.calibration_mode) before evaluating or converting it")
        return choose_qparams(self.min_val, self.max_val, self.bits, self.symmetric, self.narrow, self.axis)

    def get_extra_state(self) -> Any:
        return {"frozen": self.frozen}

    def set_extra_state(self, state: Any) -> None:
        self.frozen = bool(state["frozen"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name in ("min_val", "max_val"):  # the buffers' shape is only known once data was seen
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, narrow={self.narrow}, axis={self.axis}, " \
               f"frozen={self.frozen}"


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running min / max over every batch seen."""

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)


@register_observer("ema")
class EMAObserver(Observer):
    """Moving-average min / max: running = momentum * running + (1 - momentum) * batch.

    The first batch initialises the running values.
    """

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        m = self.momentum
        self.min_val = m * self.min_val + (1 - m) * lo
        self.max_val = m * self.max_val + (1 - m) * hi


@register_observer("mse")
class MSEObserver(MinMaxObserver):
    """Min / max range clipped to minimise the mean squared quantization error (per tensor only).

    While recording, it keeps the running min / max and a seeded random sample of up to
    ``per_batch`` values of every batch (at most ``max_values`` in all). When the qparams are first
    asked for, it scales the range [min, max] by each ratio a in {0.20, 0.21, ..., 1.00} and keeps
    the one whose fake quantization of the sample has the least squared error (ties: the widest);
    the clipped range then replaces min / max. Values beyond it saturate, which at 2-4 bits costs
    less than the coarser step a full range needs.
    """

    per_batch, max_values = 4096, 1 << 18

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.axis is not None:
            raise QuantError("the mse observer is per tensor; use minmax or ema for per-channel ranges")
        self._samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen and x.numel() and sum(len(s) for s in self._samples) < self.max_values:
            flat = x.detach().float().reshape(-1).cpu()
            idx = torch.randint(0, flat.numel(), (min(self.per_batch, flat.numel()),), generator=self._gen)
            self._samples.append(flat[idx])
        return super().forward(x)

    def reset(self) -> None:
        super().reset()
        self._samples = []

    def calculate_qparams(self) -> QParams:
        if self._samples and self.initialized:
            sample = torch.cat(self._samples)
            self._samples = []
            lo, hi = self.min_val.float().cpu(), self.max_val.float().cpu()
            best, best_err = 1.0, None
            for a in torch.arange(100, 19, -1).tolist():
                qp = choose_qparams(lo * a / 100, hi * a / 100, self.bits, self.symmetric, self.narrow)
                err = (fake_quantize(sample, qp) - sample).pow(2).mean().item()
                if best_err is None or err < best_err:
                    best, best_err = a / 100, err
            self.min_val, self.max_val = (self.min_val * best, self.max_val * best)
        return super().calculate_qparams()


class WeightMSEObserver(MinMaxObserver):
    """Symmetric weight range clipped to minimise the squared quantization error, per channel along
    ``axis`` (or per tensor). Used by a dynamic weight quantizer: every observation sees the whole
    weight tensor, so the search runs on all its values, not a sample. Each channel's max |w| is
    scaled by every ratio a in {0.30, 0.31, ..., 1.00}, and the ratio whose fake quantization of
    that channel has the least squared error wins (ties: the widest). Weights beyond the clipped
    range saturate; at 3-4 bits that costs less than the coarser step of the full range.
    """

    ratios = torch.arange(100, 29, -1, dtype=torch.float64) / 100

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen or x.numel() == 0:
            return x
        if not self.symmetric:
            raise QuantError("the weight mse range is symmetric; build it with symmetric=True")
        w = x.detach().float().reshape(1, -1) if self.axis is None else self._channels(x)
        amax = w.abs().amax(1)                                          # (C,)
        qmin, qmax = qrange(self.bits, self.symmetric, self.narrow)
        best, best_err = amax.clone(), None
        for a in self.ratios.tolist():
            clip = amax * a
            step = (clip / qmax).clamp_min(torch.finfo(torch.float32).tiny)[:, None]
            q = torch.clamp(round_half_away(w / step), qmin, qmax) * step
            err = (q - w).pow(2).sum(1)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best, best_err = torch.where(better, clip, best), torch.where(better, err, best_err)
        lo, hi = -best, best
        if self.axis is None:
            lo, hi = lo[0], hi[0]
        if not self.initialized:
            self.min_val, self.max_val = lo, hi
        else:
            self._update(lo, hi)
        return x


#: how weight ranges are chosen (QuantConfig.weight_range): observer class for the weight quantizer
WEIGHT_RANGES: dict[str, type[Observer]] = {"minmax": MinMaxObserver, "mse": WeightMSEObserver}


def build_observer(name: str, bits: int, symmetric: bool = False, narrow: bool = False, axis: int | None = None,
                   momentum: float = 0.9) -> Observer:
    """Make the observer registered as ``name``."""
    if name not in OBSERVERS:
        raise QuantError(f"unknown observer {name!r}; choose one of: {', '.join(OBSERVERS)}")
    return OBSERVERS[name](bits, symmetric=symmetric, narrow=narrow, axis=axis, momentum=momentum)
