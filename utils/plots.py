"""PNG plots of PTQ.py --analyze, written atomically."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from utils.io import atomic_write_bytes


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_sensitivity(rows: list[dict[str, Any]], steps: list[dict[str, Any]], title: str, path: Path) -> None:
    """Left: each layer's logit SQNR alone and cumulative; right: the greedy search's accuracy against
    weight bytes (the Pareto curve), float accuracy dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(rows))
    a.plot(x, [r["sqnr_alone_db"] for r in rows], "o-", label="that layer alone")
    a.plot(x, [r["sqnr_cumulative_db"] for r in rows], "s-", label="layers 1..k")
    a.set_xticks(list(x), [r["layer"] for r in rows], rotation=45, ha="right", fontsize=8)
    a.set_ylabel("logit SQNR (dB)")
    a.set_title(title)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    if steps:
        b.plot([s["weight_bytes"] / 1024 for s in steps], [s["int_acc"] for s in steps], "o-",
               label="greedy per-layer weight bits")
        b.axhline(steps[0]["float_acc"], color="k", ls="--", lw=1, label="float")
        b.set_xlabel("weight size (KiB, packed)")
        b.set_ylabel("test accuracy, integer engine (%)")
        b.grid(alpha=0.3)
        b.legend(fontsize=8)
    _save(fig, path)
