"""Bounds-checked cursor over an FFCU body, LEB128 varints, and the parsed-tensor record.

Everything here returns views into the payload (no copies of tensor data) and raises
:class:`MalformedMessage` naming the field on any inconsistency, always *before* allocating
anything whose size comes from the payload.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.errors import MalformedMessage

U32_MAX = 0xFFFF_FFFF
MAX_VARINT_BYTES = 5  # values are u32


@dataclass
class Record:
    """One tensor of a payload after phase-1 validation: views into the payload, nothing decoded."""

    name: str
    shape: tuple[int, ...]
    size: int
    data: np.ndarray  # codec data: '<f4' / '<f2' values, int8 codes, or packed uint8 bytes
    scales: np.ndarray | None = None  # '<f4', validated finite and >= 0
    indices: np.ndarray | None = None  # top-k: int64, strictly increasing, < size
    codec_id: int = 0  # the record's codec (set by the parser)


class Reader:
    """A cursor over ``body`` that never reads past its end."""

    def __init__(self, body: bytes | memoryview) -> None:
        self.body = body
        self.u8 = np.frombuffer(body, dtype=np.uint8)
        self.bytes = memoryview(body).cast("B")
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.u8) - self.pos

    def need(self, size: int, what: str) -> None:
        if size > self.remaining:
            raise MalformedMessage(
                f"update truncated in {what}: needs {size} bytes at body offset {self.pos}, {self.remaining} left"
            )

    def byte(self, what: str) -> int:
        self.need(1, what)
        value = self.bytes[self.pos]
        self.pos += 1
        return value

    def take(self, size: int, what: str) -> np.ndarray:
        """``size`` raw bytes as a uint8 view."""
        self.need(size, what)
        view = self.u8[self.pos : self.pos + size]
        self.pos += size
        return view

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """``count`` little-endian values of ``dtype`` (``'<f4'``, ``'<f2'``, ``'i1'``) as a view."""
        itemsize = np.dtype(dtype).itemsize
        self.need(count * itemsize, what)
        view = np.frombuffer(self.body, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * itemsize
        return view

    def varint(self, what: str) -> int:
        """One LEB128 u32 varint (scalar path: the per-tensor fields)."""
        data, pos, end = self.bytes, self.pos, len(self.bytes)
        value = 0
        for index in range(MAX_VARINT_BYTES):
            if pos + index >= end:
                raise MalformedMessage(f"update truncated in {what}: unterminated varint at body offset {self.pos}")
            byte = data[pos + index]
            value |= (byte & 0x7F) << (7 * index)
            if byte < 0x80:
                if index and not byte:
                    raise MalformedMessage(f"{what}: non-minimal varint encoding (at body offset {self.pos})")
                if value > U32_MAX:
                    raise MalformedMessage(f"{what}: varint exceeds 2**32-1 (at body offset {self.pos})")
                self.pos = pos + index + 1
                return value
        raise MalformedMessage(f"{what}: varint longer than {MAX_VARINT_BYTES} bytes at body offset {self.pos}")

    def varints(self, count: int, what: str) -> np.ndarray:
        """``count`` consecutive LEB128 u32 varints as uint64 (vectorised)."""
        if count <= 8:  # dims: a Python loop beats numpy's per-call overhead
            return np.array([self.varint(what) for _ in range(count)], dtype=np.uint64)
        self.need(count, what)  # every varint is at least one byte
        window = self.u8[self.pos : self.pos + min(self.remaining, MAX_VARINT_BYTES * count)]
        ends = np.flatnonzero(window < 0x80)[:count]
        if len(ends) < count:
            bounds = np.concatenate(([-1], ends, [len(window) - 1]))
            runs = np.diff(bounds)
            if int(runs[:-1].max(initial=0)) > MAX_VARINT_BYTES or int(runs[-1]) >= MAX_VARINT_BYTES:
                raise MalformedMessage(
                    f"{what}: varint longer than {MAX_VARINT_BYTES} bytes near body offset {self.pos}"
                )
            raise MalformedMessage(f"update truncated in {what}: unterminated varint near body offset {self.pos}")
        values, end = decode_varint_window(window, ends, what, self.pos)
        self.pos += end
        return values


def decode_varint_window(window: np.ndarray, ends: np.ndarray, what: str, base: int) -> tuple[np.ndarray, int]:
    """Decode the varints of ``window`` whose last bytes sit at ``ends``; returns (values, bytes used)."""
    count = len(ends)
    end = int(ends[-1]) + 1
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        bad = int(np.argmax(lengths > MAX_VARINT_BYTES))
        raise MalformedMessage(f"{what}: varint {bad} longer than {MAX_VARINT_BYTES} bytes (at body offset {base})")
    used = window[:end]
    if count == end:  # all single-byte: the common case for top-k gaps
        return used.astype(np.uint64), end
    last = used[ends]
    if bool(((last == 0) & (lengths > 1)).any()):
        raise MalformedMessage(f"{what}: non-minimal varint encoding (at body offset {base})")
    if bool(((lengths == MAX_VARINT_BYTES) & (last > 0x0F)).any()):
        raise MalformedMessage(f"{what}: varint exceeds 2**32-1 (at body offset {base})")
    group = np.repeat(np.arange(count), lengths)
    shift = (np.arange(end, dtype=np.int64) - starts[group]) * 7
    parts = (used & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.add.reduceat(parts, starts), end


def encode_varints(values: np.ndarray) -> bytes:
    """LEB128-encode non-negative integers < 2**32 (vectorised, minimal form)."""
    values = np.asarray(values, dtype=np.uint64)
    if len(values) == 0:
        return b""
    if int(values.max()) > U32_MAX:
        raise ValueError(f"varint value {int(values.max())} exceeds 2**32-1")
    if int(values.max()) < 0x80:
        return values.astype(np.uint8).tobytes()
    lengths = np.ones(len(values), dtype=np.int64)
    for step in range(1, MAX_VARINT_BYTES):
        lengths += values >= np.uint64(1 << (7 * step))
    starts = np.zeros(len(values), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for step in range(MAX_VARINT_BYTES):
        mask = lengths > step
        if not mask.any():
            break
        chunk = ((values[mask] >> np.uint64(7 * step)) & np.uint64(0x7F)).astype(np.uint8)
        chunk[lengths[mask] > step + 1] |= 0x80
        out[starts[mask] + step] = chunk
    return out.tobytes()
