"""Resumable download staging that survives an agent restart, plus durable-write helpers.

A chunked model download (:mod:`edge_agent.transfer`) can take minutes on a slow link; a device
that reboots half-way should not start again from zero. :class:`DownloadStaging` keeps, per
transfer, two files in its root directory::

    <transfer_id>.part    the chunks received so far, in order (appended, never preallocated)
    <transfer_id>.json    sidecar: {"format", "transfer_id", "total_size", "chunk_size",
                          "sha256", "chunks"} — how many chunks of the part file are durable

A chunk is written and fsynced *before* the sidecar that counts it is replaced atomically
(tmp + fsync + ``os.replace`` + fsync of the directory), so after a crash the sidecar never
claims more than the part file holds. The part file may hold more (a chunk written but not yet
counted): it is cut back to ``chunks * chunk_size`` when the transfer is resumed or written.

Usage: ``begin()`` (again after a restart, with the same parameters, to resume), then
``write_chunk()`` in order, ``finish()`` (verifies the sha256 and returns the part file), read
or install it, then ``discard()``. Not thread-safe: one writer per root directory.

The helpers at the bottom (:func:`write_bytes_durably`, :func:`write_json_atomic`,
:func:`fsync_directory`, :func:`remove_tree`) are shared by the other OTA modules.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edge_agent.errors import ContractViolation, IntegrityError, StorageError

__all__ = [
    "DownloadStaging",
    "fsync_directory",
    "list_directory",
    "make_directory",
    "read_json",
    "remove_tree",
    "rename_path",
    "write_bytes_durably",
    "write_json_atomic",
]

_log = logging.getLogger("fedflock.ota")

SIDECAR_FORMAT = 1
_TRANSFER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, kw_only=True)
class _Transfer:
    transfer_id: str
    total_size: int
    chunk_size: int
    sha256: str
    chunks: int = 0

    @property
    def count(self) -> int:
        return -(-self.total_size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.total_size - index * self.chunk_size)


class DownloadStaging:
    """Chunked downloads staged under ``root``; see the module docstring for the protocol.

    ``max_bytes`` bounds the announced size of one transfer (checked in :meth:`begin`).
    """

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int = 512 * 2**20) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._transfers: dict[str, _Transfer] = {}

    def begin(self, transfer_id: str, total_size: int, chunk_size: int, sha256: str) -> int:
        """Start or resume a transfer; returns the next chunk index wanted (0 for a fresh start).

        Same parameters as a staged transfer: its durable chunks are kept. Different parameters,
        or an unreadable sidecar: the old state is discarded and the transfer starts clean.
        """
        wanted = _Transfer(transfer_id=transfer_id, total_size=total_size, chunk_size=chunk_size, sha256=sha256)
        self._check_params(wanted)
        make_directory(self.root)
        for stray in self.root.glob(f".{transfer_id}.json.tmp-*"):  # a sidecar update cut short
            _unlink(stray)
        staged = self._load(transfer_id)
        if staged is not None and replace(staged, chunks=0) == wanted and self._cut_part(staged):
            self._transfers[transfer_id] = staged
            _log.info("transfer %s resumed at chunk %d/%d", transfer_id, staged.chunks, staged.count)
            return staged.chunks
        if staged is not None:
            _log.info("transfer %s restarted: staged state does not match or is incomplete", transfer_id)
        self.discard(transfer_id)
        _write_part(self._part(transfer_id), 0, b"")
        self._save(wanted)
        self._transfers[transfer_id] = wanted
        return 0

    def write_chunk(self, transfer_id: str, index: int, data: bytes) -> int:
        """Store chunk ``index`` if it is the next one expected; returns the next index wanted.

        Any other index (a duplicate or a gap) writes nothing and returns the current next
        index, so the caller can ask the sender to resend from there. A chunk of the wrong
        length raises :class:`ContractViolation`; a full disk raises :class:`StorageError` and
        leaves the durable state as it was (the same chunk may be written again).
        """
        state = self._state(transfer_id)
        if index != state.chunks or state.chunks >= state.count:
            return state.chunks
        if len(data) != state.chunk_length(index):
            raise ContractViolation(
                f"transfer {transfer_id}: chunk {index} has {len(data)} bytes, expected {state.chunk_length(index)}"
            )
        _write_part(self._part(transfer_id), index * state.chunk_size, data)
        advanced = replace(state, chunks=index + 1)
        self._save(advanced)
        self._transfers[transfer_id] = advanced
        return advanced.chunks

    def next_index(self, transfer_id: str) -> int:
        """The next chunk index wanted (``== count`` when every chunk is staged)."""
        return self._state(transfer_id).chunks

    def finish(self, transfer_id: str) -> Path:
        """Verify the complete download and return the path of its file.

        Raises :class:`ContractViolation` if chunks are missing and :class:`IntegrityError`
        (after discarding the transfer) if the sha256 does not match. The file stays until
        :meth:`discard`.
        """
        state = self._state(transfer_id)
        if state.chunks < state.count:
            raise ContractViolation(f"transfer {transfer_id}: only {state.chunks} of {state.count} chunks staged")
        part = self._part(transfer_id)
        actual = _sha256_of(part)
        if actual != state.sha256:
            self.discard(transfer_id)
            raise IntegrityError(
                f"transfer {transfer_id}: sha256 {actual[:16]}… != announced {state.sha256[:16]}…; discarded"
            )
        return part

    def discard(self, transfer_id: str) -> None:
        """Remove a transfer's files (no error if there are none)."""
        _check_transfer_id(transfer_id)
        self._transfers.pop(transfer_id, None)
        for path in (self._sidecar(transfer_id), self._part(transfer_id)):
            _unlink(path)

    # -- internals -------------------------------------------------------------------------

    def _check_params(self, transfer: _Transfer) -> None:
        _check_transfer_id(transfer.transfer_id)
        if not 1 <= transfer.total_size <= self.max_bytes:
            raise ContractViolation(f"transfer size {transfer.total_size} outside 1..{self.max_bytes}")
        if transfer.chunk_size < 1:
            raise ContractViolation(f"chunk size {transfer.chunk_size} < 1")
        if not _SHA256.match(transfer.sha256):
            raise ContractViolation(f"sha256 must be 64 lowercase hex digits, got {transfer.sha256!r}")

    def _part(self, transfer_id: str) -> Path:
        return self.root / f"{transfer_id}.part"

    def _sidecar(self, transfer_id: str) -> Path:
        return self.root / f"{transfer_id}.json"

    def _state(self, transfer_id: str) -> _Transfer:
        _check_transfer_id(transfer_id)
        if transfer_id not in self._transfers:
            loaded = self._load(transfer_id)
            if loaded is None:
                raise ContractViolation(f"transfer {transfer_id} is not staged; call begin() first")
            self._transfers[transfer_id] = loaded
        return self._transfers[transfer_id]

    def _load(self, transfer_id: str) -> _Transfer | None:
        path = self._sidecar(transfer_id)
        if not path.exists():
            return None
        try:
            raw = read_json(path)
        except StorageError as exc:
            _log.warning("transfer %s: sidecar unusable, starting over: %s", transfer_id, exc.reason)
            return None
        return _parse_sidecar(raw, transfer_id)

    def _save(self, transfer: _Transfer) -> None:
        write_json_atomic(self._sidecar(transfer.transfer_id), {"format": SIDECAR_FORMAT, **asdict(transfer)})

    def _cut_part(self, transfer: _Transfer) -> bool:
        """Cut the part file back to its durable chunks; False if it holds fewer than counted."""
        part, durable = self._part(transfer.transfer_id), transfer.chunks * transfer.chunk_size
        durable = min(durable, transfer.total_size)
        try:
            if part.stat().st_size < durable:
                return False
            with open(part, "r+b") as handle:
                handle.truncate(durable)
                os.fsync(handle.fileno())
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot resume {part}: {exc.strerror or exc}") from exc
        return True


