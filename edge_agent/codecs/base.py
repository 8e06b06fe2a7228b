"""The codec interface and the numeric helpers shared by the dense and sparse codecs."""

from __future__ import annotations

import math
import struct
from typing import ClassVar

import numpy as np

from edge_agent.codecs.reader import Reader, Record
from edge_agent.codecs.spec import CodecSpec
from edge_agent.errors import MalformedMessage

F32 = struct.Struct("<f")
F32_MAX = float(np.finfo(np.float32).max)
_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)


class Codec:
    """One wire codec. Subclasses are stateless singletons registered in :mod:`edge_agent.codecs.registry`.

    * :meth:`encode` turns one flat, finite float32 tensor into the codec data bytes;
    * :meth:`parse` reads and validates the codec data (phase 1: views only, nothing decoded);
    * :meth:`decode` materialises a validated record as a flat float32 array;
    * :meth:`accumulate` adds ``weight * decoded`` into a float64 accumulator of the record's shape.
    """

    name: ClassVar[str]

    def encode(self, x: np.ndarray, shape: tuple[int, ...], spec: CodecSpec, rng: np.random.Generator) -> list[bytes]:
        raise NotImplementedError

    def parse(self, reader: Reader, name: str, shape: tuple[int, ...], size: int) -> Record:
        raise NotImplementedError

    def decode(self, record: Record) -> np.ndarray:
        raise NotImplementedError

    def accumulate(self, record: Record, acc: np.ndarray, weight: float) -> None:
        """Default for dense codecs: decode to float64 already multiplied by ``weight``, then add."""
        acc += self.decode_scaled64(record, weight).reshape(acc.shape)

    def decode_scaled64(self, record: Record, weight: float) -> np.ndarray:
        raise NotImplementedError


def abs_max(x: np.ndarray) -> float:
    """max |x| of a finite array without an ``abs`` temporary (0.0 for an empty one)."""
    if x.size == 0:
        return 0.0
    return max(float(x.max()), -float(x.min()))


def make_scales(amax: np.ndarray, levels: int) -> np.ndarray:
    """float32 scales with ``amax / scale <= levels`` exactly in float32 (0 where ``amax`` is 0).

    ``amax / levels`` rounded to float32 can land a hair low (or underflow for tiny inputs), which
    would push ``x / scale`` past ``levels``; such scales are nudged up one ulp at a time.
    """
    amax32 = np.asarray(amax, dtype=np.float32)
    scales = (amax32.astype(np.float64) / levels).astype(np.float32)
    scales[(amax32 > 0) & (scales == 0)] = _TINY
    for _ in range(64):
        safe = np.where(scales > 0, scales, np.float32(1))
        over = (amax32 / safe) > np.float32(levels)
        if not over.any():
            return scales
        scales[over] = np.nextafter(scales[over], np.float32(np.inf))
    raise AssertionError("scale search did not converge")  # pragma: no cover - unreachable for finite input


def make_scale(amax: float, levels: int) -> np.float32:
    return np.float32(make_scales(np.array([amax], dtype=np.float32), levels)[0])


def stochastic_round(
    x: np.ndarray, scale: np.ndarray | np.float32, levels: int, rng: np.random.Generator
) -> np.ndarray:
    """Unbiased stochastic rounding of ``x / scale`` to int8 codes in ``[-levels, levels]``.

    ``q = floor(x / scale + u)`` with ``u ~ U[0, 1)`` so ``E[q] = x / scale``. ``scale`` is
    broadcastable against ``x`` and must be > 0 (see :func:`divisor`). All float32.
    """
    work = np.divide(x, scale, dtype=np.float32)
    work += rng.random(x.shape, dtype=np.float32)
    np.floor(work, out=work)
    np.clip(work, -levels, levels, out=work)
    return work.astype(np.int8)


def divisor(scales: np.ndarray) -> np.ndarray:
    """``scales`` with zeros replaced by 1 (a zero scale means the row is all zeros)."""
    return np.where(scales > 0, scales, np.float32(1)).astype(np.float32)


def read_scales(reader: Reader, name: str, count: int) -> np.ndarray:
    scales = reader.array("<f4", count, f"tensor {name!r} scale{'s' if count != 1 else ''}")
    if count == 1:  # the per-tensor codecs: a float check instead of four numpy calls
        scale = float(scales[0])
        if not (math.isfinite(scale) and scale >= 0):
            raise MalformedMessage(f"tensor {name!r}: scale {scale!r} is not a finite number >= 0")
    elif count and not (np.isfinite(scales).all() and (scales >= 0).all()):
        bad = scales[~(np.isfinite(scales) & (scales >= 0))][0]
        raise MalformedMessage(f"tensor {name!r}: scale {float(bad)!r} is not a finite number >= 0")
    return scales


def require_finite(values: np.ndarray, name: str) -> None:
    """Raise :class:`MalformedMessage` if ``values`` holds NaN/Inf (two reductions, no temporaries)."""
    if values.size and not (np.isfinite(values.max()) and np.isfinite(values.min())):
        raise MalformedMessage(f"tensor {name!r}: non-finite (NaN/Inf) value")


def dequantize(codes: np.ndarray, scales: np.ndarray, dtype: type[np.floating], weight: float) -> np.ndarray:
    """Flat ``codes * scale * weight`` in ``dtype``, one scale per equal slice of ``codes``.

    float32 results that would overflow (only possible for scales near the float32 limit,
    e.g. a hostile payload) are computed in float64 and saturated at the float32 maximum.
    """
    factors = scales.astype(np.float64) * weight
    wide = dtype is np.float32 and len(factors) > 0 and float(np.abs(factors).max()) * 128 > F32_MAX
    work: type[np.floating] = np.float64 if wide else dtype
    out = codes.astype(work)
    if len(factors) == 1:
        out *= work(factors[0])
    elif out.size:
        matrix = out.reshape(len(factors), -1)
        matrix *= factors.astype(work)[:, None]
    if wide:
        np.clip(out, -F32_MAX, F32_MAX, out=out)
        return out.astype(np.float32)
    return out
