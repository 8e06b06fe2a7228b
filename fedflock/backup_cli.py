"""``fedflock backup`` / ``fedflock restore``: the server's SQLite store and model files as one verified tar.

``fedflock backup --store sqlite:///var/lib/fedflock/server.db --models /var/lib/fedflock/server/models
--out backup.tar`` (or ``--config broker.toml``, which names both) writes::

    models/v000001/weights.fft ...   every file under the model directory (half-written ``.v*.tmp-*`` skipped)
    store/server.db                  a consistent copy of the store, one file (journal mode DELETE)
    manifest.json                    format, creation time, schema version, model versions, sha256 + size per file

**Consistency while the server runs.** The store is copied with SQLite's online backup API in one
step, i.e. inside one read transaction: in WAL mode the server keeps writing and the copy is the
database as of one commit. The model files are copied *before* the store: the server commits a
version to the store before it writes the version's files, so every copied file belongs to a version
the copied store holds (the files may lag behind the store, which is what the server expects after a
crash; never the reverse, which would make a resumed server meet files from a future it forgot).
Version directories appear by an atomic rename, so a copied version is complete.

**Restore** (``fedflock restore backup.tar --store ... --models ...``) checks everything before it
touches the targets: the archive reads, every member is a plain file with a safe relative path that
the manifest lists with the same size and sha256 (no extra or missing member), and the store copy
passes ``PRAGMA integrity_check``, is a fedflock server store and has the manifest's schema version,
which this fedflock must know. Files are extracted into a staging name next to the target and
renamed into place. An existing store or non-empty model directory is refused unless ``--force``,
which moves it aside (``NAME.pre-restore-<time>``, with the store's ``-wal``/``-shm``), never
deletes it. ``--check`` verifies an archive and writes nothing. Stop the server before restoring.

PostgreSQL stores are backed up with ``pg_dump``/``pg_restore`` (docs/operations.md), not here.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import os
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from edge_agent.errors import ConfigError, StorageError
from fedflock.backup_manifest import (
    FORMAT,
    MANIFEST,
    MODELS_DIR,
    STORE_MEMBER,
    BackupError,
    FileEntry,
    Manifest,
    check_members,
    is_temporary,
    sqlite_path,
)

__all__ = [
    "FORMAT",
    "BackupError",
    "FileEntry",
    "Manifest",
    "add_backup_arguments",
    "add_restore_arguments",
    "check_members",
    "restore_backup",
    "run_backup",
    "run_restore",
    "snapshot_store",
    "verify_archive",
    "write_backup",
]

_APPLICATION = "fedflock-server"  # broker_server.persistence.schema.APPLICATION
_CHUNK = 1 << 20
Clock = Callable[[], datetime.datetime]


# -- I/O ------------------------------------------------------------------------------------------


def _store_facts(conn: sqlite3.Connection, where: str) -> tuple[int, tuple[int, ...]]:
    """Schema version and model versions of a store copy; BackupError unless intact and fedflock's."""
    try:
        check = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if check != ["ok"]:
            raise BackupError(f"{where} fails SQLite's integrity check: {'; '.join(map(str, check[:3]))}")
        meta = dict(conn.execute("SELECT key, value FROM fedflock_meta").fetchall())
        versions = tuple(int(row[0]) for row in conn.execute("SELECT version FROM model_versions ORDER BY version"))
    except sqlite3.Error as exc:
        raise BackupError(f"{where} is not a fedflock server store ({exc})") from exc
    if meta.get("application") != _APPLICATION:
        raise BackupError(f"{where} is not a fedflock server store (application {meta.get('application')!r})")
    return int(meta["schema_version"]), versions


def snapshot_store(source: Path, target: Path) -> tuple[int, tuple[int, ...]]:
    """Copy the live store at ``source`` into ``target`` (one consistent snapshot); its schema and versions."""
    if not source.is_file():
        raise ConfigError(f"store: no SQLite store at {source}")
    try:
        with closing(sqlite3.connect(source, timeout=30.0)) as src, closing(sqlite3.connect(target)) as dst:
            src.backup(dst)  # pages=-1: every page in one step, i.e. one read transaction
            dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal
            return _store_facts(dst, f"the copy of {source}")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot back up the store {source}: {exc}") from exc


