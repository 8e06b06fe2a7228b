"""Atomic file writes with an explicit mode: a killed process leaves the old file or the new one.

Shared by the device (keys and certificates it enrolls, signing keys) and the server's PKI.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edge_agent.errors import StorageError

__all__ = ["atomic_write"]


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync and rename.

    The temporary file is created with ``mode`` already set, so a private key is never readable
    by others, not even for a moment.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
