"""Shared fixtures: real data where present (skip with a reason otherwise), repository paths."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from data import DataError, load_split

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
