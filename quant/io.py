"""Atomic file writes (temp file, fsync, rename), for every file the package writes; ``utils.io`` re-exports them."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch


def _file_mode(path: Path) -> int:
    """The permission bits ``path`` keeps: its own where it exists, else those of a new file under the umask
    (mkstemp's temp file is owner-only)."""
    if path.exists():
        return path.stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """torch.save ``obj`` atomically (never leaves a half-written checkpoint)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