def _check_transfer_id(transfer_id: str) -> None:
    if not isinstance(transfer_id, str) or not _TRANSFER_ID.match(transfer_id):
        raise ContractViolation(f"transfer id must match {_TRANSFER_ID.pattern}, got {transfer_id!r}")


def _parse_sidecar(raw: Any, transfer_id: str) -> _Transfer | None:
    try:
        if raw["format"] != SIDECAR_FORMAT or raw["transfer_id"] != transfer_id:
            return None
        fields = {key: raw[key] for key in ("total_size", "chunk_size", "chunks")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in fields.values()):
            return None
        state = _Transfer(transfer_id=transfer_id, sha256=str(raw["sha256"]), **fields)
    except (KeyError, TypeError):
        _log.warning("transfer %s: sidecar has missing or bad fields", transfer_id)
        return None
    return state if state.chunk_size >= 1 and state.chunks <= state.count else None


def _write_part(part: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` (dropping anything after it) and fsync."""
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if offset == 0:
            fsync_directory(part.parent)
    except OSError as exc:
        raise _storage_error(f"cannot write {part}", exc) from exc


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


# -- durable-write helpers shared by the OTA modules ------------------------------------------


def write_bytes_durably(path: Path, data: bytes | memoryview) -> None:
    """Create ``path`` (it must not exist) with ``data`` and fsync it; raises StorageError."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _storage_error(f"cannot write {path}", exc) from exc


def write_json_atomic(path: Path, value: Any, *, before_replace: Callable[[], None] | None = None) -> None:
    """Replace ``path`` with ``value`` as JSON: a crash leaves the old file or the new one.

    ``before_replace`` runs once the temporary file is durable (fault injection in tests).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = json.dumps(value, indent=2, sort_keys=True).encode("utf-8")
    try:
        _unlink(tmp)
        write_bytes_durably(tmp, data)
        if before_replace is not None:
            before_replace()
        _replace(tmp, path)
    except StorageError:
        _unlink_logged(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (POSIX: fsync the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _storage_error(f"cannot sync directory {path}", exc) from exc


def list_directory(path: Path) -> list[Path]:
    """The entries of ``path``, sorted; raises StorageError."""
    try:
        return sorted(path.iterdir())
    except OSError as exc:
        raise _storage_error(f"cannot list {path}", exc) from exc


def remove_tree(path: Path) -> None:
    """Remove a directory tree or a file if it exists; raises StorageError when that fails."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _storage_error(f"cannot remove {path}", exc) from exc


def read_json(path: Path) -> Any:
    """Parse a JSON file; None if it does not exist, StorageError if unreadable or corrupt."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{path} is not valid JSON: {exc}") from exc


def rename_path(source: Path, target: Path) -> None:
    """``os.rename`` with errors translated (the caller fsyncs the directories)."""
    try:
        os.rename(source, target)
    except OSError as exc:
        raise _storage_error(f"cannot rename {source} to {target}", exc) from exc


def _replace(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise _storage_error(f"cannot replace {target}", exc) from exc


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise _storage_error(f"cannot remove {path}", exc) from exc


def _unlink_logged(path: Path) -> None:
    """Clean-up after a failure that is already being raised: log, do not mask it."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        _log.warning("cannot remove %s: %s", path, exc.strerror or exc)


def make_directory(path: Path) -> None:
    """``mkdir -p`` with errors translated."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _storage_error(f"cannot create {path}", exc) from exc


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _storage_error(what: str, exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"{what}: disk full")
    return StorageError(f"{what}: {exc.strerror or exc}")
