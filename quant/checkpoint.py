"""Save / load quantized (fake-quant) and integer models as checkpoint dicts, atomically.

A fake-quant checkpoint holds {'kind': 'quant.fakequant', 'config', 'float_signature', 'state_dict',
'meta'}; loading rebuilds ``quantize(model, config)`` and loads the state dict (float shadow
weights, BN statistics, observer ranges and quantizer flags). An integer checkpoint holds
{'kind': 'quant.integer', 'config', 'float_signature', 'model': IntModel.spec(), 'meta'}: int weights,
int32 biases, qparams, M0/shift. Both are written to a temp file beside the target, then renamed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from quant.config import QuantConfig
from quant.errors import QuantError
from quant.integer import IntModel
from quant.transforms import float_signature, quantize
from quant.io import save_checkpoint

FAKEQUANT = "quant.fakequant"
INTEGER = "quant.integer"


def _describe(meta: dict[str, Any] | None) -> str:
    meta = meta or {}
    named = "/".join(str(meta[k]) for k in ("dataset", "model") if k in meta)
    return f"model {named}" if named else "another model"


def _read(path: str | Path, kind: str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise QuantError(f"checkpoint {path} not found; make it with PTQ.py (or QAT.py) first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QuantError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it and re-run PTQ.py") from e
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "a float checkpoint") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise QuantError(f"{path} is not a {kind} checkpoint (it holds {found}); pass the matching file")
    return ckpt


def _check_model(path: str | Path, ckpt: dict[str, Any], model: nn.Module | None) -> None:
    if model is None:
        return
    mine, theirs = float_signature(model), ckpt.get("float_signature")
    if mine != theirs:
        diff = next((f"{a} vs {b}" for a, b in zip(theirs or [], mine) if a != b),
                    f"{len(theirs or [])} layers vs {len(mine)}")
        raise QuantError(f"{path} was made for {_describe(ckpt.get('meta'))}, not this one (layer {diff}); "
                         f"pick the checkpoint of this model or re-run PTQ.py for it")


def save_quantized(path: str | Path, qmodel: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Atomically save a fake-quant model made by ``quantize`` (``meta``: e.g. dataset/model names, metrics)."""
    cfg = getattr(qmodel, "quant_config", None)
    if cfg is None:
        raise QuantError("save_quantized needs a model made by quant.quantize")
    save_checkpoint({"kind": FAKEQUANT, "config": cfg.to_dict(), "float_signature": qmodel.float_signature,
                     "state_dict": qmodel.state_dict(), "meta": dict(meta or {})}, path)


def load_quantized(path: str | Path, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """(fake-quant model in eval mode, meta) from ``path``; ``model`` is a float model of the same architecture.

    A checkpoint of another architecture raises ``QuantError`` naming the first differing layer.
    """
    ckpt = _read(path, FAKEQUANT)
    _check_model(path, ckpt, model)
    qmodel = quantize(model, QuantConfig.from_dict(ckpt["config"]))
    try:
        qmodel.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise QuantError(f"{path} does not fit this model ({str(e).splitlines()[0]}); re-run PTQ.py") from e
    return qmodel.eval(), ckpt["meta"]


def save_integer(path: str | Path, imodel: IntModel, meta: dict[str, Any] | None = None) -> None:
    """Atomically save an integer model made by ``convert``."""
    save_checkpoint({"kind": INTEGER, "config": imodel.meta.get("config"),
                     "float_signature": imodel.meta.get("float_signature"), "model": imodel.spec(),
                     "meta": dict(meta or {})}, path)


def integer_meta(path: str | Path) -> dict[str, Any]:
    """The meta of the integer checkpoint ``path`` (e.g. its dataset and model names), without a model."""
    return dict(_read(path, INTEGER).get("meta") or {})


def load_integer(path: str | Path, model: nn.Module | None = None) -> tuple[IntModel, dict[str, Any]]:
    """(integer model, meta) from ``path``. With ``model`` (a float model), a checkpoint made for
    another architecture raises ``QuantError``."""
    ckpt = _read(path, INTEGER)
    _check_model(path, ckpt, model)
    return IntModel.from_spec(ckpt["model"]), ckpt["meta"]
