"""Which signed release statements a device may act on: replay and downgrade rules (issue #7).

With trusted keys configured every MODEL carries a signed release statement stamped ``issued_at``
(docs/protocol.md §8.5). A valid signature proves the server said it *once*; these rules stop an
old statement from being replayed to move the device backwards:

* **Directed replay.** A directed MODEL (the server's word for this device) is acted on only if
  it was issued at or after the newest directed statement this device accepted before (the same
  time is allowed only for the very same ``(version, bundle_digest)``: a retained MODEL delivered
  again). That record, :class:`DirectedRecord`, is kept in ``<staging root>/release.authority.json``.
* **Channel after directed.** A channel announcement issued before that directed statement is
  overridden by it (the directed-MODEL rule of §8.5, kept across restarts).
* **Downgrade.** A version below the installed one (or the installed version with another bundle)
  is installed only from a directed MODEL issued *after* the statement the installed model came
  with (its ``issued_at`` is in the model store's pointer): a rollback that the server ordered
  later than the install. An older statement naming the baseline is a replay.

:func:`statement_refusal` is the pure decision; :class:`ReleaseAuthority` persists the record
(read on first use, written atomically; a write failure is logged and the record kept in memory).

**Re-signed statements.** A server re-signs the statements it keeps retained before they expire
(``broker_server/pki/statement_refresh.py``): same fields, same ``issued_at``, a later
``expires_at`` and a new signature. Keeping ``issued_at`` keeps every rule above as it was — a
re-signed copy is the same decision, never a newer one (so re-signing an old baseline statement
cannot make it outrank the install that came after it). :func:`same_release` tells such a copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from edge_agent.errors import StorageError
from edge_agent.ota import staging as disk
from edge_agent.ota.reports import InstalledModel
from edge_agent.protocol.model_messages import ModelMessage

__all__ = ["AUTHORITY_FILE", "DirectedRecord", "ReleaseAuthority", "same_release", "statement_refusal"]

_log = logging.getLogger("fedflock.ota")

AUTHORITY_FILE = "release.authority.json"
_FORMAT = 1


@dataclass(frozen=True)
class DirectedRecord:
    """The newest directed statement a device accepted."""

    issued_at: int
    version: int
    digest: str


def statement_refusal(
    model: ModelMessage, *, directed: bool, installed: InstalledModel | None, last_directed: DirectedRecord | None
) -> str | None:
    """Why a correctly signed ``model`` must not be acted on (None: it may); see the module docstring."""
    issued = model.issued_at
    if last_directed is not None:
        same = (model.version, model.bundle_digest) == (last_directed.version, last_directed.digest)
        if directed and (issued < last_directed.issued_at or (issued == last_directed.issued_at and not same)):
            return (
                f"replayed directed MODEL: v{model.version} issued at {issued} is older than the directed "
                f"v{last_directed.version} issued at {last_directed.issued_at} this device acted on"
            )
        if not directed and issued < last_directed.issued_at:
            return f"the directed v{last_directed.version} issued at {last_directed.issued_at} overrides it"
    if installed is None:
        return None
    older = model.version < installed.version or (
        model.version == installed.version and model.bundle_digest != installed.digest
    )
    if older and not directed:
        return f"downgrade from v{installed.version} refused: only a directed MODEL may order one"
    if older and issued <= installed.issued_at:
        return (
            f"downgrade from v{installed.version} refused: the statement for v{model.version} (issued at {issued}) "
            f"is not newer than the one v{installed.version} was installed with (issued at {installed.issued_at})"
        )
    return None


def same_release(model: ModelMessage, other: ModelMessage | None) -> bool:
    """Whether ``model`` is ``other``, or ``other`` re-signed (only ``expires_at`` and ``signature`` differ)."""
    if other is None:
        return False
    return replace(model, expires_at=0, signature="") == replace(other, expires_at=0, signature="")


class ReleaseAuthority:
    """The persisted :class:`DirectedRecord` of one device (``root``: the download staging root)."""

    def __init__(self, root: Path, device_id: str) -> None:
        self.root, self.device_id = root, device_id
        self._loaded = False
        self._directed: DirectedRecord | None = None

    @property
    def path(self) -> Path:
        return self.root / AUTHORITY_FILE

    def last_directed(self) -> DirectedRecord | None:
        if not self._loaded:
            self._loaded = True
            self._directed = self._read()
        return self._directed

    def accept_directed(self, model: ModelMessage) -> None:
        """Remember ``model`` as the newest directed statement acted on (no-op when not newer)."""
        last = self.last_directed()
        if last is not None and model.issued_at <= last.issued_at:
            return
        self._directed = DirectedRecord(model.issued_at, model.version, model.bundle_digest)
        record = {"issued_at": model.issued_at, "version": model.version, "digest": model.bundle_digest}
        try:
            disk.make_directory(self.root)
            disk.write_json_atomic(self.path, {"format": _FORMAT, "directed": record})
        except StorageError as exc:  # kept in memory; after a restart the retained MODEL is checked again
            _log.warning("%s: cannot persist the directed statement record: %s", self.device_id, exc.reason)

    def _read(self) -> DirectedRecord | None:
        try:
            raw = disk.read_json(self.path)
        except StorageError as exc:
            _log.warning("%s: release authority record unreadable, starting empty: %s", self.device_id, exc.reason)
            return None
        entry = raw.get("directed") if isinstance(raw, dict) and raw.get("format") == _FORMAT else None
        if not isinstance(entry, dict):
            return None
        issued, version, digest = entry.get("issued_at"), entry.get("version"), entry.get("digest")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (issued, version)):
            return None
        if not isinstance(digest, str):
            return None
        assert isinstance(issued, int) and isinstance(version, int)
        return DirectedRecord(issued, version, digest)
