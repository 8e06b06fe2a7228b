"""Shared test data and a hand-rolled FFCU builder for crafting bad payloads."""

from __future__ import annotations

import struct

import numpy as np

from edge_agent.codecs import CODEC_IDS

CNN_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (16, 1, 3, 3),
    "conv1.bias": (16,),
    "bn1.weight": (16,),
    "bn1.bias": (16,),
    "conv2.weight": (32, 16, 3, 3),
    "conv2.bias": (32,),
    "bn2.weight": (32,),
    "bn2.bias": (32,),
    "fc.weight": (10, 128),
    "fc.bias": (10,),
}


def cnn_delta(seed: int = 0, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in CNN_SHAPES.items()}


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def header(
    codec: str | int,
    count: int,
    *,
    version: int = 1,
    flags: int = 0,
    reserved: int = 0,
    magic: bytes = b"FFCU",
) -> bytes:
    codec_id = CODEC_IDS[codec] if isinstance(codec, str) else codec
    return struct.pack("<4sBBBBI", magic, version, codec_id, flags, reserved, count)


def ref(name: str | bytes | int) -> bytes:
    """A record's tensor reference: ``u8 N`` + name, or (an int) ``0x00`` + varint position."""
    if isinstance(name, int):
        return b"\0" + varint(name)
    raw = name.encode() if isinstance(name, str) else name
    return bytes([len(raw)]) + raw


def record(name: str | bytes | int, dims: tuple[int, ...], codec: str | int, *data: bytes) -> bytes:
    """One tensor record: reference (name, or position when ``name`` is an int), dims, codec id, data."""
    codec_id = CODEC_IDS[codec] if isinstance(codec, str) else codec
    return ref(name) + bytes([len(dims)]) + b"".join(varint(d) for d in dims) + bytes([codec_id]) + b"".join(data)


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def payload(codec: str | int, *records: bytes, version: int = 1, flags: int = 0, reserved: int = 0) -> bytes:
    return header(codec, len(records), version=version, flags=flags, reserved=reserved) + b"".join(records)
