"""Byte encoding of every secure-aggregation message: round trips and clear errors on bad bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import ContractViolation, MalformedMessage, ProtocolError, UnsupportedVersion
from edge_agent.secagg import (
    Abort,
    AdvertiseKeys,
    DeviceKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    Setup,
    ShareBundle,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
    decode,
    decode_as,
    encode,
)
from edge_agent.secagg.wire import BLOB_BYTES
from tests.edge_agent.secagg.helpers import make_params

S = bytes(range(16))
KEYS = [DeviceKeys(i, bytes([i]) * 32, bytes([100 + i]) * 32) for i in (1, 2, 7)]


def _messages() -> list:
    blob = lambda i: bytes([i]) * BLOB_BYTES  # noqa: E731
    return [
        Setup(make_params(300, 12345, clip=0.25), 299),
        AdvertiseKeys(S, KEYS[0]),
        KeyList(S, tuple(KEYS)),
        EncryptedShares(S, 2, {1: blob(1), 7: blob(7)}),
        ShareBundle(S, 7, {1: blob(1), 2: blob(2)}),
        UnmaskRequest(S, (1, 2, 9), (3, 65535)),
        UnmaskRequest(S, (), ()),
        UnmaskResponse(S, 2, {1: (ShareKind.SELF_MASK_SEED, b"\x01" * 64), 3: (ShareKind.MASK_KEY, b"\x02" * 64)}),
        Abort(S, "only 3 devices sent masked inputs; the threshold is 4 — ü"),
    ]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_roundtrip(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    assert data[:4] == b"FFSA" and data[4] == 1 and data[6:22] == S
    assert decode(data) == message
    assert decode(memoryview(data)) == message


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 64), data=st.data())
def test_masked_input_roundtrip(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=30))
    dtype = np.dtype("<u4") if bits <= 32 else np.dtype("<u8")
    message = MaskedInput(S, 3, bits, np.array(values, dtype=dtype))
    encoded = encode(message)
    assert len(encoded) == 22 + 2 + 1 + 4 + len(values) * ((bits + 7) // 8)
    back = decode(encoded)
    assert isinstance(back, MaskedInput) and (back.sender, back.ring_bits) == (3, bits)
    assert back.values.dtype == dtype and back.values.tolist() == values


@pytest.mark.parametrize("message", [*_messages(), MaskedInput(S, 1, 24, np.arange(5, dtype="<u4"))])
def test_every_truncation_is_a_clear_error(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage, match=r"truncated|expected"):
            decode(data[:cut])
    with pytest.raises(MalformedMessage, match="1 unexpected bytes after the message"):
        decode(data + b"\x00")


def test_header_errors() -> None:
    good = encode(AdvertiseKeys(S, KEYS[0]))
    with pytest.raises(MalformedMessage, match="bad magic"):
        decode(b"XXXX" + good[4:])
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode(good[:4] + b"\x02" + good[5:])
    with pytest.raises(MalformedMessage, match="unknown type 10"):
        decode(good[:5] + b"\x0a" + good[6:])
    with pytest.raises(MalformedMessage, match="truncated at header"):
        decode(b"")


def test_body_errors_name_the_problem() -> None:
    header = lambda kind: b"FFSA\x01" + bytes([kind]) + S  # noqa: E731
    u16 = lambda *xs: b"".join(struct.pack("<H", x) for x in xs)  # noqa: E731
    keys = lambda i: u16(i) + b"k" * 32 + b"m" * 32  # noqa: E731
    cases = [
        (header(2) + u16(0) + b"k" * 64, "AdvertiseKeys: index is 0"),
        (header(3) + u16(2) + keys(5) + keys(5), "KeyList: device indices are not strictly increasing"),
        (header(7) + u16(2, 3, 1) + u16(0), "survivor indices are not strictly increasing"),
        (header(7) + u16(1, 3) + u16(1, 3), "both survivor and dropped"),
        (header(8) + u16(1, 1, 4) + b"\x03" + b"s" * 64, "unknown share kind 3 for owner 4"),
        (header(6) + u16(1) + b"\x00" + struct.pack("<I", 0), "ring_bits 0"),
        (header(6) + u16(1) + b"\x41" + struct.pack("<I", 0), "ring_bits 65"),
        (header(6) + u16(1) + b"\x09" + struct.pack("<I", 1) + b"\xff\xff", "not below 2\\*\\*9"),
        (header(9) + u16(2) + b"\xff\xfe", "not UTF-8"),
        (header(9) + u16(2000) + b"x" * 2000, "exceeds 1024"),
        (header(1) + struct.pack("<HHHBBdI", 1, 10, 11, 8, 16, 0.1, 5), "secagg.threshold"),
        (header(1) + struct.pack("<HHHBBdI", 11, 10, 7, 8, 16, 0.1, 5), "secagg.index"),
        (header(1) + struct.pack("<HHHBBdI", 1, 10, 7, 8, 16, float("nan"), 5), "secagg.clip"),
        (header(1) + struct.pack("<HHHBBdI", 1, 300, 201, 8, 16, 0.1, 5), "at most 258 devices"),
    ]
    for data, reason in cases:
        with pytest.raises(MalformedMessage, match=reason):
            decode(data)


def test_encode_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ContractViolation, match="share blob"):
        encode(EncryptedShares(S, 2, {1: b"short"}))
    with pytest.raises(ContractViolation, match="session"):
        encode(AdvertiseKeys(b"x", KEYS[0]))
    with pytest.raises(ContractViolation, match="not a u16"):
        encode(UnmaskRequest(S, (70000,), ()))
    long = decode(encode(Abort(S, "é" * 700)))
    assert isinstance(long, Abort) and long.reason == "é" * 512  # cut at 1024 bytes, on a character boundary


def test_decode_as_checks_the_type() -> None:
    data = encode(AdvertiseKeys(S, KEYS[0]))
    assert decode_as(data, AdvertiseKeys) == AdvertiseKeys(S, KEYS[0])
    with pytest.raises(ContractViolation, match="expected a KeyList message, got AdvertiseKeys"):
        decode_as(data, KeyList)


@settings(max_examples=300, deadline=None)
@given(kind=st.integers(1, 9), body=st.binary(max_size=300))
def test_garbage_bodies_raise_protocol_errors_or_decode_canonically(kind: int, body: bytes) -> None:
    data = b"FFSA\x01" + bytes([kind]) + S + body
    try:
        message = decode(data)
    except ProtocolError:
        return
    assert encode(message) == data  # anything accepted has exactly one encoding
