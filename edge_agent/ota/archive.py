"""A bundle directory as one byte string for transfer, and back.

:func:`pack_bundle` writes an uncompressed POSIX (ustar) tar holding ``manifest.json``, every
file the manifest lists and ``manifest.sig`` if present — nothing else — in sorted order, with
mtime 0, uid/gid 0 and mode 0644, so the same bundle always packs to the same bytes.
(ONNX and tensor files barely compress; compression is a transport concern.)

:func:`unpack_bundle` treats the archive as hostile and checks all of it before writing
anything: only regular files with plain names (``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 100
characters, so no directories, ``..`` or absolute paths), no links, devices or extended (pax)
headers, no duplicate names, at most :data:`MAX_MEMBERS` members, a total declared size within
``max_bytes``, every member's data inside the archive and a complete end-of-archive marker.
Sizes are only compared, never used to allocate. Any problem raises :class:`BundleError` with
the reason; the sha256 checks of the files are :meth:`Bundle.open`'s job afterwards.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

from edge_agent.errors import BundleError, IntegrityError, StorageError
from edge_agent.ota.staging import fsync_directory, list_directory, remove_tree, write_bytes_durably
from edge_agent.protocol.manifest import MANIFEST_FILE, Manifest, load_manifest

__all__ = ["MAX_MEMBERS", "SIGNATURE_FILE", "check_only_bundle_files", "pack_bundle", "unpack_bundle"]

#: Written by ``model_export`` when the bundle is signed; verified by the store's ``verify`` hook.
SIGNATURE_FILE = "manifest.sig"
MAX_MEMBERS = 64
_BLOCK = 512
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)


def pack_bundle(directory: str | Path) -> bytes:
    """Pack a bundle directory into deterministic tar bytes (files are not verified here)."""
    root = Path(directory)
    manifest, _ = load_manifest(root, verify=False)
    names = set(manifest.files) | {MANIFEST_FILE}
    if (root / SIGNATURE_FILE).is_file():
        names.add(SIGNATURE_FILE)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(names):
            _check_name(name)
            data = _read(root / name)
            tar.addfile(_member(name, len(data)), io.BytesIO(data))
    return buffer.getvalue()


def unpack_bundle(archive: bytes | Path, dest: str | Path, *, max_bytes: int) -> list[str]:
    """Check ``archive`` (tar bytes or a file of them) completely, then write it into ``dest``.

    Returns the names written. ``dest`` must not exist. Every file and the directory are
    fsynced. Raises :class:`BundleError` for an unsafe or broken archive (nothing written) and
    :class:`StorageError` when reading or writing fails (``dest`` is removed again).
    """
    data = archive if isinstance(archive, bytes) else _read_archive(Path(archive), max_bytes=max_bytes)
    members = _checked_members(data, max_bytes=max_bytes)
    target = Path(dest)
    try:
        target.mkdir()
    except OSError as exc:
        raise StorageError(f"cannot create {target}: {exc.strerror or exc}") from exc
    view = memoryview(data)
    try:
        for member in members:
            write_bytes_durably(target / member.name, view[member.offset_data : member.offset_data + member.size])
        fsync_directory(target)
    except StorageError:
        remove_tree(target)
        raise
    return [m.name for m in members]


def check_only_bundle_files(directory: Path, manifest: Manifest) -> None:
    """Raise :class:`IntegrityError` if ``directory`` holds files the manifest does not pin."""
    allowed = set(manifest.files) | {MANIFEST_FILE, SIGNATURE_FILE}
    extra = [p.name for p in list_directory(directory) if p.name not in allowed]
    if extra:
        raise IntegrityError(f"bundle has files its manifest does not list: {extra[:5]}")


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _read_archive(path: Path, *, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes + (MAX_MEMBERS + 3) * _BLOCK + 10240:  # headers, end marker, record padding
            raise BundleError(f"bundle archive {path} has {size} bytes, more than {max_bytes} allow")
        return path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read archive {path}: {exc.strerror or exc}") from exc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read bundle file {path}: {exc.strerror or exc}") from exc


def _check_name(name: str) -> None:
    if not _SAFE_NAME.match(name):
        raise BundleError(f"unsafe file name in bundle archive: {name!r}")


def _checked_members(data: bytes, *, max_bytes: int) -> list[tarfile.TarInfo]:
    """List and check the members; tarfile only reads headers here and seeks over the data."""
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:  # checked as listed: before tarfile trips over a bogus size
                _check_member(member, members)
                total += member.size
                if total > max_bytes:
                    raise BundleError(f"bundle archive declares more than {max_bytes} bytes of files")
                if member.offset_data + member.size > len(data):
                    raise BundleError(f"bundle archive is truncated inside {member.name!r}")
                members.append(member)
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as exc:
        raise BundleError(f"not a readable tar archive: {exc}") from exc
    _check_end(data, members)
    if MANIFEST_FILE not in {m.name for m in members}:
        raise BundleError(f"bundle archive has no {MANIFEST_FILE}")
    return members


def _check_member(member: tarfile.TarInfo, earlier: list[tarfile.TarInfo]) -> None:
    if len(earlier) >= MAX_MEMBERS:
        raise BundleError(f"bundle archive has more than {MAX_MEMBERS} members")
    if member.type not in _REGULAR:
        kind = "link" if member.islnk() or member.issym() else "non-regular member"
        raise BundleError(f"bundle archive has a {kind}: {member.name!r}")
    if member.pax_headers:  # global pax headers are copied into every following member
        raise BundleError(f"bundle archive member {member.name!r} has extended (pax) headers")
    _check_name(member.name)
    if any(m.name == member.name for m in earlier):
        raise BundleError(f"bundle archive has {member.name!r} twice")


def _check_end(data: bytes, members: list[tarfile.TarInfo]) -> None:
    """tarfile stops quietly at a damaged header: demand the two zero blocks that end a tar."""
    end = 0
    if members:
        last = members[-1]
        end = last.offset_data + -(-last.size // _BLOCK) * _BLOCK
    tail = memoryview(data)[end:]
    if len(tail) < 2 * _BLOCK or tail.tobytes().count(0) != len(tail):
        raise BundleError("bundle archive is truncated or has data after its last member")
