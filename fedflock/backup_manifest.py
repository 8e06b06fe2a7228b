"""The manifest of a ``fedflock backup`` archive and the checks on its members (pure: no I/O).

:mod:`fedflock.backup_cli` writes and restores the archives; this module decides what a valid one is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edge_agent.errors import ConfigError, StorageError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MODELS_DIR",
    "STORE_MEMBER",
    "BackupError",
    "FileEntry",
    "Manifest",
    "check_members",
    "is_temporary",
    "safe_member_path",
    "sqlite_path",
]

FORMAT, FORMAT_VERSION = "fedflock-backup", 1
MANIFEST, STORE_MEMBER, MODELS_DIR = "manifest.json", "store/server.db", "models"


class BackupError(StorageError):
    """An archive that is unreadable, corrupt, or does not match its manifest."""

    code = "backup_invalid"


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    created_at: str
    schema_version: int
    #: the model versions the copied store holds
    model_versions: tuple[int, ...]
    files: tuple[FileEntry, ...]

    def to_json(self) -> bytes:
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": self.created_at,
            "store": {"schema_version": self.schema_version, "model_versions": list(self.model_versions)},
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
        }
        return (json.dumps(document, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise BackupError(f"not a fedflock backup (format {doc.get('format')!r})")
            if doc.get("format_version") != FORMAT_VERSION:
                raise BackupError(f"backup format version {doc.get('format_version')!r}; this fedflock reads 1")
            files = tuple(
                FileEntry(path=str(f["path"]), sha256=str(f["sha256"]), size=int(f["size"])) for f in doc["files"]
            )
            store = doc["store"]
            return cls(
                created_at=str(doc["created_at"]),
                schema_version=int(store["schema_version"]),
                model_versions=tuple(int(v) for v in store["model_versions"]),
                files=files,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackupError(f"the backup's {MANIFEST} is malformed ({type(exc).__name__}: {exc})") from exc

    @property
    def model_files(self) -> tuple[FileEntry, ...]:
        return tuple(f for f in self.files if f.path.startswith(MODELS_DIR + "/"))


def safe_member_path(name: str) -> str:
    """``name`` if it is a relative path inside the archive (no ``..``, no absolute path), else BackupError."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or str(path) != name:
        raise BackupError(f"unsafe member path {name!r} in the archive")
    return name


def check_members(manifest: Manifest, members: Iterable[tuple[str, bool, int]]) -> None:
    """Members ``(name, is_regular_file, size)`` must be exactly the manifest's files plus the manifest."""
    expected = {f.path: f for f in manifest.files}
    if STORE_MEMBER not in expected:
        raise BackupError(f"the manifest lists no {STORE_MEMBER}")
    seen: set[str] = set()
    for name, regular, size in members:
        safe_member_path(name)
        if not regular:
            raise BackupError(f"member {name!r} is not a regular file (links and devices are refused)")
        if name in seen:
            raise BackupError(f"member {name!r} appears twice")
        seen.add(name)
        if name == MANIFEST:
            continue
        entry = expected.get(name)
        if entry is None:
            raise BackupError(f"member {name!r} is not in the manifest")
        if entry.size != size:
            raise BackupError(f"member {name!r} has {size} bytes, the manifest says {entry.size}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise BackupError(f"the archive is missing {len(missing)} file(s) the manifest lists, e.g. {missing[0]!r}")


def is_temporary(relative: PurePosixPath) -> bool:
    """A model directory being written (``.v000007.tmp-1234``): not a version yet."""
    return any(part.startswith(".") and ".tmp-" in part for part in relative.parts)


def sqlite_path(url: str) -> Path:
    """The file of a SQLite store URL (``sqlite:///abs``, or a path); ConfigError for PostgreSQL."""
    if url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("store: a PostgreSQL store is backed up with pg_dump/pg_restore (docs/operations.md)")
    return Path(url.removeprefix("sqlite://")).expanduser().resolve()
