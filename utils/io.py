"""Atomic file writes and checkpoint I/O."""
from __future__ import annotations

import contextlib
import csv
import io
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterator

import torch

from quant.io import atomic_write_bytes, save_checkpoint  # noqa: F401  (defined with the package that needs them)

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_checkpoint(path: str | Path, hint: str) -> dict:
    """Load a checkpoint dict; a missing or unreadable file raises ``CLIError`` with ``hint``."""
    from utils.cli import CLIError
    path = Path(path)
    if not path.exists():
        raise CLIError(f"checkpoint {path} not found; {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CLIError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it and {hint}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CLIError(f"{path} is not a checkpoint of this project; {hint}")
    return ckpt


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<path>.lock`` (POSIX flock), so that processes appending to the same
    file one after another never lose a row; where flock is unavailable it is a no-op."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_csv_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to a CSV file atomically (rewrite to temp + rename), widening the header if needed.

    Concurrent writers are serialised by ``file_lock``: each reads the file only after the previous
    one has renamed its version into place."""
    path = Path(path)
    with file_lock(path):
        rows: list[dict[str, Any]] = []
        fields: list[str] = []
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or [])
                rows = list(reader)
        fields += [k for k in row if k not in fields]
        rows.append(row)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, out.getvalue().encode())


def versions() -> dict[str, str]:
    """torch / python versions and the git commit, for checkpoints and result rows. The commit gets a
    "+dirty" suffix when tracked files other than results/ and ckpt/ differ from it, i.e. the code
    that ran is not exactly that commit's."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
        if commit != "unknown" and subprocess.run(
                ["git", "diff", "--quiet", "HEAD", "--", ".", ":(exclude)results", ":(exclude)ckpt"],
                cwd=REPO_ROOT, capture_output=True, timeout=5).returncode == 1:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"torch": torch.__version__, "python": platform.python_version(), "git_commit": commit}
