"""Sparse codecs: top-k (float32 values) and top-k-int8 (stochastically rounded int8 values).

Each tensor keeps its ``k = max(1, ceil(fraction * n))`` largest-magnitude elements; indices go
on the wire as LEB128 gaps (first index, then ``index - previous - 1``), so they are strictly
increasing by construction and the decoder only has to check the last one against ``n``.
"""

from __future__ import annotations

import numpy as np

from edge_agent.codecs.base import (
    F32,
    Codec,
    abs_max,
    dequantize,
    divisor,
    make_scale,
    read_scales,
    require_finite,
    stochastic_round,
)
from edge_agent.codecs.reader import Reader, Record, encode_varints
from edge_agent.codecs.spec import CodecSpec
from edge_agent.errors import MalformedMessage


def top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest ``|x|`` (ties broken arbitrarily)."""
    n = x.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    chosen = np.argpartition(np.abs(x), n - k)[n - k :]
    chosen.sort()
    return chosen.astype(np.int64, copy=False)


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.diff(indices, prepend=-1)
    gaps -= 1
    return gaps


class TopK(Codec):
    """``varint k``, ``k`` varint gaps, ``k`` float32 values."""

    name = "topk"
    value_bytes = 4

    def encode(self, x: np.ndarray, shape: tuple[int, ...], spec: CodecSpec, rng: np.random.Generator) -> list[bytes]:
        indices = top_indices(x, spec.topk_count(x.size))
        values = x[indices]
        return [encode_varints(np.array([len(indices)])), *self.encode_values(values, indices, rng)]

    def encode_values(self, values: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> list[bytes]:
        return [encode_varints(_gaps(indices)), values.astype("<f4").tobytes()]

    def parse(self, reader: Reader, name: str, shape: tuple[int, ...], size: int) -> Record:
        k = reader.varint(f"tensor {name!r} k")
        if k > size:
            raise MalformedMessage(f"tensor {name!r}: k = {k} > {size} elements")
        scales = self.parse_scales(reader, name)
        reader.need(k * (1 + self.value_bytes), f"tensor {name!r} top-k indices and values (k = {k})")
        indices = np.cumsum(reader.varints(k, f"tensor {name!r} top-k index gaps") + np.uint64(1)).astype(np.int64)
        indices -= 1
        if k and int(indices[-1]) >= size:
            raise MalformedMessage(f"tensor {name!r}: top-k index {int(indices[-1])} out of range for {size} elements")
        data = self.parse_values(reader, name, k)
        return Record(name, shape, size, data, scales=scales, indices=indices)

    def parse_scales(self, reader: Reader, name: str) -> np.ndarray | None:
        return None

    def parse_values(self, reader: Reader, name: str, k: int) -> np.ndarray:
        data = reader.array("<f4", k, f"tensor {name!r} top-k values ({4 * k} bytes)")
        require_finite(data, name)
        return data

    def values(self, record: Record, dtype: type[np.floating], weight: float) -> np.ndarray:
        out = record.data.astype(dtype)
        if weight != 1.0:
            out *= dtype(weight)
        return out

    def decode(self, record: Record) -> np.ndarray:
        assert record.indices is not None
        out = np.zeros(record.size, dtype=np.float32)
        out[record.indices] = self.values(record, np.float32, 1.0)
        return out

    def accumulate(self, record: Record, acc: np.ndarray, weight: float) -> None:
        """Scatter-add straight into the accumulator (indices are unique, so fancy ``+=`` is exact)."""
        assert record.indices is not None
        values = self.values(record, np.float64, weight)
        flat = acc.reshape(-1) if acc.flags.c_contiguous else None
        if flat is not None:
            flat[record.indices] += values
        else:
            acc[np.unravel_index(record.indices, acc.shape)] += values


class TopKInt8(TopK):
    """``varint k``, float32 scale (max kept |x| / 127), ``k`` varint gaps, ``k`` int8 codes."""

    name = "topk-int8"
    value_bytes = 1

    def encode_values(self, values: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> list[bytes]:
        scale = make_scale(abs_max(values), 127)
        codes = stochastic_round(values, divisor(np.array([scale]))[0], 127, rng)
        return [F32.pack(scale), encode_varints(_gaps(indices)), codes.tobytes()]

    def parse_scales(self, reader: Reader, name: str) -> np.ndarray | None:
        return read_scales(reader, name, 1)

    def parse_values(self, reader: Reader, name: str, k: int) -> np.ndarray:
        data = reader.array("i1", k, f"tensor {name!r} top-k int8 codes ({k} bytes)")
        if k and int(data.min()) == -128:
            raise MalformedMessage(f"tensor {name!r}: int8 code -128 is outside [-127, 127]")
        return data

    def values(self, record: Record, dtype: type[np.floating], weight: float) -> np.ndarray:
        assert record.scales is not None
        return dequantize(record.data, record.scales, dtype, weight)
