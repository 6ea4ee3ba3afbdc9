"""``QuantConfig``: every quantization setting in one validated dataclass."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from quant.errors import QuantError

ROUNDINGS = ("ref", "builtin", "xnnpack", "tflm")
QAT_QUANTIZERS = ("ste", "lsq")


@dataclass
class QuantConfig:
    """Settings of one quantized model (serialised into every checkpoint and result row).

    weight_bits / act_bits: 2..8. Weights are symmetric, narrow range
        [-(2^(b-1)-1), 2^(b-1)-1], zero point 0. Activations (the normalised input and
        every layer output) are asymmetric, signed, [-2^(b-1), 2^(b-1)-1].
    per_channel: per-output-channel scales for conv weights (fully-connected weights are
        always per tensor, as in the TFLite spec).
    observer: activation observer name from ``quant.observers.OBSERVERS`` ('minmax', 'ema').
    weight_range: how the symmetric range of the current weights is chosen (per channel or tensor):
        'minmax' (max |w|) or 'mse' (max |w| clipped to the least squared quantization error,
        ``quant.observers.WeightMSEObserver``).
    ema_momentum: for the 'ema' observer, the weight of the old value:
        running = m * running + (1 - m) * batch_value (the first batch initialises).
    calib_batches: how many training batches PTQ calibration sees.
    rounding: requantization of the integer engine: 'ref' (LiteRT reference kernels),
        'builtin' (LiteRT optimized/ruy kernels), 'xnnpack' (LiteRT default delegate),
        'tflm' (TensorFlow Lite Micro's reference kernels).
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    observer: str = "minmax"
    weight_range: str = "minmax"
    ema_momentum: float = 0.9
    calib_batches: int = 32
    rounding: str = "ref"

    def __post_init__(self) -> None:
        from quant.observers import OBSERVERS, WEIGHT_RANGES

        for name in ("weight_bits", "act_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise QuantError(f"{name} must be an integer in 2..8, got {v!r}; pick a bit width from 2 to 8")
        if not isinstance(self.per_channel, bool):
            raise QuantError(f"per_channel must be True or False, got {self.per_channel!r}")
        if self.observer not in OBSERVERS:
            raise QuantError(f"unknown observer {self.observer!r}; choose one of: {', '.join(OBSERVERS)}")
        if self.weight_range not in WEIGHT_RANGES:
            raise QuantError(f"unknown weight_range {self.weight_range!r}; choose one of: {', '.join(WEIGHT_RANGES)}")
        m = self.ema_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise QuantError(f"ema_momentum must be a number in [0, 1), got {m!r}; 0.9 is a good default")
        c = self.calib_batches
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise QuantError(f"calib_batches must be a positive integer, got {c!r}")
        if self.rounding not in ROUNDINGS:
            raise QuantError(f"unknown rounding {self.rounding!r}; choose one of: {', '.join(ROUNDINGS)}")

    @property
    def tag(self) -> str:
        """Short id such as ``w4a8-per_channel`` for file names, test ids and result rows."""
        return f"w{self.weight_bits}a{self.act_bits}-{'per_channel' if self.per_channel else 'per_tensor'}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (for checkpoints and CSV rows)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Inverse of ``to_dict``; unknown keys raise ``QuantError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QuantError(f"unknown QuantConfig field(s) {', '.join(unknown)}; the checkpoint was made by "
                             f"another version of quant/, re-run PTQ.py to remake it")
        return cls(**d)


@dataclass
class QATConfig:
    """Settings of quantization-aware training (``quant.qat``), on top of a ``QuantConfig``.

    quantizer: 'ste' -- moving-average (EMA) activation ranges and min/max weight ranges with the
        straight-through estimator (the seed's method); 'lsq' -- learned step sizes (Esser et al.
        2019) initialised from the calibrated (PTQ) scales.
    freeze_bn: epoch (fractional allowed) after which BatchNorm statistics are frozen; from then on
        fused Conv+BN layers fold with the running statistics and train exactly the graph the integer
        engine runs. 0 freezes from the start.
    freeze_observers: epoch after which activation ranges stop moving ('ste'; LSQ scales are
        learned and have no observer to freeze).
    ema_momentum: weight of the old value in the activation EMA: running = m * running + (1 - m) * batch.
    """

    quantizer: str = "ste"
    freeze_bn: float = 1.0
    freeze_observers: float = 2.0
    ema_momentum: float = 0.99

    def __post_init__(self) -> None:
        if self.quantizer not in QAT_QUANTIZERS:
            raise QuantError(f"unknown QAT quantizer {self.quantizer!r}; choose one of: {', '.join(QAT_QUANTIZERS)}")
        for name in ("freeze_bn", "freeze_observers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise QuantError(f"{name} must be a number of epochs >= 0, got {v!r}")
        m = self.ema_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise QuantError(f"ema_momentum must be a number in [0, 1), got {m!r}; 0.99 is a good QAT default")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
