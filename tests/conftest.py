"""Shared fixtures: real data where present (skip with a reason otherwise), repository paths."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data import DataError, load_split  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def real_split(dataset: str, split: str):
    """The real split via the project's normal lookup, or skip the test saying how to provide it."""
    try:
        return load_split(dataset, split, verbose=False)
    except DataError as e:
        pytest.skip(f"real {dataset} data not available: {e}")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def run_script(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300):
    """Run a repository script with the current interpreter; returns the CompletedProcess."""
    import subprocess
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
