"""Bad payloads: always MalformedMessage / UnsupportedVersion / ContractViolation, never a leak or a big allocation."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.codecs import CODEC_NAMES, DEFAULT_MAX_ELEMENTS, CodecSpec, decode_update, encode_update, payload_codec
from edge_agent.errors import ContractViolation, MalformedMessage, ProtocolError, UnsupportedVersion
from tests.edge_agent.codecs.helpers import f32, header, payload, record, ref, varint


def _valid(name: str, zstd: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    delta = {
        "conv.w": rng.standard_normal((3, 2, 3)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
        "s": np.float32(0.5) * np.ones((), np.float32),
    }
    if zstd:
        delta["zeros"] = np.zeros(600, np.float32)
    return encode_update(
        delta, CodecSpec(name, fraction=0.5) if "topk" in name else CodecSpec(name, zstd=zstd), rng=rng
    )


def _malformed(data: bytes, match: str = "", *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode_update(data, max_elements=max_elements)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_truncated_at_every_byte_offset(name: str) -> None:
    data = _valid(name)
    decode_update(data)
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage, match="truncated"):
            decode_update(data[:cut])


def test_truncated_zstd_payload_at_every_byte_offset() -> None:
    data = _valid("int8", zstd=True)
    assert data[6] == 1
    decode_update(data)
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage):
            decode_update(memoryview(data)[:cut])


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_trailing_bytes(name: str) -> None:
    _malformed(_valid(name) + b"\0", "1 trailing bytes")


def test_header_fields() -> None:
    body = record("w", (1,), "fp32", f32(1.0))
    assert decode_update(payload("fp32", body))["w"].tolist() == [1.0]
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode_update(payload("fp32", body, version=2))
    for codec_id in (0, 10, 255):
        with pytest.raises(UnsupportedVersion, match=f"^unknown codec id {codec_id}"):
            decode_update(payload(codec_id, body))
    _malformed(payload("fp32", body, flags=0x02), "flag bits 0x02")
    _malformed(payload("fp32", body, reserved=1), "reserved")
    _malformed(header("fp32", 1, magic=b"FFTS") + body, "magic")
    _malformed(header("fp32", 70_000) + body, "tensor count")


def test_tensor_heads() -> None:
    good = record("w", (1,), "fp32", f32(1.0))
    _malformed(payload("fp32", good, good), "duplicate tensor name 'w'")
    _malformed(payload("fp32", record(b"\xff\xfe", (1,), "fp32", f32(1.0))), "not UTF-8")
    _malformed(payload("fp32", b"\x01w\x09" + b"\x01" * 9 + b"\x01" + f32(1.0)), "'w': ndim 9")
    _malformed(payload("fp32", b"\x01w\x01\x80\x00\x01" + f32(1.0)), "'w' dims: non-minimal varint")
    _malformed(payload("fp32", b"\x01w\x01\x80\x80\x80\x80\x80\x01"), "'w' dims: varint longer than 5")
    _malformed(payload("fp32", b"\x01w\x01\xff\xff\xff\xff\x1f"), "'w' dims: varint exceeds 2\\*\\*32-1")
    _malformed(payload("fp32", b"\x01w\x01\x80\x80"), "truncated in tensor 'w' dims: unterminated varint")
    _malformed(payload("fp32", b"\x01w\x01\x01"), "truncated in tensor 'w' codec id")
    _malformed(payload("fp32", b"\x01w"), "truncated in tensor 'w' ndim")
    _malformed(payload("fp32", b"\x02w"), "truncated in tensor 0 name")


def test_positional_reference_heads() -> None:
    """Name length 0 is a position, not an empty name: its varint is checked like any other."""
    expected = {"w": (1,)}
    assert decode_update(payload("fp32", record(0, (1,), "fp32", f32(1.0))), expected)["w"].tolist() == [1.0]
    for body, match in [
        (b"\x00", "truncated in tensor 0 position: unterminated varint"),
        (b"\x00\x80", "truncated in tensor 0 position: unterminated varint"),
        (b"\x00\x80\x00\x01\x01\x01" + f32(1.0), "tensor 0 position: non-minimal varint"),
        (b"\x00\x80\x80\x80\x80\x80\x00", "tensor 0 position: varint longer than 5"),
        (b"\x00\xff\xff\xff\xff\x1f", "tensor 0 position: varint exceeds 2\\*\\*32-1"),
        (ref(0), "truncated in tensor 'w' ndim"),
        (ref(0) + b"\x01\x01", "truncated in tensor 'w' codec id"),
    ]:
        with pytest.raises(MalformedMessage, match=match):
            decode_update(payload("fp32", body), expected)
    # position 0 followed by the ndim byte: a truncated-looking "empty name" is a position here
    with pytest.raises(ContractViolation, match="tensor 0 is referenced by position"):
        decode_update(payload("fp32", record(b"", (1,), "fp32", f32(1.0))))


def test_element_limit_is_checked_before_allocating() -> None:
    huge = payload("fp32", record("w", (2**32 - 1, 2**32 - 1), "fp32", f32(1.0)))
    _malformed(huge, "'w'.* > max_elements 268435456")
    _malformed(
        payload("fp32", record("a", (6,), "fp32", f32(*range(6))), record("b", (5,), "fp32", f32(*range(5)))),
        "max_elements 10",
        max_elements=10,
    )
    tracemalloc.start()
    try:
        for name in CODEC_NAMES:
            count = 1 << 27  # 512 MiB as float32, 4.5 GiB of worst-case top-k: within max_elements
            bad = payload(name, record("w", (count,), name, varint(count) if "topk" in name else b"", f32(1.0)))
            with pytest.raises(MalformedMessage, match="truncated in tensor 'w'"):
                decode_update(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_topk_fields() -> None:
    _malformed(
        payload("topk", record("w", (4,), "topk", varint(5), b"\0" * 5, f32(*[1.0] * 5))), "'w': k = 5 > 4 elements"
    )
    _malformed(
        payload("topk", record("w", (4,), "topk", varint(2), b"\x01\x02", f32(1.0, 2.0))),
        "'w': top-k index 4 out of range",
    )
    _malformed(payload("topk", record("w", (300,), "topk", varint(1), b"\xac\x02", f32(1.0))), "index 300 out of range")
    out = decode_update(payload("topk", record("w", (4,), "topk", varint(2), b"\x01\x01", f32(1.0, 2.0))))["w"]
    assert out.tolist() == [0.0, 1.0, 0.0, 2.0]
    _malformed(
        payload("topk", record("w", (4,), "topk", varint(1), b"\x80\x80\x80\x80\x80\x00", f32(1.0))),
        "'w' top-k index gaps: varint longer than 5",
    )
    _malformed(payload("topk", record("w", (4,), "topk", varint(1), b"\x00", f32(float("nan")))), "'w': non-finite")
    _malformed(
        payload("topk-int8", record("w", (4,), "topk-int8", varint(1), f32(float("inf")), b"\x00\x01")),
        "'w': scale inf",
    )
    _malformed(
        payload("topk-int8", record("w", (4,), "topk-int8", varint(1), f32(1.0), b"\x00\x80")), "'w': int8 code -128"
    )
    _malformed(payload("topk", record("w", (4,), "topk", b"\x80\x80\x80\x80\x10")), "'w' k: varint exceeds")


@pytest.mark.parametrize(
    ("gaps", "match"),
    [
        (b"\x00" * 9 + b"\x80\x00", "non-minimal varint"),
        (b"\x00" * 9 + b"\xff\xff\xff\xff\x1f", "varint exceeds 2\\*\\*32-1"),
        (b"\x00" * 9 + b"\x80" * 6 + b"\x01", "longer than 5 bytes"),
        (b"\x80" * 40, "longer than 5 bytes"),
        (b"\x00" * 9 + b"\xff\x7f", "index 16392 out of range"),
    ],
)
def test_vectorised_gap_varints(gaps: bytes, match: str) -> None:
    _malformed(
        payload("topk", record("w", (100,), "topk", varint(10), gaps, f32(*[1.0] * 10))), f"'w' .*{match}|{match}"
    )


def test_unterminated_gap_varints_at_the_end() -> None:
    # topk-int8 needs only 2 bytes per kept element up front, so the gap window is the rest of the body
    body = record("w", (100,), "topk-int8", varint(10), f32(1.0), b"\x00" * 9 + b"\x80" * 11)
    _malformed(payload("topk-int8", body), "'w' top-k index gaps: varint longer than 5")
    _malformed(payload("topk", record("w", (100,), "topk", varint(10), b"\x00" * 10)), "truncated in tensor 'w' top-k")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_scales(bad: float) -> None:
    for name, data in [("int8", b"\x01"), ("int4", b"\x01"), ("int2", b"\x01"), ("sign", b"\x01")]:
        _malformed(payload(name, record("w", (1,), name, f32(bad), data)), "'w': scale .* finite number >= 0")
    _malformed(payload("int8-channel", record("w", (2, 1), "int8-channel", f32(1.0, bad), b"\x01\x01")), "'w': scale")


def test_non_finite_raw_values() -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        _malformed(payload("fp32", record("w", (2,), "fp32", f32(1.0, bad))), "'w': non-finite")
        _malformed(payload("fp16", record("w", (2,), "fp16", np.array([1.0, bad], "<f2").tobytes())), "'w': non-finite")


def test_invalid_codes_and_padding() -> None:
    _malformed(payload("int8", record("w", (2,), "int8", f32(1.0), b"\x01\x80")), "'w': int8 code -128")
    _malformed(payload("int4", record("w", (2,), "int4", f32(1.0), b"\x81")), "'w': invalid int4 code")
    _malformed(payload("int4", record("w", (1,), "int4", f32(1.0), b"\x11")), "'w': padding bits")
    _malformed(payload("int2", record("w", (4,), "int2", f32(1.0), b"\x20")), "'w': invalid int2 code")
    _malformed(payload("int2", record("w", (3,), "int2", f32(1.0), b"\x41")), "'w': padding bits")
    _malformed(payload("sign", record("w", (3,), "sign", f32(1.0), b"\x09")), "'w': padding bits")
    out = decode_update(payload("int2", record("w", (4,), "int2", f32(0.5), bytes([0b00_11_01_00]))))["w"]
    assert out.tolist() == [0.0, 0.5, -0.5, 0.0]
    assert decode_update(payload("int4", record("w", (3,), "int4", f32(1.0), b"\x9f\x07")))["w"].tolist() == [
        -1.0,
        -7.0,
        7.0,
    ]
    assert decode_update(payload("sign", record("w", (3,), "sign", f32(2.0), b"\x05")))["w"].tolist() == [
        2.0,
        -2.0,
        2.0,
    ]


def _zstd_payload(body: bytes, declared: int | None = None, count: int = 1, write_content_size: bool = True) -> bytes:
    frame = zstandard.ZstdCompressor(write_content_size=write_content_size).compress(body)
    size = len(body) if declared is None else declared
    return header("fp32", count, flags=1) + struct.pack("<I", size) + frame


def test_zstd_bombs_and_bad_frames() -> None:
    body = record("w", (4,), "fp32", f32(1.0, 2.0, 3.0, 4.0))
    assert decode_update(_zstd_payload(body))["w"].tolist() == [1.0, 2.0, 3.0, 4.0]
    # declared size over the limit: refused before decompressing
    _malformed(_zstd_payload(body, declared=10**6), "declares 1000000 uncompressed bytes > limit", max_elements=4)
    # actual size over the declared one, with and without a content size in the frame header
    bomb = record("w", (1 << 22,), "fp32", bytes(1 << 24))
    _malformed(_zstd_payload(bomb, declared=100), r"content size \d+ != declared body length 100")
    _malformed(_zstd_payload(bomb, declared=100, write_content_size=False), "does not decompress")
    _malformed(_zstd_payload(body, declared=len(body) + 1, write_content_size=False), "decompressed to")
    _malformed(_zstd_payload(body) + b"extra", "does not decompress")
    _malformed(header("fp32", 1, flags=1) + struct.pack("<I", len(body)) + b"not a zstd frame", "zstd")
    _malformed(header("fp32", 1, flags=1) + b"\x01\x00", "zstd body length")


def test_expected_names_and_shapes() -> None:
    data = payload("fp32", record("a", (2,), "fp32", f32(1.0, 2.0)), record("b", (), "fp32", f32(3.0)))
    assert set(decode_update(data, {"a": (2,), "b": ()})) == {"a", "b"}
    cases: list[tuple[dict[str, tuple[int, ...]], str]] = [
        ({"a": (2,)}, "unexpected tensor 'b'"),
        ({"a": (2,), "b": (), "c": (1,)}, r"lacks tensors \['c'\]"),
        ({"a": (1, 2), "b": ()}, r"'a': shape \(2,\) != expected \(1, 2\)"),
        ({"a": (2,), "b": (1,)}, r"'b': shape \(\) != expected \(1,\)"),
    ]
    for expected, match in cases:
        with pytest.raises(ContractViolation, match=match):
            decode_update(data, expected)


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(CODEC_NAMES), st.data())
def test_random_corruption_never_leaks_other_errors(name: str, data: st.DataObject) -> None:
    valid = bytearray(_valid(name))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(valid) - 1))
        valid[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        decode_update(bytes(valid), max_elements=1 << 16)


def test_payload_codec_reads_only_the_header() -> None:
    for name in CODEC_NAMES:
        assert payload_codec(_valid(name)[:12]) == name
    with pytest.raises(UnsupportedVersion):
        payload_codec(b"FFCU" + bytes(8))
    with pytest.raises(MalformedMessage, match="truncated"):
        payload_codec(b"FFCU")


def test_huge_scales_saturate_instead_of_overflowing() -> None:
    big = float(np.finfo(np.float32).max)
    for data in (
        payload("int8", record("w", (2,), "int8", f32(big), b"\x7f\x81")),
        payload("int4", record("w", (2,), "int4", f32(big), b"\x97")),
        payload("topk-int8", record("w", (3,), "topk-int8", varint(1), f32(big), b"\x02\x7f")),
    ):
        out = decode_update(data)["w"]
        assert np.isfinite(out).all() and np.abs(out).max() == np.float32(big)
