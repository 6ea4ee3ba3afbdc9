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


def flat_values(x: torch.Tensor) -> torch.Tensor:
    """Every element of ``x`` as a 1-D tensor, in memory order: a view wherever ``x`` is dense in some
    order of its dimensions (channels-last activations included), for reductions that ignore the order.
    ``reshape(-1)`` would copy a channels-last tensor into the default layout first (``torch.aminmax`` does
    the same internally): about ten times the reduction's own cost, once per activation and training step."""
    if x.is_contiguous():
        return x.view(-1)
    p = x.permute(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    return p.view(-1) if p.is_contiguous() else p.reshape(-1)


class Observer(nn.Module):
    """Base: holds ``min_val``/``max_val`` buffers (scalars, or (C,) per channel along ``axis``).

    bits, symmetric, narrow: passed to ``choose_qparams``.
    """

    name = "base"
    #: set by ``quant.sync_act_ranges`` (not saved): maps a batch's (min, max) to the range of the global
    #: batch it is one slice of (a distributed run's all-reduce); None: the batch alone
    reduce: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __init__(self, bits: int, symmetric: bool = False, narrow: bool = False, axis: int | None = None,
                 momentum: float = 0.9, percentile: float = 99.99) -> None:
        super().__init__()
        self.bits, self.symmetric, self.narrow, self.axis = bits, symmetric, narrow, axis
        self.momentum, self.percentile = momentum, percentile
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
            return torch.aminmax(flat_values(x.detach().float()))
        return torch.aminmax(self._channels(x), dim=1)

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            if x.numel() == 0:
                return x
            lo, hi = self._batch_range(x)
            if self.reduce is not None:
                lo, hi = self.reduce(lo, hi)
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


class _WeightRangeObserver(MinMaxObserver):
    """Base of the symmetric weight ranges that look at the whole weight tensor at each observation (a
    dynamic weight quantizer): ``_amax(w)`` gives each channel's clipped max |w| from w as (channels,
    values)."""

    def _amax(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen or x.numel() == 0:
            return x
        if not self.symmetric:
            raise QuantError(f"the weight range {type(self).__name__} is symmetric; build it with symmetric=True")
        hi = self._amax(x.detach().float().reshape(1, -1) if self.axis is None else self._channels(x))
        lo = -hi
        if self.axis is None:
            lo, hi = lo[0], hi[0]
        if not self.initialized:
            self.min_val, self.max_val = lo, hi
        else:
            self._update(lo, hi)
        return x


class WeightMSEObserver(_WeightRangeObserver):
    """Symmetric weight range clipped to minimise the squared quantization error, per channel along
    ``axis`` (or per tensor). Used by a dynamic weight quantizer: every observation sees the whole
    weight tensor, so the search runs on all its values, not a sample. Each channel's max |w| is
    scaled by every ratio a in {0.30, 0.31, ..., 1.00}, and the ratio whose fake quantization of
    that channel has the least squared error wins (ties: the widest). Weights beyond the clipped
    range saturate; at 3-4 bits that costs less than the coarser step of the full range.
    """

    ratios = torch.arange(100, 29, -1, dtype=torch.float64) / 100

    def _amax(self, w: torch.Tensor) -> torch.Tensor:
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
        return best


class WeightPercentileObserver(_WeightRangeObserver):
    """Symmetric weight range: the ``percentile``-th percentile of |w|, per channel along ``axis`` (or per
    tensor); 100 is max |w|."""

    def _amax(self, w: torch.Tensor) -> torch.Tensor:
        return torch.quantile(w.abs(), self.percentile / 100.0, dim=1)


class HistogramObserver(MinMaxObserver):
    """Base of the calibrators that choose a clipped range from a histogram (per tensor only).

    One pass, bounded memory: ``bins`` counts over the running [min, max]. When a batch falls outside
    it, the range widens and the old counts move to the new bins holding their centres. When the
    qparams are first asked for, ``_clip(hist, lo, hi)`` picks the range, which replaces min / max.
    """

    bins = 2048
    #: leave exact zeros out of the histogram (they are exact at any range: the zero point)
    skip_zeros = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.axis is not None:
            raise QuantError(f"the {self.name} observer is per tensor; use minmax or ema for per-channel ranges")
        self.hist: torch.Tensor | None = None
        self._edges: tuple[float, float] = (0.0, 0.0)

    def reset(self) -> None:
        super().reset()
        self.hist = None

    def _rebin(self, lo: float, hi: float) -> None:
        """Move the counts onto ``bins`` bins over [lo, hi] (each old bin to the new bin of its centre)."""
        old_lo, old_hi = self._edges
        width = (old_hi - old_lo) / self.bins
        centres = old_lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)
        idx = ((centres - lo) / max(hi - lo, 1e-30) * self.bins).long().clamp(0, self.bins - 1)
        self.hist = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.hist)
        self._edges = (lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen or x.numel() == 0:
            return x
        if self.reduce is not None:
            raise QuantError(f"the {self.name} calibrator's histogram is not reduced across processes; calibrate "
                             f"every process on the same batches, before quant.sync_act_ranges")
        super().forward(x)
        lo, hi = float(self.min_val), float(self.max_val)
        if hi <= lo:
            hi = lo + 1e-8
        if self.hist is None:
            self.hist, self._edges = torch.zeros(self.bins, dtype=torch.float64), (lo, hi)
        elif (lo, hi) != self._edges:
            self._rebin(lo, hi)
        flat = flat_values(x.detach().float()).cpu()
        if self.skip_zeros:
            flat = flat[flat != 0]
        self.hist += torch.histc(flat, self.bins, lo, hi).double()
        return x

    def _clip(self, hist: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
        raise NotImplementedError

    def calculate_qparams(self) -> QParams:
        if self.hist is not None and self.initialized and self.hist.sum() > 0:
            lo, hi = self._clip(self.hist, *self._edges)
            self.hist = None
            self.min_val = torch.tensor(min(lo, 0.0), dtype=self.min_val.dtype, device=self.min_val.device)
            self.max_val = torch.tensor(max(hi, 0.0), dtype=self.max_val.dtype, device=self.max_val.device)
        return super().calculate_qparams()


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """Clips each tail of the recorded distribution at ``percentile`` (e.g. 99.99: the range holds all but
    0.01% of the values above and 0.01% below); 100 is min / max."""

    def _clip(self, hist: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
        if self.percentile >= 100.0:
            return lo, hi
        width = (hi - lo) / self.bins
        cdf = torch.cumsum(hist, 0) / hist.sum()
        tail = 1.0 - self.percentile / 100.0
        first = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=cdf.dtype)))          # bin of the low quantile
        last = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=cdf.dtype)))     # bin of the high one
        return lo + first * width, lo + min(last + 1, self.bins) * width


