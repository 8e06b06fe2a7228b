"""Dense codecs: fp32, fp16, int8, int8-channel, int4, int2 and sign (see :mod:`edge_agent.codecs.wire`)."""

from __future__ import annotations

import numpy as np

from edge_agent.codecs.base import (
    F32,
    Codec,
    abs_max,
    dequantize,
    divisor,
    make_scale,
    make_scales,
    read_scales,
    require_finite,
    stochastic_round,
)
from edge_agent.codecs.reader import Reader, Record
from edge_agent.codecs.spec import CodecSpec
from edge_agent.errors import MalformedMessage

FP16_OVERFLOW = 65520.0  # the smallest magnitude float16 rounds to infinity


class Fp32(Codec):
    name = "fp32"

    def encode(self, x: np.ndarray, shape: tuple[int, ...], spec: CodecSpec, rng: np.random.Generator) -> list[bytes]:
        return [x.astype("<f4", copy=False).tobytes()]

    def parse(self, reader: Reader, name: str, shape: tuple[int, ...], size: int, *, finite: bool = True) -> Record:
        """``finite=False`` skips the NaN/Inf pass: the caller checks the values itself before using them
        (the server's group partial checks each weighted block as it folds it, :mod:`edge_agent.codecs.partial`)."""
        data = reader.array("<f4", size, f"tensor {name!r} fp32 values ({size * 4} bytes)")
        if finite:
            require_finite(data, name)
        return Record(name, shape, size, data)

    def decode(self, record: Record) -> np.ndarray:
        return record.data.astype(np.float32)

    def decode_scaled64(self, record: Record, weight: float) -> np.ndarray:
        return np.multiply(record.data, weight, dtype=np.float64)


class Fp16(Fp32):
    name = "fp16"

    def encode(self, x: np.ndarray, shape: tuple[int, ...], spec: CodecSpec, rng: np.random.Generator) -> list[bytes]:
        if abs_max(x) >= FP16_OVERFLOW:
            raise ValueError(f"value {abs_max(x):g} overflows float16 (max 65504); use another codec")
        return [x.astype("<f2").tobytes()]

    def parse(self, reader: Reader, name: str, shape: tuple[int, ...], size: int, *, finite: bool = True) -> Record:
        """Always checks: the fp16 bit test is cheap, so ``finite`` is accepted and ignored."""
        data = reader.array("<f2", size, f"tensor {name!r} fp16 values ({size * 2} bytes)")
        if size and ((data.view("<u2") & 0x7C00) == 0x7C00).any():  # exponent all ones: Inf or NaN
            raise MalformedMessage(f"tensor {name!r}: non-finite (NaN/Inf) value")
        return Record(name, shape, size, data)


class Int8(Codec):
    """One float32 scale per tensor, ``q`` in [-127, 127], value = ``q * scale``."""

    name = "int8"
    levels = 127

    def channels(self, shape: tuple[int, ...], size: int) -> int:
        return 1

    def encode(self, x: np.ndarray, shape: tuple[int, ...], spec: CodecSpec, rng: np.random.Generator) -> list[bytes]:
        rows = self.channels(shape, x.size)
        if rows == 1:
            scales = np.array([make_scale(abs_max(x), self.levels)], dtype=np.float32)
            q = stochastic_round(x, divisor(scales)[0], self.levels, rng)
        else:
            matrix = x.reshape(rows, -1)
            scales = make_scales(np.maximum(matrix.max(axis=1), -matrix.min(axis=1)), self.levels)
            q = stochastic_round(matrix, divisor(scales)[:, None], self.levels, rng).reshape(-1)
        return [scales.astype("<f4").tobytes(), self.pack(q)]

    def pack(self, q: np.ndarray) -> bytes:
        return q.tobytes()

    def parse(self, reader: Reader, name: str, shape: tuple[int, ...], size: int) -> Record:
        scales = read_scales(reader, name, self.channels(shape, size))
        data = reader.array("i1", size, f"tensor {name!r} int8 codes ({size} bytes)")
        if size and int(data.min()) == -128:
            raise MalformedMessage(f"tensor {name!r}: int8 code -128 is outside [-127, 127]")
        return Record(name, shape, size, data, scales=scales)

    def codes(self, record: Record) -> np.ndarray:
        return record.data

    def decode(self, record: Record) -> np.ndarray:
        return self._scaled(record, np.float32, 1.0)

    def decode_scaled64(self, record: Record, weight: float) -> np.ndarray:
        return self._scaled(record, np.float64, weight)

    def _scaled(self, record: Record, dtype: type[np.floating], weight: float) -> np.ndarray:
        assert record.scales is not None
        return dequantize(self.codes(record), record.scales, dtype, weight)


