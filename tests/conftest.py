"""Shared fixtures and helpers: real data where present (skip with a reason otherwise), repository paths,
scripts run as processes, the LiteRT guard, and the small models and qparams several test files use (the graph
test models are in graph_models.py)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from data import DataError, load_split
from models import build_model
from quant.qparams import QParams

REPO = Path(__file__).resolve().parent.parent

# One intra-op thread: the tensors here are small, and on a 2-core machine with any other load two OpenMP
# threads spin-wait for each other (measured: 18 in-process zoo/model tests 239 s with 2 threads, 47 s with 1).
# Scripts run by run_script keep their own defaults.
torch.set_num_threads(1)


def real_split(dataset: str, split: str):
    """The real split via the project's normal lookup, or skip the test saying how to provide it."""
    try:
        return load_split(dataset, split, verbose=False)
    except DataError as e:
        pytest.skip(f"real {dataset} data not available: {e}")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def case(*values, quick: bool, id: str | None = None):
    """One case of a parametrized grid, marked ``slow`` unless ``quick``: the quick subset
    (``python -m pytest -m "not slow"``) keeps a sample of the grid that still covers each value of each
    axis, the full run (CI) all of it."""
    return pytest.param(*values, id=id, marks=() if quick else pytest.mark.slow)


def run_script(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300):
    """Run a repository script with the current interpreter; returns the CompletedProcess."""
    import subprocess
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def check_resume(common: tuple[str, ...], epochs: int, tmp_path: Path) -> tuple[dict, dict]:
    """Run ``common`` (a script and its flags, ``--epochs epochs``) interrupted after one epoch and
    resumed, and uninterrupted; assert the resumed run skipped the finished epoch. Returns the two
    final checkpoints (resumed, uninterrupted) for the caller to compare."""
    a, b = tmp_path / "resumed.pt", tmp_path / "straight.pt"
    r = run_script(*common, "--out", str(a), "--stop-after", "1")
    assert r.returncode == 0, r.stderr
    assert torch.load(a, weights_only=False)["epoch"] == 1
    r = run_script(*common, "--out", str(a), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and f"epoch   1/{epochs}" not in r.stdout and f"epoch   2/{epochs}" in r.stdout
    r = run_script(*common, "--out", str(b))
    assert r.returncode == 0, r.stderr
    ca, cb = (torch.load(p, weights_only=False) for p in (a, b))
    assert ca["epoch"] == cb["epoch"] == epochs
    return ca, cb


def randomise_bn(model: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters drawn from ``g``;
    returns the model in eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def randomise_bn_seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``randomise_bn`` with a generator seeded with ``seed``."""
    return randomise_bn(model, torch.Generator().manual_seed(seed))


needs_litert = pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                                  reason="the LiteRT interpreter is not installed: pip install ai-edge-litert")


def qp(scale: float, zp: int) -> QParams:
    return QParams(torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.int32), -128, 127)


SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def synthetic_setup(name: str, dataset: str, seed: int = 1):
    """Random conv weights, non-trivial BN running stats, and a last layer set (not trained) to a
    nearest-prototype classifier of 10 random images, so the logits have real margins; returns
    (model, batch(n) -> (x, y))."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomise_bn(build_model(name, dataset), g)
    protos = torch.randn(10, *SHAPES[dataset], generator=g)
    with torch.no_grad():
        feats = model[:-1](protos)
        feats = feats - feats.mean(0)
        model[-1].weight.copy_(feats / feats.norm(dim=1, keepdim=True))
        model[-1].bias.zero_()

    def batch(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return protos[y] + 0.1 * torch.randn(n, *SHAPES[dataset], generator=g), y
    return model, batch
