"""Evaluation of the float, fake-quant and integer models side by side."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch


@torch.no_grad()
def compare(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], models: dict[str, Callable[[torch.Tensor],
            torch.Tensor]], agree: tuple[str, str] | None = ("fq", "int"), progress: bool = False) -> dict[str, Any]:
    """Accuracy (%) of each model in ``models`` (name -> callable giving logits) over ``batches`` of
    (x, y), the seconds each spent, and the share (%) of inputs where the two models named in ``agree``
    give the same argmax. Returns {'<name>_acc', '<name>_seconds', 'agreement', 'n'}.
    """
    correct = {k: 0 for k in models}
    seconds = {k: 0.0 for k in models}
    same, n = 0, 0
    it: Iterable[Any] = batches
    if progress:
        from tqdm import tqdm
        it = tqdm(batches, desc="evaluate", leave=False)
    for x, y in it:
        preds = {}
        for name, f in models.items():
            t0 = time.perf_counter()
            preds[name] = f(x).argmax(dim=1)
            seconds[name] += time.perf_counter() - t0
            correct[name] += int((preds[name] == y).sum())
        if agree is not None and all(a in preds for a in agree):
            same += int((preds[agree[0]] == preds[agree[1]]).sum())
        n += len(y)
    out: dict[str, Any] = {"n": n}
    for name in models:
        out[f"{name}_acc"] = 100.0 * correct[name] / max(n, 1)
        out[f"{name}_seconds"] = seconds[name]
    if agree is not None and all(a in models for a in agree):
        out["agreement"] = 100.0 * same / max(n, 1)
    return out