class Int8Channel(Int8):
    """One scale per slice along axis 0 (output channel); 0-d, 1-d and empty tensors use one scale."""

    name = "int8-channel"

    def channels(self, shape: tuple[int, ...], size: int) -> int:
        return shape[0] if len(shape) >= 2 and size > 0 else 1


def _nibble_tables() -> tuple[np.ndarray, np.ndarray]:
    values = np.arange(256)
    low, high = values & 0x0F, values >> 4
    table = np.stack([(low ^ 8) - 8, (high ^ 8) - 8], axis=1).astype(np.int8)
    return table, (low == 8) | (high == 8)


def _crumb_tables() -> tuple[np.ndarray, np.ndarray]:
    values = np.arange(256)
    crumbs = np.stack([(values >> (2 * i)) & 3 for i in range(4)], axis=1)
    table = np.choose(crumbs, [0, 1, 0, -1]).astype(np.int8)  # 00 -> 0, 01 -> +1, 11 -> -1; 10 is invalid
    return table, (crumbs == 2).any(axis=1)


_INT4_TABLE, _INT4_BAD = _nibble_tables()
_INT2_TABLE, _INT2_BAD = _crumb_tables()


class Int4(Int8):
    """One scale per tensor, signed nibbles in [-7, 7]; element 2i in the low nibble of byte i."""

    name = "int4"
    levels = 7
    per_byte = 2
    table, bad = _INT4_TABLE, _INT4_BAD

    def pack(self, q: np.ndarray) -> bytes:
        bits = 8 // self.per_byte
        codes = np.zeros(-(-q.size // self.per_byte) * self.per_byte, dtype=np.uint8)
        codes[: q.size] = q.view(np.uint8) & ((1 << bits) - 1)
        lanes = codes.reshape(-1, self.per_byte)
        packed = lanes[:, 0].copy()
        for lane in range(1, self.per_byte):
            packed |= lanes[:, lane] << (bits * lane)
        return packed.tobytes()

    def parse(self, reader: Reader, name: str, shape: tuple[int, ...], size: int) -> Record:
        scales = read_scales(reader, name, 1)
        nbytes = -(-size // self.per_byte)
        data = reader.take(nbytes, f"tensor {name!r} {self.name} codes ({nbytes} bytes)")
        if nbytes and np.take(self.bad, data).any():
            raise MalformedMessage(f"tensor {name!r}: invalid {self.name} code (only {-self.levels}..{self.levels})")
        used = size - (nbytes - 1) * self.per_byte
        if nbytes and int(data[-1]) >> (used * 8 // self.per_byte):
            raise MalformedMessage(f"tensor {name!r}: padding bits after the last {self.name} code are not zero")
        return Record(name, shape, size, data, scales=scales)

    def codes(self, record: Record) -> np.ndarray:
        return np.take(self.table, record.data, axis=0).reshape(-1)[: record.size]


class Int2(Int4):
    """One scale per tensor, codes {-1, 0, +1} as 2 bits (00 = 0, 01 = +1, 11 = -1); element 4i in bits 0-1."""

    name = "int2"
    levels = 1
    per_byte = 4
    table, bad = _INT2_TABLE, _INT2_BAD


class Sign(Codec):
    """scale = mean |x| (deterministic); one bit per element: set => +scale, clear => -scale."""

    name = "sign"

    def encode(self, x: np.ndarray, shape: tuple[int, ...], spec: CodecSpec, rng: np.random.Generator) -> list[bytes]:
        scale = np.float32(np.abs(x).mean(dtype=np.float64)) if x.size else np.float32(0)
        return [F32.pack(scale), np.packbits(x >= 0, bitorder="little").tobytes()]

    def parse(self, reader: Reader, name: str, shape: tuple[int, ...], size: int) -> Record:
        scales = read_scales(reader, name, 1)
        nbytes = -(-size // 8)
        data = reader.take(nbytes, f"tensor {name!r} sign bits ({nbytes} bytes)")
        if nbytes and int(data[-1]) >> (size - (nbytes - 1) * 8):
            raise MalformedMessage(f"tensor {name!r}: padding bits after the last sign bit are not zero")
        return Record(name, shape, size, data, scales=scales)

    def decode(self, record: Record) -> np.ndarray:
        return self._scaled(record, np.float32, 1.0)

    def decode_scaled64(self, record: Record, weight: float) -> np.ndarray:
        return self._scaled(record, np.float64, weight)

    def _scaled(self, record: Record, dtype: type[np.floating], weight: float) -> np.ndarray:
        assert record.scales is not None
        codes = np.unpackbits(record.data, count=record.size, bitorder="little").view(np.int8)
        codes <<= 1
        codes -= 1  # bit 1 -> +1, bit 0 -> -1
        out = codes.astype(dtype)
        out *= dtype(float(record.scales[0]) * weight)
        return out
