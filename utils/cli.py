"""Helpers for the thin CLI scripts: one-line errors, device choice, seeding."""
from __future__ import annotations

import functools
import random
import sys
from typing import Callable

import numpy as np
import torch


class CLIError(RuntimeError):
    """A user-caused error; the scripts print it as one line and exit with status 2."""


RESUME_HINT = "interrupted; rerun the same command with --resume to continue from the last saved epoch"


def one_line_errors(main: Callable[[], int | None] | None = None, *,
                    on_interrupt: str = "interrupted; files are written atomically, so nothing is half-written"):
    """Run ``main``; print user errors (CLIError, DataError, ValueError from configs) as one line, exit 2.

    Ctrl-C prints ``on_interrupt`` and exits 130. Use as ``@one_line_errors`` or
    ``@one_line_errors(on_interrupt=RESUME_HINT)`` for scripts that can resume."""
    from data.errors import DataError

    def decorate(fn: Callable[[], int | None]) -> Callable[[], int]:
        @functools.wraps(fn)
        def wrapper() -> int:
            try:
                return fn() or 0
            except (CLIError, DataError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(on_interrupt, file=sys.stderr)
                return 130
        return wrapper

    return decorate(main) if main is not None else decorate


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda given but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise CLIError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_names(dataset: str, model: str) -> None:
    """--dataset / --model must name a registered model; otherwise a one-line error listing the valid ones."""
    from models import MODELS
    if dataset not in MODELS:
        raise CLIError(f"unknown --dataset {dataset!r}; choose one of: {', '.join(MODELS)}")
    if model not in MODELS[dataset]:
        raise CLIError(f"unknown --model {model!r}; choose one of: {', '.join(MODELS[dataset])}")


def format_match(pct: float) -> str:
    """A percentage of equal values for display: '100.00%' only when every value is equal, otherwise
    three decimals capped at 99.999%, so that a few differing logits never print as 100.00%."""
    return "100.00%" if pct >= 100 else f"{min(pct, 99.999):.3f}%"