def model_files(root: Path) -> list[tuple[Path, str]]:
    """Every regular file under ``root`` with its archive name, sorted; temporary version dirs skipped."""
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            relative = PurePosixPath(path.relative_to(root).as_posix())
            if is_temporary(relative) or not path.is_file() or path.is_symlink():
                continue
            found.append((path, f"{MODELS_DIR}/{relative}"))
    return found


class _HashingReader:
    def __init__(self, stream: IO[bytes]) -> None:
        self._stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.digest.update(data)
        return data


def _add(tar: tarfile.TarFile, source: Path, name: str, mtime: float) -> FileEntry:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = source.stat().st_size, mtime, 0o600
    with source.open("rb") as stream:
        reader = _HashingReader(stream)
        tar.addfile(info, reader)
    return FileEntry(path=name, sha256=reader.digest.hexdigest(), size=info.size)


def write_backup(*, store: Path, models: Path | None, out: Path, clock: Clock | None = None) -> Manifest:
    """Write the archive ``out`` (atomically: ``out.partial`` renamed at the end); its manifest."""
    now = (clock or (lambda: datetime.datetime.now(datetime.timezone.utc)))()
    if out.exists():
        raise ConfigError(f"--out: {out} exists; choose a new file name (a backup never overwrites one)")
    if models is not None and not models.is_dir():
        raise ConfigError(f"models: {models} is not a directory")
    partial = out.with_name(out.name + ".partial")
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fedflock-backup-") as scratch:
            with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
                files = model_files(models) if models is not None else []
                entries = [_add(tar, path, name, now.timestamp()) for path, name in files]
                copy = Path(scratch) / "server.db"
                schema, versions = snapshot_store(store, copy)  # after the model files: see the module doc
                entries.append(_add(tar, copy, STORE_MEMBER, now.timestamp()))
                manifest = Manifest(
                    created_at=now.isoformat(), schema_version=schema, model_versions=versions, files=tuple(entries)
                )
                data = manifest.to_json()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mtime, info.mode = len(data), now.timestamp(), 0o600
                tar.addfile(info, io.BytesIO(data))
            with partial.open("rb") as written:
                os.fsync(written.fileno())
        os.replace(partial, out)
    except OSError as exc:
        raise StorageError(f"cannot write the backup {out}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return manifest


@contextmanager
def _open_archive(path: Path) -> Iterator[tarfile.TarFile]:
    try:
        with tarfile.open(path, "r:") as tar:
            yield tar
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"cannot read the backup {path}: {exc}") from exc


def verify_archive(archive: Path, staging: Path) -> Manifest:
    """Check ``archive`` completely, extracting its files under ``staging``; its manifest (BackupError)."""
    from broker_server.persistence.schema import SCHEMA_VERSION

    with _open_archive(archive) as tar:
        members = tar.getmembers()
        manifests = [m for m in members if m.name == MANIFEST]
        if len(manifests) != 1 or not manifests[0].isfile() or manifests[0].size > 64 << 20:
            raise BackupError(f"{archive} has no single {MANIFEST}: not a fedflock backup, or truncated")
        manifest = Manifest.from_json(_read_member(tar, manifests[0]))
        check_members(manifest, ((m.name, m.isfile(), m.size) for m in members))
        digests = {f.path: f.sha256 for f in manifest.files}
        for member in members:
            if member.name != MANIFEST:
                _extract_checked(tar, member, staging / member.name, digests[member.name])
    with closing(sqlite3.connect(staging / STORE_MEMBER)) as conn:
        schema, versions = _store_facts(conn, f"the store in {archive}")
    if schema != manifest.schema_version or versions != manifest.model_versions:
        raise BackupError(f"the store in {archive} does not match its manifest (schema {schema}, versions differ)")
    if schema > SCHEMA_VERSION:
        raise BackupError(f"the store in {archive} has schema {schema}; this fedflock knows up to {SCHEMA_VERSION}")
    return manifest


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = tar.extractfile(member)
    if stream is None:
        raise BackupError(f"member {member.name!r} cannot be read")
    return stream.read()


def _extract_checked(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, sha256: str) -> None:
    stream = tar.extractfile(member)
    if stream is None:
        raise BackupError(f"member {member.name!r} cannot be read")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with target.open("xb") as out:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        raise BackupError(f"member {member.name!r} is corrupt: sha256 {digest.hexdigest()} != manifest {sha256}")


def _move_aside(paths: Iterable[Path], stamp: str) -> list[Path]:
    moved = []
    for path in paths:
        if path.exists():
            aside = path.with_name(f"{path.name}.pre-restore-{stamp}")
            os.replace(path, aside)
            moved.append(aside)
    return moved


