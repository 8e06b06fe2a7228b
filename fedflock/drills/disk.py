"""A size-limited directory for the disk-full drill: a real full filesystem, not a simulation.

:class:`SizeLimitedDir` mounts a tmpfs of ``size_bytes`` on an empty directory (``mount -t
tmpfs -o size=...``; needs root or CAP_SYS_ADMIN, which the drill machines and CI containers
have). :meth:`fill` then writes a filler file until the kernel answers ENOSPC, and :meth:`free`
deletes it: every write of the device store in between meets the same error a full SD card
gives. :meth:`close` unmounts.

Where mounting is not permitted, :meth:`start` raises :class:`DiskFullUnavailable` naming the
reason; the drill then says so instead of pretending (no silent fallback).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from types import TracebackType

from edge_agent.errors import StorageError

__all__ = ["DiskFullUnavailable", "SizeLimitedDir"]

_BLOCK = 64 * 1024


class DiskFullUnavailable(StorageError):
    code = "disk_full_unavailable"


class SizeLimitedDir:
    """A tmpfs of ``size_bytes`` mounted on ``path`` (created if missing, must be empty)."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self._mounted = False
        self.filler = path / "filler.bin"

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if any(self.path.iterdir()):
            raise DiskFullUnavailable(f"{self.path} is not empty; refusing to mount over it")
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes}", "tmpfs", str(self.path)],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DiskFullUnavailable(f"cannot run mount for a tmpfs at {self.path}: {exc}") from exc
        if done.returncode != 0:
            who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} (not root)"
            raise DiskFullUnavailable(
                f"cannot mount a {self.size_bytes}-byte tmpfs at {self.path} as {who}: {done.stderr.strip()}"
            )
        self._mounted = True

    def fill(self) -> int:
        """Write the filler until the filesystem is full; the bytes written."""
        written = 0
        block = b"\0" * _BLOCK
        with open(self.filler, "ab", buffering=0) as out:
            while True:
                try:
                    written += out.write(block) or 0
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise StorageError(f"filling {self.path} failed: {exc}") from exc
                    break
        return written

    def free(self) -> None:
        """Delete the filler: the space is back."""
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def close(self) -> None:
        if not self._mounted:
            return
        done = subprocess.run(["umount", "-l", str(self.path)], capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            raise StorageError(f"cannot unmount the drill tmpfs at {self.path}: {done.stderr.strip()}")
        self._mounted = False

    def __enter__(self) -> SizeLimitedDir:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
