"""The FFCU ("fedflock compressed update") wire format, version 1, and its encoder.

A model update (name -> float32 tensor). The header names the update's codec; every record
names its own (a device sends BatchNorm running statistics with a milder codec than the
weights, see :func:`edge_agent.codecs.choose.buffer_codec`). All integers are
little-endian; ``f32`` is an IEEE-754 binary32, ``f16`` a binary16; ``varint`` is unsigned
LEB128 of a value < 2**32: 7 bits per byte, least significant group first, high bit set on
every byte but the last, at most 5 bytes, minimal length (no trailing 0x80/0x00 groups; the
5th byte, if any, is <= 0x0F). Decoders reject anything else.

Header (12 bytes)::

    offset  size  field
    0       4     magic b"FFCU"
    4       1     version = 1            (other: UnsupportedVersion)
    5       1     the update's codec id, see table (unknown: UnsupportedVersion)
    6       1     flags: bit 0 = body is zstd-compressed; bits 1-7 must be 0
    7       1     reserved, must be 0
    8       4     u32 tensor count T (<= 65536)
    12      ...   body

If flags bit 0 is set the body is ``u32 L`` (length of the uncompressed body) followed by ONE
zstd frame (nothing after it) that decompresses to exactly ``L`` bytes. Decoders check ``L``
against their limit (below) before decompressing and never produce more than ``L`` bytes.
Encoders compress only when that makes the payload smaller.

Body: T tensor records back to back, no padding, no trailing bytes::

    size      field
    1         u8 name length N (0..255)
    N         name, UTF-8 (N >= 1), or, when N = 0, a varint i: the tensor is entry i of the
              model's aggregated-tensor list (manifest order of the bundle the task named);
              either way a tensor appears at most once
    1         u8 ndim D (0..8)
    D varints dims (C order); n = product of dims (1 when D = 0)
    1         u8 codec id of this record: the update's codec, or a mild one (fp32, fp16,
              int8); anything else is a ContractViolation
    ...       codec data for the n elements, C order:

    id  codec         codec data
    1   fp32          n f32                                   value = f32 (finite)
    2   fp16          n f16                                   value = f16 (finite)
    3   int8          f32 s, n i8 q                           value = q * s
    4   int8-channel  C f32 s[C], n i8 q                      value = q * s[i // (n / C)]
    5   int4          f32 s, ceil(n/2) bytes                  value = q * s
    6   int2          f32 s, ceil(n/4) bytes                  value = q * s
    7   sign          f32 s, ceil(n/8) bytes                  value = +s if bit set else -s
    8   topk          varint k, k varint gaps, k f32 v        value[idx_j] = v_j, 0 elsewhere
    9   topk-int8     varint k, f32 s, k varint gaps, k i8 q  value[idx_j] = q_j * s, 0 elsewhere

* Scales ``s`` are finite and >= 0; an all-zero tensor has s = 0. Codes q are in
  [-127, 127] (int8, -128 is invalid), [-7, 7] (int4), {-1, 0, +1} (int2).
* int8-channel: C = dims[0] when D >= 2 and n > 0, else C = 1 (one scale per slice along axis 0).
* int4: byte i holds element 2i in bits 0-3 and element 2i+1 in bits 4-7, each a 4-bit two's
  complement nibble (0x8 = -8 is invalid).
* int2: byte i holds element 4i+j in bits 2j..2j+1: 00 = 0, 01 = +1, 11 = -1 (10 is invalid).
* sign: byte i holds element 8i+j in bit j.
* int4/int2/sign: unused bits of the last byte are 0.
* top-k: 0 <= k <= n; gap_0 = idx_0 and gap_j = idx_j - idx_{j-1} - 1, so indices strictly
  increase; idx_{k-1} < n (flat C-order index).

Decoder limits: the element count summed over all tensors must not exceed ``max_elements``
(checked from the dims before anything is allocated); a zstd body may declare at most
``T * 308 + max_elements * 9`` bytes (9 = the most bytes per element of any codec, top-k).

Encoders (this module): quantizers use ``s = max|x| / levels`` (levels 127, 7, 1; rounded up
to the next float32 when needed so ``|x| / s <= levels``) and unbiased stochastic rounding
``q = clip(floor(x / s + u), -levels, levels)``, ``u ~ U[0, 1)`` from the caller's rng, so
``E[q * s] = x`` and ``|x - q * s| <= s``. sign uses s = mean|x| and sets the bit for x >= 0.
top-k keeps ``max(1, ceil(fraction * n))`` largest-magnitude elements per non-empty tensor.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent.codecs.base import Codec
from edge_agent.codecs.choose import MILD_CODECS
from edge_agent.codecs.quantize import Fp16, Fp32, Int2, Int4, Int8, Int8Channel, Sign
from edge_agent.codecs.reader import U32_MAX, encode_varints
from edge_agent.codecs.sparse import TopK, TopKInt8
from edge_agent.codecs.spec import CODEC_IDS, CodecSpec

try:
    zstd: Any = importlib.import_module("zstandard")
except ImportError:  # pragma: no cover - exercised only where zstandard is missing
    zstd = None

MAGIC = b"FFCU"
VERSION = 1
FLAG_ZSTD = 0x01
MAX_TENSORS = 65_536
MAX_NDIM = 8
MAX_NAME_BYTES = 255
DEFAULT_MAX_ELEMENTS = 1 << 28
ZSTD_LEVEL = 3

HEADER = struct.Struct("<4sBBBBI")
BODY_LENGTH = struct.Struct("<I")

CODECS: dict[int, Codec] = {
    CODEC_IDS[codec.name]: codec
    for codec in (Fp32(), Fp16(), Int8(), Int8Channel(), Int4(), Int2(), Sign(), TopK(), TopKInt8())
}

_MAX_RECORD_OVERHEAD = 1 + MAX_NAME_BYTES + 1 + MAX_NDIM * 5 + 1 + 10  # name, dims, codec, k/scale/last byte
_MAX_BYTES_PER_ELEMENT = 9  # top-k: a 5-byte varint gap and a float32 per element


def max_body_bytes(tensors: int, max_elements: int) -> int:
    """The largest uncompressed body a valid update within ``max_elements`` can have."""
    return tensors * _MAX_RECORD_OVERHEAD + max_elements * _MAX_BYTES_PER_ELEMENT


def _record_head(name: str, shape: tuple[int, ...], position: int | None, codec_id: int) -> bytes:
    raw = name.encode("utf-8") if isinstance(name, str) else b""
    if not 1 <= len(raw) <= MAX_NAME_BYTES:
        raise ValueError(f"tensor name must be a str of 1..{MAX_NAME_BYTES} UTF-8 bytes: {name!r}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensor {name!r}: {len(shape)} dims > {MAX_NDIM}")
    if any(dim > U32_MAX for dim in shape):
        raise ValueError(f"tensor {name!r}: dimension > 2**32-1 in {shape}")
    ref = (
        b"\0" + encode_varints(np.array([position], dtype=np.uint64))
        if position is not None
        else bytes([len(raw)]) + raw
    )
    dims = encode_varints(np.array(shape, dtype=np.uint64))
    return ref + bytes([len(shape)]) + dims + bytes([codec_id])


def float32_array(name: str, value: object) -> np.ndarray:
    """``value`` as a float32 array (numpy arrays and scalars only); ``ValueError`` otherwise."""
    if not isinstance(value, (np.ndarray, np.generic)) or value.dtype != np.float32:
        kind = value.dtype if isinstance(value, (np.ndarray, np.generic)) else type(value).__name__
        raise ValueError(f"tensor {name!r}: expected a float32 numpy array, got {kind}")
    return np.asarray(value)


def _flat_float32(array: np.ndarray, name: str) -> np.ndarray:
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.size and not (np.isfinite(flat.max()) and np.isfinite(flat.min())):
        raise ValueError(f"tensor {name!r}: non-finite (NaN/Inf) values cannot be encoded")
    return flat


def encode_update(
    delta: Mapping[str, np.ndarray],
    spec: CodecSpec,
    *,
    rng: np.random.Generator,
    overrides: Mapping[str, CodecSpec] | None = None,
    order: Sequence[str] | None = None,
) -> bytes:
    """Encode float32 tensors as one FFCU payload (order preserved).

    ``rng`` drives stochastic rounding (int8, int8-channel, int4, int2, topk-int8); the output is
    deterministic given its state. ``overrides`` gives some tensors another codec than ``spec``.
    With ``order`` (the model's aggregated-tensor names, manifest order) records reference
    tensors by position instead of by name, which saves the names' bytes; the decoder then needs
    the same list (``expected``). Raises ``ValueError`` for non-float32 or non-finite tensors,
    fp16 overflow, or names/shapes the format cannot carry.
    """
    if not isinstance(spec, CodecSpec):
        raise TypeError(f"spec must be a CodecSpec, got {type(spec).__name__}")
    if len(delta) > MAX_TENSORS:
        raise ValueError(f"too many tensors: {len(delta)} > {MAX_TENSORS}")
    positions = None
    if order is not None:
        positions = {name: index for index, name in enumerate(order)}
        if len(positions) != len(order):
            raise ValueError("the tensor order names a tensor twice")
        if set(order) != set(delta):
            raise ValueError(f"the tensor order and the update differ: {sorted(set(order) ^ set(delta))[:5]}")
    for name, override in (overrides or {}).items():
        if override.name != spec.name and override.name not in MILD_CODECS:
            raise ValueError(f"tensor {name!r}: codec {override.name!r} in a {spec.name} update (only {MILD_CODECS})")
    parts: list[bytes] = []
    for name, value in delta.items():
        tensor_spec = (overrides or {}).get(name, spec)
        codec = CODECS[tensor_spec.codec_id]
        array = float32_array(name, value)
        if positions is not None and name not in positions:
            raise ValueError(f"tensor {name!r} is not in the given tensor order")
        head = _record_head(name, array.shape, positions[name] if positions else None, tensor_spec.codec_id)
        flat = _flat_float32(array, name)
        try:
            data = codec.encode(flat, array.shape, tensor_spec, rng)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
        parts.append(head)
        parts.extend(data)
    if spec.zstd and zstd is not None and parts:
        body = b"".join(parts)
        frame = zstd.ZstdCompressor(level=ZSTD_LEVEL).compress(body)
        if BODY_LENGTH.size + len(frame) < len(body):
            header = HEADER.pack(MAGIC, VERSION, spec.codec_id, FLAG_ZSTD, 0, len(delta))
            return header + BODY_LENGTH.pack(len(body)) + frame
    return b"".join([HEADER.pack(MAGIC, VERSION, spec.codec_id, 0, 0, len(delta)), *parts])
