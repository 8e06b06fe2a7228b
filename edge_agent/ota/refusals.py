"""The (version, bundle digest) pairs a device refused for good, kept on disk across restarts.

An archive that verified but did not install, and a model the device rolled back itself, are
refused: no announcement (channel or directed, docs/protocol.md §8.5) installs them again. The
list lives in ``<staging root>/refused.models.json`` (a name no transfer id can take: it has a
dot), holds the newest 32 entries and is read on first use (no I/O in the constructor).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent.errors import StorageError
from edge_agent.ota import staging as disk

__all__ = ["REFUSED_FILE", "RefusedModels"]

_log = logging.getLogger("fedflock.ota")

REFUSED_FILE = "refused.models.json"
_FORMAT = 1
_MAX_REFUSED = 32


class RefusedModels:
    def __init__(self, root: Path, device_id: str) -> None:
        self.root, self.device_id = root, device_id
        self._refused: list[tuple[int, str]] | None = None

    @property
    def path(self) -> Path:
        return self.root / REFUSED_FILE

    def __contains__(self, key: object) -> bool:
        return key in self.entries()

    def entries(self) -> list[tuple[int, str]]:
        if self._refused is None:
            self._refused = []
            try:
                raw = disk.read_json(self.path)
            except StorageError as exc:
                _log.warning("%s: refused-models list unreadable, starting empty: %s", self.device_id, exc.reason)
                raw = None
            if isinstance(raw, dict) and raw.get("format") == _FORMAT and isinstance(raw.get("refused"), list):
                self._refused = [(entry[0], entry[1]) for entry in raw["refused"] if _is_entry(entry)]
        return self._refused

    def add(self, key: tuple[int, str]) -> None:
        """Refuse ``key`` (persisted; a write failure is logged and the refusal kept in memory)."""
        others = [k for k in self.entries() if k != key]
        self._refused = refused = [*others[-(_MAX_REFUSED - 1) :], key]
        try:
            disk.make_directory(self.root)
            entries = [[v, d] for v, d in refused]
            disk.write_json_atomic(self.path, {"format": _FORMAT, "refused": entries})
        except StorageError as exc:  # still refused in memory; a restart may try it once more
            _log.warning("%s: cannot persist the refusal of v%d: %s", self.device_id, key[0], exc.reason)


def _is_entry(entry: object) -> bool:
    """A refused-list entry: ``[version, digest]``."""
    if not isinstance(entry, list) or len(entry) != 2:
        return False
    version, digest = entry
    return isinstance(version, int) and not isinstance(version, bool) and isinstance(digest, str)
