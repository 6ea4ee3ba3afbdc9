"""``QuantConfig``: every quantization setting in one validated dataclass."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable

from quant.errors import QuantError

ROUNDINGS = ("ref", "builtin", "xnnpack", "tflm")
#: the QuantConfig fields a per-layer setting (``QuantConfig.layers``) may override
LAYER_FIELDS = ("weight_bits", "act_bits", "per_channel", "observer", "weight_range", "percentile")
QAT_QUANTIZERS = ("ste", "lsq", "lsq+")


@dataclass
class QuantConfig:
    """Settings of one quantized model (serialised into every checkpoint and result row).

    The defaults are the scripts' (PTQ.py's flags take theirs from here, and QAT.py's PTQ start too):
    8 bits, per-channel conv weights, per-tensor fully-connected weights, observer 'mse', weight_range
    'minmax', percentile 99.99, ema_momentum 0.9, calib_batches 32, rounding 'ref', no per-layer settings. So
    ``quant.quantize(model, QuantConfig())`` calibrated on PTQ.py's batches gives PTQ.py's figures.

    weight_bits / act_bits: 2..8. Weights are symmetric, narrow range
        [-(2^(b-1)-1), 2^(b-1)-1], zero point 0. Activations (the normalised input and
        every layer output) are asymmetric, signed, [-2^(b-1), 2^(b-1)-1].
    per_channel: per-output-channel scales for conv weights (depthwise included).
    fc_per_channel: per-output-channel scales for fully-connected weights too. Off by default: the
        classic TFLite converter writes FULLY_CONNECTED weights per tensor, and so do the tables here.
        LiteRT's three kernel sets and TFLM run per-channel FULLY_CONNECTED weights with the same
        rounding as per tensor (checked bit for bit in tests/test_quant_export_tflite.py).
    observer: activation calibrator, a name from ``quant.observers.OBSERVERS``: 'minmax', 'ema', 'mse'
        (least squared error), 'percentile' (the ``percentile``-th percentile of each tail), 'entropy'
        (least KL divergence, TensorRT's calibrator).
    weight_range: how the symmetric range of the current weights is chosen (per channel or tensor),
        a name from ``quant.observers.WEIGHT_RANGES``: 'minmax' (max |w|), 'mse' (max |w| clipped to
        the least squared quantization error) or 'percentile' (that percentile of |w|).
    percentile: for the 'percentile' calibrators, in (50, 100]; 100 is min/max.
    ema_momentum: for the 'ema' observer, the weight of the old value:
        running = m * running + (1 - m) * batch_value (the first batch initialises).
    calib_batches: how many training batches PTQ calibration sees.
    rounding: requantization of the integer engine: 'ref' (LiteRT reference kernels),
        'builtin' (LiteRT optimized/ruy kernels), 'xnnpack' (LiteRT default delegate),
        'tflm' (TensorFlow Lite Micro's reference kernels).
    layers: per-layer settings, ``((pattern, {field: value, ...}), ...)``; later entries win. A pattern
        (``fnmatch``) matches a layer's module path (``'conv1'``, ``'layer2.*'``), its float module's
        type name (``'Linear'``), its op kind (``'add'``) or ``'input'`` (the model input's quantizer).
        Fields: ``LAYER_FIELDS``. A layer's ``act_bits`` is the bits of its output; ``weight_bits``
        of its weights. ``for_layer`` gives the settings one layer gets.
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    fc_per_channel: bool = False
    observer: str = "mse"
    weight_range: str = "minmax"
    ema_momentum: float = 0.9
    calib_batches: int = 32
    rounding: str = "ref"
    percentile: float = 99.99
    layers: tuple = ()

    def __post_init__(self) -> None:
        from quant.observers import OBSERVERS, WEIGHT_RANGES

        for name in ("weight_bits", "act_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise QuantError(f"{name} must be an integer in 2..8, got {v!r}; pick a bit width from 2 to 8")
        for name in ("per_channel", "fc_per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise QuantError(f"{name} must be True or False, got {getattr(self, name)!r}")
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
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50.0 < p <= 100.0:
            raise QuantError(f"percentile must be a number in (50, 100], got {p!r}; 99.99 is a good default")
        layers = []
        for entry in self.layers:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], dict)):
                raise QuantError(f"a per-layer setting is (pattern, {{field: value}}), got {entry!r}")
            bad = sorted(set(entry[1]) - set(LAYER_FIELDS))
            if bad:
                raise QuantError(f"per-layer field(s) {', '.join(bad)} unknown; per layer you can set "
                                 f"{', '.join(LAYER_FIELDS)}")
            layers.append((entry[0], dict(entry[1])))
        self.layers = tuple(layers)
        for _, over in self.layers:
            replace(self, layers=(), **over)  # validates the values

    def for_layer(self, names: Iterable[str]) -> "QuantConfig":
        """The settings of the layer known by ``names`` (its path, type name, op kind): the entries of
        ``layers`` whose pattern matches one of them, applied in order over this config."""
        names = [n for n in names if n]
        over: dict[str, Any] = {}
        for pattern, fields_ in self.layers:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                over.update(fields_)
        return replace(self, **over) if over else self

    @property
    def tag(self) -> str:
        """Short id such as ``w4a8-per_channel`` for file names, test ids and result rows (``-fc_per_channel``
        with per-channel fully-connected weights, ``-mixed`` when some layers have their own bits)."""
        mixed = any({"weight_bits", "act_bits"} & set(f) for _, f in self.layers)
        return (f"w{self.weight_bits}a{self.act_bits}-{'per_channel' if self.per_channel else 'per_tensor'}"
                f"{'-fc_per_channel' if self.fc_per_channel else ''}{'-mixed' if mixed else ''}")

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

    def to_row(self) -> dict[str, Any]:
        """``to_dict`` for a CSV row: the per-layer settings as one string (``pattern:field=value;...``)."""
        d = self.to_dict()
        d["layers"] = ";".join(f"{p}:" + ",".join(f"{k}={v}" for k, v in f.items()) for p, f in self.layers)
        return d


def parse_layer_settings(text: str) -> tuple[str, dict[str, Any]]:
    """One per-layer setting from the command line: ``PATTERN:field=value,...``, e.g. ``fc:weight_bits=8``
    or ``layer1.*:weight_bits=4,act_bits=8``; ``wBaB`` is short for weight_bits=B,act_bits=B."""
    pattern, sep, rest = text.partition(":")
    if not sep or not pattern or not rest:
        raise QuantError(f"per-layer setting {text!r} is not PATTERN:field=value,...; e.g. fc:weight_bits=8")
    fields_: dict[str, Any] = {}
    for item in rest.split(","):
        short = re.fullmatch(r"w(\d)a(\d)", item.strip())
        if short:
            fields_.update(weight_bits=int(short[1]), act_bits=int(short[2]))
            continue
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in LAYER_FIELDS:
            raise QuantError(f"per-layer setting {item!r} in {text!r}: use field=value with a field of "
                             f"{', '.join(LAYER_FIELDS)}, or wBaB")
        value = value.strip()
        fields_[key] = (value.lower() in ("1", "true", "yes") if key == "per_channel" else
                        int(value) if key.endswith("_bits") and value.isdigit() else
                        float(value) if key == "percentile" else value)
    return pattern, fields_


@dataclass
class QATConfig:
    """Settings of quantization-aware training (``quant.qat``), on top of a ``QuantConfig``.

    quantizer: 'ste' -- moving-average (EMA) activation ranges and min/max weight ranges with the
        straight-through estimator (the seed's method); 'lsq' -- learned step sizes (Esser et al.
        2019) initialised from the calibrated (PTQ) scales; 'lsq+' -- LSQ with the activations' offset
        (zero point) learned too (Bhalgat et al. 2020), initialised from the calibrated one.
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
