"""The fedflock tensor-set format: named numpy arrays as bytes, no pickle.

Used on the wire (message payloads) and on disk (bundle weights, stored model versions).
Layout, all integers little-endian (see docs/protocol.md, "Tensor set")::

    offset  size  field
    0       4     magic b"FFTS"
    4       1     version (1)
    5       3     reserved, zero
    8       4     u32 tensor count
    then, per tensor, in order:
            2     u16 name length L (1..255)
            L     name, UTF-8
            1     dtype code (see DTYPE_CODES)
            1     ndim (0..8)
            4*nd  u32 dims
            pad   zero bytes up to the next multiple of 8 (from offset 0)
            nbytes raw data, C order, little-endian
            pad   zero bytes up to the next multiple of 8

Data is aligned to 8 bytes so a decoder can view it in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_agent.errors import MalformedMessage, StorageError, StorageFull, UnsupportedVersion

MAGIC = b"FFTS"
VERSION = 1
MAX_TENSORS = 65_536
MAX_NDIM = 8
MAX_NAME_BYTES = 255

DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "int64": 3,
    "int32": 4,
    "int8": 5,
    "uint8": 6,
    "float64": 7,
    "bool": 8,
}
_CODE_TO_DTYPE = {code: np.dtype(name).newbyteorder("<") for name, code in DTYPE_CODES.items()}

_HEAD = struct.Struct("<4sB3xI")


def _pad(n: int) -> int:
    return (-n) % 8


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Encode named arrays into one tensor-set byte string (order is preserved)."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"too many tensors: {len(tensors)} > {MAX_TENSORS}")
    parts: list[bytes] = [_HEAD.pack(MAGIC, VERSION, len(tensors))]
    offset = _HEAD.size
    for name, value in tensors.items():
        array = np.asarray(value)
        dtype_name = array.dtype.name
        if dtype_name not in DTYPE_CODES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {dtype_name}")
        if array.ndim > MAX_NDIM:
            raise ValueError(f"tensor {name!r}: {array.ndim} dims > {MAX_NDIM}")
        raw_name = name.encode("utf-8")
        if not 1 <= len(raw_name) <= MAX_NAME_BYTES:
            raise ValueError(f"tensor name must be 1..{MAX_NAME_BYTES} UTF-8 bytes: {name!r}")
        head = struct.pack(
            f"<H{len(raw_name)}sBB{array.ndim}I",
            len(raw_name),
            raw_name,
            DTYPE_CODES[dtype_name],
            array.ndim,
            *array.shape,
        )
        head += b"\0" * _pad(offset + len(head))
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        data += b"\0" * _pad(len(data))
        parts.append(head)
        parts.append(data)
        offset += len(head) + len(data)
    return b"".join(parts)


def decode_tensors(buffer: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Decode a tensor set. Raises :class:`MalformedMessage` on any inconsistency.

    The returned arrays are read-only views into ``buffer`` (no copy).
    """
    view = memoryview(buffer).cast("B")
    if len(view) < _HEAD.size:
        raise MalformedMessage(f"tensor set truncated: {len(view)} bytes < {_HEAD.size}-byte header")
    magic, version, count = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise MalformedMessage(f"not a tensor set: magic {bytes(magic)!r} != {MAGIC!r}")
    if version != VERSION:
        raise UnsupportedVersion(f"tensor set version {version} (this code reads {VERSION})")
    if count > MAX_TENSORS:
        raise MalformedMessage(f"tensor count {count} > {MAX_TENSORS}")
    offset = _HEAD.size
    out: dict[str, np.ndarray] = {}
    for index in range(count):
        offset, name, array = _decode_one(view, offset, index)
        if name in out:
            raise MalformedMessage(f"duplicate tensor name {name!r}")
        out[name] = array
    if offset != len(view):
        raise MalformedMessage(f"{len(view) - offset} trailing bytes after {count} tensors")
    return out


def _need(view: memoryview, offset: int, size: int, what: str) -> None:
    if offset + size > len(view):
        raise MalformedMessage(f"tensor set truncated in {what} at byte {offset}")


def _decode_one(view: memoryview, offset: int, index: int) -> tuple[int, str, np.ndarray]:
    _need(view, offset, 2, f"tensor {index} name length")
    (name_len,) = struct.unpack_from("<H", view, offset)
    offset += 2
    if not 1 <= name_len <= MAX_NAME_BYTES:
        raise MalformedMessage(f"tensor {index}: name length {name_len} out of range")
    _need(view, offset, name_len + 2, f"tensor {index} name")
    try:
        name = bytes(view[offset : offset + name_len]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"tensor {index}: name is not UTF-8") from exc
    offset += name_len
    code, ndim = struct.unpack_from("<BB", view, offset)
    offset += 2
    if code not in _CODE_TO_DTYPE:
        raise MalformedMessage(f"tensor {name!r}: unknown dtype code {code}")
    if ndim > MAX_NDIM:
        raise MalformedMessage(f"tensor {name!r}: ndim {ndim} > {MAX_NDIM}")
    _need(view, offset, 4 * ndim, f"tensor {name!r} dims")
    shape = struct.unpack_from(f"<{ndim}I", view, offset)
    offset += 4 * ndim
    offset += _pad(offset)
    dtype = _CODE_TO_DTYPE[code]
    count = 1
    for dim in shape:
        count *= dim
    nbytes = count * dtype.itemsize
    _need(view, offset, nbytes, f"tensor {name!r} data ({nbytes} bytes)")
    array = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
    offset += nbytes + _pad(nbytes)
    if offset > len(view):
        raise MalformedMessage(f"tensor {name!r}: missing padding at end of buffer")
    return offset, name, array


def write_tensor_file(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray]) -> None:
    """Write a tensor set atomically: a killed process leaves the old file or the new one.

    A failed write (a full disk above all) removes its temporary file and raises
    :class:`~edge_agent.errors.StorageFull` (no space) or :class:`~edge_agent.errors.StorageError`;
    the previous file is untouched.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(encode_tensors(tensors))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"device storage full: could not write {target}") from exc
        raise StorageError(f"could not write {target}: {exc.strerror or exc}") from exc


def read_tensor_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a tensor set written by :func:`write_tensor_file` (arrays are writable copies)."""
    data = Path(path).read_bytes()
    return {name: np.array(value) for name, value in decode_tensors(data).items()}