def _occupied(store: Path, models: Path | None) -> list[Path]:
    taken = [p for p in (store, Path(f"{store}-wal"), Path(f"{store}-shm")) if p.exists()]
    if models is not None and models.exists() and any(models.iterdir()):
        taken.append(models)
    return taken


def _stage_models(source: Path, models: Path) -> Path:
    """The extracted model files moved next to ``models`` (same filesystem: the final rename is atomic)."""
    models.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=models.parent, prefix=f".{models.name}.restore-"))
    if source.is_dir():
        staged.rmdir()
        shutil.move(source, staged)
    return staged


def restore_backup(
    *, archive: Path, store: Path, models: Path | None, force: bool, clock: Clock | None = None
) -> tuple[Manifest, list[Path]]:
    """Verify ``archive``, then put its store at ``store`` and its model files in ``models``; what moved aside."""
    now = (clock or (lambda: datetime.datetime.now(datetime.timezone.utc)))()
    if not store.parent.is_dir():
        raise ConfigError(f"store: directory {store.parent} does not exist")
    taken = _occupied(store, models)
    if taken and not force:
        raise ConfigError(f"{taken[0]} exists; stop the server and add --force to move it aside (nothing is deleted)")
    with tempfile.TemporaryDirectory(dir=store.parent, prefix=".fedflock-restore-") as scratch:
        manifest = verify_archive(archive, Path(scratch))
        if manifest.model_files and models is None:
            raise ConfigError(f"the backup holds {len(manifest.model_files)} model files: give --models DIR")
        staged = _stage_models(Path(scratch) / MODELS_DIR, models) if models is not None else None
        try:
            moved = _move_aside(taken, now.strftime("%Y%m%dT%H%M%SZ"))
            os.replace(Path(scratch) / STORE_MEMBER, store)
            if models is not None and staged is not None:
                os.replace(staged, models)
        finally:
            if staged is not None and staged.exists():
                shutil.rmtree(staged)
    return manifest, moved


# -- the commands ---------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="broker.toml: take --store and --models from it")
    parser.add_argument("--store", default=None, help="sqlite:///path/server.db or a path (PostgreSQL: pg_dump)")
    parser.add_argument("--models", type=Path, default=None, help="the model directory (<[server] out>/models)")


def add_backup_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--out", type=Path, required=True, help="the archive to write (FILE.tar; never overwritten)")


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", type=Path, help="a FILE.tar written by fedflock backup")
    _common(parser)
    parser.add_argument("--check", action="store_true", help="only verify the archive; write nothing")
    parser.add_argument("--force", action="store_true", help="move an existing store / model dir aside first")


def _targets(args: argparse.Namespace) -> tuple[Path, Path | None]:
    store_url, models = args.store, args.models
    if args.config is not None:
        from fedflock.broker_config import DEFAULT_OUT, read_document

        server = read_document(args.config).get("server", {})
        store_url = store_url or server.get("store")
        if models is None:
            models = Path(server.get("out") or DEFAULT_OUT.resolve()) / "models"
    if store_url is None:
        raise ConfigError("store: give --store (or --config with a [server] store)")
    return sqlite_path(str(store_url)), None if models is None else models.expanduser().resolve()


def run_backup(args: argparse.Namespace) -> int:
    store, models = _targets(args)
    manifest = write_backup(store=store, models=models, out=args.out.expanduser().resolve())
    print(
        f"backup {args.out}: store schema {manifest.schema_version}, {_versions(manifest)}, "
        f"{len(manifest.model_files)} model files"
    )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    if args.check:
        with tempfile.TemporaryDirectory(prefix="fedflock-restore-check-") as scratch:
            manifest = verify_archive(args.archive, Path(scratch))
        print(f"{args.archive}: ok ({manifest.created_at}; {_versions(manifest)}, {len(manifest.files)} files)")
        return 0
    store, models = _targets(args)
    manifest, moved = restore_backup(archive=args.archive, store=store, models=models, force=args.force)
    for path in moved:
        print(f"moved aside: {path}")
    print(
        f"restored {args.archive} ({manifest.created_at}): store {store}, {_versions(manifest)}, "
        f"{len(manifest.model_files)} model files{f' in {models}' if models else ''}"
    )
    return 0


def _versions(manifest: Manifest) -> str:
    versions = manifest.model_versions
    return f"model versions {versions[0]}..{versions[-1]}" if versions else "no model versions"
