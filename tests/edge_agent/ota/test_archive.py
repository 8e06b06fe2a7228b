"""pack_bundle / unpack_bundle: deterministic packing, and every unsafe archive refused before writing."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.errors import BundleError, StorageError
from edge_agent.ota.archive import SIGNATURE_FILE, pack_bundle, unpack_bundle
from edge_agent.runtime.bundle import Bundle

MAX = 10 * 2**20


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], *, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


def test_pack_is_deterministic_and_holds_only_bundle_files(digits_bundle: Bundle, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(digits_bundle.directory, copy)
    (copy / "notes.txt").write_text("not part of the bundle")
    os.utime(copy / "weights.fft", (12345, 12345))

    packed = pack_bundle(digits_bundle.directory)

    assert pack_bundle(copy) == packed
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted({"manifest.json", *digits_bundle.manifest.files})
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.isreg() for m in members)


def test_pack_includes_the_signature_when_present(digits_bundle: Bundle, tmp_path: Path) -> None:
    copy = tmp_path / "signed"
    shutil.copytree(digits_bundle.directory, copy)
    (copy / SIGNATURE_FILE).write_bytes(b"signature")

    names = unpack_bundle(pack_bundle(copy), tmp_path / "out", max_bytes=MAX)

    assert SIGNATURE_FILE in names
    assert (tmp_path / "out" / SIGNATURE_FILE).read_bytes() == b"signature"


def test_round_trip_gives_the_same_bundle(digits_bundle: Bundle, tmp_path: Path) -> None:
    dest = tmp_path / "unpacked"

    unpack_bundle(pack_bundle(digits_bundle.directory), dest, max_bytes=MAX)

    assert Bundle.open(dest).digest == digits_bundle.digest


def test_unpack_reads_an_archive_file(digits_bundle: Bundle, tmp_path: Path) -> None:
    archive = tmp_path / "bundle.tar"
    archive.write_bytes(pack_bundle(digits_bundle.directory))

    unpack_bundle(archive, tmp_path / "unpacked", max_bytes=MAX)

    assert Bundle.open(tmp_path / "unpacked").digest == digits_bundle.digest


def _pax_archive(*, global_header: bool = False) -> bytes:
    info, data = _file("manifest.json")
    buffer = io.BytesIO()
    headers = {"comment": "extended"}
    with tarfile.open(
        fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers=headers if global_header else None
    ) as tar:
        if not global_header:
            info.pax_headers = headers
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


UNSAFE: dict[str, tuple[Callable[[], bytes], str]] = {
    "symlink": (lambda: _tar([_file("manifest.json"), _special("w.fft", tarfile.SYMTYPE, "/etc/passwd")]), "link"),
    "hardlink": (lambda: _tar([_file("manifest.json"), _special("w.fft", tarfile.LNKTYPE, "manifest.json")]), "link"),
    "directory": (lambda: _tar([_file("manifest.json"), _special("sub", tarfile.DIRTYPE)]), "non-regular"),
    "device": (lambda: _tar([_file("manifest.json"), _special("dev", tarfile.CHRTYPE)]), "non-regular"),
    "fifo": (lambda: _tar([_file("manifest.json"), _special("fifo", tarfile.FIFOTYPE)]), "non-regular"),
    "absolute": (lambda: _tar([_file("manifest.json"), _file("/tmp/evil")]), "unsafe file name"),
    "dotdot": (lambda: _tar([_file("manifest.json"), _file("../evil")]), "unsafe file name"),
    "subdir": (lambda: _tar([_file("manifest.json"), _file("a/b.onnx")]), "unsafe file name"),
    "hidden": (lambda: _tar([_file("manifest.json"), _file(".bashrc")]), "unsafe file name"),
    "duplicate": (lambda: _tar([_file("manifest.json"), _file("manifest.json", b"y")]), "twice"),
    "no manifest": (lambda: _tar([_file("weights.fft")]), "no manifest.json"),
    "pax header": (lambda: _pax_archive(), "pax"),
    "global pax header": (lambda: _pax_archive(global_header=True), "pax"),
    "garbage": (lambda: b"this is not a tar archive" * 40, "not a readable tar"),
    "empty": (lambda: b"", "not a readable tar"),
    "too many": (lambda: _tar([_file("manifest.json")] + [_file(f"f{i}") for i in range(80)]), "more than 64"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_refused_before_writing(case: str, tmp_path: Path) -> None:
    build, reason = UNSAFE[case]
    dest = tmp_path / "dest"

    with pytest.raises(BundleError, match=reason):
        unpack_bundle(build(), dest, max_bytes=MAX)

    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_declared_size_beyond_the_limit_is_refused_without_allocating(tmp_path: Path) -> None:
    huge = tarfile.TarInfo("weights.fft")
    huge.size = 50 * 2**30  # 50 GiB declared, a few bytes present
    data = _tar([_file("manifest.json")])[:1024] + huge.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 512 + bytes(1024)

    with pytest.raises(BundleError, match="more than 1000000 bytes"):
        unpack_bundle(data, tmp_path / "dest", max_bytes=1_000_000)

    assert not (tmp_path / "dest").exists()


def test_total_of_several_members_counts_against_the_limit(tmp_path: Path) -> None:
    data = _tar([_file("manifest.json", b"m" * 600), _file("a.onnx", b"a" * 600)])

    with pytest.raises(BundleError, match="more than 1000 bytes"):
        unpack_bundle(data, tmp_path / "dest", max_bytes=1000)


def test_archive_file_larger_than_the_limit_is_not_read(tmp_path: Path) -> None:
    archive = tmp_path / "big.tar"
    archive.write_bytes(bytes(200_000))

    with pytest.raises(BundleError, match="more than 1000 allow"):
        unpack_bundle(archive, tmp_path / "dest", max_bytes=1000)


def _cut_inside_data(packed: bytes) -> bytes:
    return packed[: len(packed) // 2]


def _cut_at_member_boundary(packed: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:") as tar:
        last = tar.getmembers()[-1]
    return packed[: last.offset]


def _damaged_second_header(packed: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:") as tar:
        second = tar.getmembers()[1]
    data = bytearray(packed)
    data[second.offset + 148] ^= 0x01  # header checksum: tarfile then quietly stops listing
    return bytes(data)


def _trailing_data(packed: bytes) -> bytes:
    return packed + b"appended"


@pytest.mark.parametrize("damage", [_cut_inside_data, _cut_at_member_boundary, _damaged_second_header, _trailing_data])
def test_truncated_or_damaged_archives_are_refused(
    damage: Callable[[bytes], bytes], digits_bundle: Bundle, tmp_path: Path
) -> None:
    data = damage(pack_bundle(digits_bundle.directory))

    with pytest.raises(BundleError, match=r"truncated|not a readable tar"):
        unpack_bundle(data, tmp_path / "dest", max_bytes=MAX)

    assert not (tmp_path / "dest").exists()


def test_existing_destination_is_a_storage_error(digits_bundle: Bundle, tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()

    with pytest.raises(StorageError, match="cannot create"):
        unpack_bundle(pack_bundle(digits_bundle.directory), tmp_path / "dest", max_bytes=MAX)


def test_disk_full_while_writing_removes_the_partial_directory(
    digits_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pack_bundle(digits_bundle.directory)
    real_write, calls = os.write, []

    def write_then_fill_up(fd: int, chunk: bytes | memoryview) -> int:
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(chunk)[:100])  # short writes are handled too

    monkeypatch.setattr(os, "write", write_then_fill_up)

    with pytest.raises(StorageError, match="disk full"):
        unpack_bundle(data, tmp_path / "dest", max_bytes=MAX)

    assert not (tmp_path / "dest").exists()