@register_observer("entropy")
class EntropyObserver(HistogramObserver):
    """The range whose quantization loses the least information: TensorRT's entropy calibrator (Migacz,
    2017), for asymmetric ranges. Each candidate keeps the bins [i0, i1) of the histogram around zero
    (both ends shrink by the same share of their side) and folds the clipped counts into its edge bins
    (P); Q merges the kept bins without the clipped counts into 2^bits levels and spreads each level's
    count evenly over the bins where P is not empty (so clipping costs: P's edge bins hold counts Q
    lacks; Q is floored at 1e-4 where P is not empty); the least KL(P || Q) wins (ties: the widest).
    Candidates run from 2^bits bins (one bin per level) to the full range. Meant for 8 bits, as
    TensorRT uses it: at 3 bits a spike in the distribution (Fashion-MNIST's background pixels, the
    model input) made a narrow window win and the cnn fell to 9.5% (results/ptq_methods.csv)."""

    #: a ReLU's zeros would sit in Q's first level spread over its bins, and make the narrowest
    #: windows look best (measured: Fashion-MNIST cnn, every ReLU output clipped to ~1% of its range)
    skip_zeros = True

    def _clip(self, hist: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
        n, levels = self.bins, 2 ** self.bits
        width = (hi - lo) / n
        zero = min(max(int(round(-lo / width)), 0), n)        # edge nearest to 0: the sides shrink towards it
        best, best_kl = (0, n), None
        for keep in range(n, levels - 1, -max(1, n // 256)):
            r = keep / n
            i0, i1 = int(round(zero - zero * r)), int(round(zero + (n - zero) * r))
            if i1 - i0 < levels:
                break
            p = hist[i0:i1].clone()
            p[0] += hist[:i0].sum()
            p[-1] += hist[i1:].sum()
            # Q: split the window into `levels` chunks; each chunk's count spread over its non-empty bins
            chunk = torch.div(torch.arange(i1 - i0) * levels, i1 - i0, rounding_mode="floor")
            nonzero = (p > 0).double()
            total = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, hist[i0:i1])
            count = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, nonzero)
            q = torch.where(nonzero > 0, (total / count.clamp_min(1))[chunk], 0.0)
            ps, qs = p / p.sum(), q / q.sum().clamp_min(1e-30)
            mask = ps > 0
            kl = float((ps[mask] * torch.log(ps[mask] / qs[mask].clamp_min(1e-4))).sum())
            if best_kl is None or kl < best_kl - 1e-12:
                best, best_kl = (i0, i1), kl
        return lo + best[0] * width, lo + best[1] * width


@register_observer("mse")
class MSEObserver(HistogramObserver):
    """The range [a min, a max] with the least expected squared quantization error, a in {0.20, 0.21,
    ..., 1.00} (ties: the widest), from the histogram of every recorded value: each bin counts as its
    centre, fake-quantized with the candidate's qparams. Values beyond the range saturate; at 2-4 bits
    that costs less than the coarse step of the full range, while at 8 bits a tail of rare large values
    is usually kept. (A sample of the values, as before, misses that tail and clipped it at 8 bits.)"""

    def _clip(self, hist: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
        width = (hi - lo) / self.bins
        centres = (lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)).float()
        best, best_err = (lo, hi), None
        for a in range(100, 19, -1):
            c_lo, c_hi = lo * a / 100, hi * a / 100
            qp = choose_qparams(torch.tensor(c_lo), torch.tensor(c_hi), self.bits, self.symmetric, self.narrow)
            err = float((hist * (fake_quantize(centres, qp) - centres).double().pow(2)).sum())
            if best_err is None or err < best_err * (1 - 1e-9):
                best, best_err = (c_lo, c_hi), err
        return best


#: how weight ranges are chosen (QuantConfig.weight_range): observer class for the weight quantizer
WEIGHT_RANGES: dict[str, type[Observer]] = {"minmax": MinMaxObserver, "mse": WeightMSEObserver,
                                            "percentile": WeightPercentileObserver}


def build_observer(name: str, bits: int, symmetric: bool = False, narrow: bool = False, axis: int | None = None,
                   momentum: float = 0.9, percentile: float = 99.99) -> Observer:
    """Make the observer registered as ``name``."""
    if name not in OBSERVERS:
        raise QuantError(f"unknown observer {name!r}; choose one of: {', '.join(OBSERVERS)}")
    return OBSERVERS[name](bits, symmetric=symmetric, narrow=narrow, axis=axis, momentum=momentum,
                           percentile=percentile)
