"""Float updates <-> integers modulo ``2**k``: the ring secure aggregation masks and sums in.

A device clips its flat float update to ``[-clip, clip]``, maps it to ``b``-bit codes
``q in [-L, L]`` with ``L = 2**(b-1) - 1`` by unbiased stochastic rounding
(``q = floor(x * L / clip + u)``, ``u ~ U[0, 1)``, so ``E[q] = x * L / clip``) and shifts them to
``q + L in [0, 2L]``. The server only ever sees the sum over the ``count`` surviving devices,
``S = sum(q_u + L)``, which lies in ``[0, count * 2L]``.

**Overflow bound.** The sum is exact (no wrap-around) iff ``count * 2L <= 2**k - 1``, so the
ring has ``k >= bit_length(n * 2L)`` bits for a cohort of ``n`` devices: :func:`required_ring_bits`.
:func:`ring_spec_for` rounds that up to whole bytes (the wire carries ``ceil(k / 8)`` bytes per
value anyway): ``b = 8`` gives ``k = 16`` up to 258 devices and ``k = 24`` up to 66,052.

**Error bound.** Each code is within one step ``clip / L`` of ``x * L / clip`` (stochastic rounding
picks one of the two neighbours), so the decoded float sum differs from the sum of the *clipped*
float updates by less than ``count * clip / L`` per coordinate, and the mean by less than
``clip / L`` (:func:`quantization_bound`). It is unbiased, like the int8 codec's rounding.

**Relation to the int8 codec** (:mod:`edge_agent.codecs.quantize`): with ``b = 8`` the codes are
the same ``[-127, 127]`` range and the same ``floor(v + u)`` rounding, but the scale is the
cohort-wide constant ``clip / 127`` instead of each tensor's ``absmax / 127``: under masking the
server can only add integers, so every device must use the same scale. A device that would send
int8 codes pays ``ceil(k / 8)`` bytes per value instead of one (plus no per-tensor scales).

Pure numpy; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_agent.errors import ConfigError, MalformedMessage, SecAggInputError

MIN_QUANT_BITS = 2
MAX_QUANT_BITS = 24
MAX_RING_BITS = 64


@dataclass(frozen=True, kw_only=True)
class RingSpec:
    """How a cohort maps float updates to ``Z_{2**ring_bits}``: clip ``c``, code bits ``b``, ring bits ``k``."""

    clip: float
    quant_bits: int
    ring_bits: int

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, float | int) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secagg.clip must be a finite number > 0, got {self.clip!r}")
        if not (isinstance(self.quant_bits, int) and MIN_QUANT_BITS <= self.quant_bits <= MAX_QUANT_BITS):
            raise ConfigError(
                f"secagg.quant_bits must be in {MIN_QUANT_BITS}..{MAX_QUANT_BITS}, got {self.quant_bits!r}"
            )
        if not (isinstance(self.ring_bits, int) and self.quant_bits <= self.ring_bits <= MAX_RING_BITS):
            raise ConfigError(
                f"secagg.ring_bits must be in {self.quant_bits}..{MAX_RING_BITS} (at least quant_bits), "
                f"got {self.ring_bits!r}"
            )

    @property
    def levels(self) -> int:
        """``L``: codes are in ``[-L, L]`` before the shift."""
        return (1 << (self.quant_bits - 1)) - 1

    @property
    def step(self) -> float:
        """The float value of one code step, ``clip / L``."""
        return float(self.clip) / self.levels

    @property
    def modulus(self) -> int:
        return 1 << self.ring_bits

    @property
    def dtype(self) -> np.dtype:
        """The little-endian word ring values are held in: uint32 for ``k <= 32``, else uint64."""
        return word_dtype(self.ring_bits)

    @property
    def width(self) -> int:
        """Bytes per value on the wire: ``ceil(k / 8)``."""
        return (self.ring_bits + 7) // 8

    @property
    def capacity(self) -> int:
        """The most devices whose shifted codes can be summed without wrapping around."""
        return (self.modulus - 1) // (2 * self.levels)


def required_ring_bits(devices: int, quant_bits: int) -> int:
    """The fewest ring bits ``k`` with ``devices * 2L <= 2**k - 1``."""
    if devices < 1:
        raise ConfigError(f"secagg.cohort must be >= 1, got {devices}")
    levels = (1 << (quant_bits - 1)) - 1
    return (devices * 2 * levels).bit_length()


def ring_spec_for(devices: int, *, clip: float, quant_bits: int = 8) -> RingSpec:
    """A :class:`RingSpec` for ``devices`` devices with ``k`` rounded up to whole bytes."""
    bits = required_ring_bits(devices, quant_bits)
    return RingSpec(clip=clip, quant_bits=quant_bits, ring_bits=min(MAX_RING_BITS, -(-bits // 8) * 8))


def quantize(update: np.ndarray, spec: RingSpec, rng: np.random.Generator) -> np.ndarray:
    """Clip, stochastically round and shift a flat float update to ring values in ``[0, 2L]``."""
    x = np.asarray(update)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
        raise SecAggInputError(f"update must be a flat float array, got dtype {x.dtype} and shape {x.shape}")
    if x.size and not (np.isfinite(x.max()) and np.isfinite(x.min())):
        raise SecAggInputError("update holds a non-finite (NaN/Inf) value")
    work = np.clip(x, -spec.clip, spec.clip, dtype=np.float64)
    work *= spec.levels / float(spec.clip)
    work += rng.random(x.shape, dtype=np.float64)
    np.floor(work, out=work)
    np.clip(work, -spec.levels, spec.levels, out=work)
    work += spec.levels
    return work.astype(spec.dtype)


def reduce(values: np.ndarray, spec: RingSpec) -> np.ndarray:
    """``values mod 2**k`` in place (words wrap mod ``2**32``/``2**64``, a multiple of ``2**k``)."""
    if spec.ring_bits < values.dtype.itemsize * 8:
        values &= values.dtype.type(spec.modulus - 1)
    return values


def check_ring_vector(values: np.ndarray, spec: RingSpec, length: int) -> np.ndarray:
    """``values`` as a fresh array of ring words, or :class:`SecAggInputError` if it is not one."""
    arr = np.asarray(values)
    if arr.shape != (length,):
        raise SecAggInputError(f"ring vector must have shape ({length},), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise SecAggInputError(f"ring vector must hold integers, got dtype {arr.dtype}")
    if length and (int(arr.min()) < 0 or int(arr.max()) >= spec.modulus):
        raise SecAggInputError(f"ring vector values must be in [0, 2**{spec.ring_bits})")
    return arr.astype(spec.dtype, copy=True)


def decode_sum(ring_sum: np.ndarray, count: int, spec: RingSpec) -> np.ndarray:
    """The float64 sum of ``count`` devices' quantized updates from their ring sum.

    Raises :class:`SecAggInputError` if a value exceeds ``count * 2L``: the sum of honest inputs
    never does, so masks that did not cancel (inconsistent views of the cohort) show up here
    instead of as a plausible-looking model update.
    """
    if count < 1 or count > spec.capacity:
        raise SecAggInputError(f"count must be in 1..{spec.capacity} for this ring, got {count}")
    top = count * 2 * spec.levels
    if ring_sum.size and int(ring_sum.max()) > top:
        raise SecAggInputError(
            f"ring sum value {int(ring_sum.max())} exceeds {top} = count * 2L: the masks did not cancel"
        )
    signed = ring_sum.astype(np.int64) - count * spec.levels
    return signed.astype(np.float64) * spec.step


def decode_mean(ring_sum: np.ndarray, count: int, spec: RingSpec) -> np.ndarray:
    """:func:`decode_sum` divided by ``count``."""
    return decode_sum(ring_sum, count, spec) / count


def quantization_bound(count: int, spec: RingSpec) -> float:
    """A strict bound on ``|decode_sum - sum of clipped updates|`` per coordinate: ``count * clip / L``."""
    return count * spec.step


def word_dtype(ring_bits: int) -> np.dtype:
    """The little-endian word ring values are held in: uint32 for ``k <= 32``, else uint64."""
    return np.dtype("<u4") if ring_bits <= 32 else np.dtype("<u8")


def pack(values: np.ndarray, ring_bits: int) -> bytes:
    """Ring values as ``ceil(k / 8)`` little-endian bytes each (the low bytes of each word)."""
    dtype, width = word_dtype(ring_bits), (ring_bits + 7) // 8
    words = np.ascontiguousarray(values, dtype=dtype)
    if width == dtype.itemsize:
        return words.tobytes()
    return words.view(np.uint8).reshape(-1, dtype.itemsize)[:, :width].tobytes()


def unpack(data: bytes | memoryview, ring_bits: int, length: int) -> np.ndarray:
    """The inverse of :func:`pack`; :class:`MalformedMessage` on a wrong size or a value ``>= 2**k``."""
    if not 1 <= ring_bits <= MAX_RING_BITS:
        raise MalformedMessage(f"ring_bits must be in 1..{MAX_RING_BITS}, got {ring_bits}")
    dtype, width = word_dtype(ring_bits), (ring_bits + 7) // 8
    if len(data) != length * width:
        raise MalformedMessage(f"ring values: expected {length * width} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if width == dtype.itemsize:
        values = raw.view(dtype).copy()
    else:
        wide = np.zeros((length, dtype.itemsize), dtype=np.uint8)
        wide[:, :width] = raw.reshape(length, width)
        values = wide.view(dtype).reshape(length)
    if ring_bits < width * 8 and length and int(values.max()) >> ring_bits:
        raise MalformedMessage(f"ring value {int(values.max())} is not below 2**{ring_bits}")
    return values
