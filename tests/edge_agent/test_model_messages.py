"""MODEL (type 7) and FETCH (type 8): byte layout, round trips, and rejection of bad headers."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import MalformedMessage
from edge_agent.protocol.messages import ChunkAck, ChunkMessage, decode_message, encode_message
from edge_agent.protocol.model_messages import (
    FETCH,
    MAX_SIGNATURE_CHARS,
    MODEL,
    FetchMessage,
    ModelMessage,
    is_model_transfer,
    model_object_id,
    model_object_version,
)

DIGEST, ARCHIVE_SHA = "ab" * 32, "0f" * 32


def model(**changes: Any) -> ModelMessage:
    fields: dict[str, Any] = {
        "channel": "current",
        "version": 2,
        "bundle_digest": DIGEST,
        "archive_sha256": ARCHIVE_SHA,
        "archive_size": 123_456,
    }
    return ModelMessage(**(fields | changes))


def envelope(msg_type: int, header: dict[str, Any], payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return b"FFLK" + struct.pack("<BBHI", 1, msg_type, 0, len(raw)) + raw + payload


def header_of(data: bytes) -> dict[str, Any]:
    (length,) = struct.unpack_from("<I", data, 8)
    return dict(json.loads(data[12 : 12 + length]))


MODEL_HEADER = {
    "device_id": "",
    "round": -1,
    "task_id": "",
    "channel": "current",
    "version": 2,
    "bundle_digest": DIGEST,
    "archive_sha256": ARCHIVE_SHA,
    "archive_size": 123_456,
}
FETCH_HEADER = {
    "device_id": "dev-1",
    "round": -1,
    "task_id": "",
    "channel": "current",
    "version": 2,
    "chunk_size": 4096,
}


def test_model_envelope_is_type_7_with_the_documented_header_and_no_payload() -> None:
    data = encode_message(model())
    assert data[:6] == b"FFLK\x01\x07" and data[6:8] == b"\x00\x00"
    (length,) = struct.unpack_from("<I", data, 8)
    assert len(data) == 12 + length  # no payload
    assert header_of(data) == MODEL_HEADER  # signature omitted when empty
    decoded = decode_message(data)
    assert decoded == model()
    assert isinstance(decoded, ModelMessage)
    assert (decoded.device_id, decoded.round, decoded.task_id) == ("", -1, "")


def test_model_signature_travels_when_present() -> None:
    signed = model(signature="00ff" * 32)
    data = encode_message(signed)
    assert header_of(data)["signature"] == "00ff" * 32
    assert decode_message(data) == signed


def test_fetch_envelope_is_type_8_and_round_trips() -> None:
    fetch = FetchMessage(device_id="dev-1", channel="current", version=2, chunk_size=4096)
    data = encode_message(fetch)
    assert data[5] == FETCH == 8 and MODEL == 7
    assert header_of(data) == FETCH_HEADER
    assert decode_message(data) == fetch


def test_a_hand_written_model_header_with_unknown_extra_fields_decodes() -> None:
    decoded = decode_message(envelope(MODEL, MODEL_HEADER | {"future_field": [1, 2]}))
    assert decoded == model()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"device_id": "dev-1"}, "must be empty"),
        ({"device_id": None}, "wrong type"),
        ({"round": 0}, "round -1"),
        ({"task_id": "model-v2"}, "round -1 and an empty task_id"),
        ({"channel": "a/b"}, "channel"),
        ({"channel": ""}, "channel"),
        ({"version": 0}, "'version' = 0 < 1"),
        ({"version": 2.0}, "wrong type float"),
        ({"version": True}, "wrong type bool"),
        ({"bundle_digest": DIGEST.upper()}, "bundle_digest"),
        ({"archive_sha256": ARCHIVE_SHA[:-1]}, "archive_sha256"),
        ({"archive_size": 0}, "archive_size"),
        ({"signature": "abc"}, "signature"),
        ({"signature": "AB"}, "signature"),
        ({"signature": "ab" * (MAX_SIGNATURE_CHARS // 2 + 1)}, "signature"),
        ({"signature": 12}, "wrong type int"),
    ],
)
def test_bad_model_headers_are_rejected(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode_message(envelope(MODEL, MODEL_HEADER | changes))


@pytest.mark.parametrize("missing", sorted(MODEL_HEADER))
def test_a_model_header_missing_any_field_is_rejected(missing: str) -> None:
    header = {k: v for k, v in MODEL_HEADER.items() if k != missing}
    with pytest.raises(MalformedMessage, match=missing):
        decode_message(envelope(MODEL, header))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"device_id": ""}, "invalid device_id"),
        ({"device_id": "dev/1"}, "invalid device_id"),
        ({"round": 3}, "round -1"),
        ({"task_id": "x"}, "empty task_id"),
        ({"chunk_size": 1023}, "'chunk_size' = 1023 < 1024"),
        ({"version": -1}, "version"),
        ({"channel": "#"}, "channel"),
    ],
)
def test_bad_fetch_headers_are_rejected(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode_message(envelope(FETCH, FETCH_HEADER | changes))


@pytest.mark.parametrize(("msg_type", "header"), [(MODEL, MODEL_HEADER), (FETCH, FETCH_HEADER)])
def test_a_payload_on_model_or_fetch_is_rejected(msg_type: int, header: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage, match="unexpected payload"):
        decode_message(envelope(msg_type, header, b"\x00"))


def test_model_object_ids_name_versions_exactly() -> None:
    assert model_object_id(12) == "model-v12"
    assert model_object_version("model-v12") == 12
    for bad in ("model-v0", "model-v012", "model-v", "model-v1x", "xmodel-v1", "r1-abc", ""):
        assert model_object_version(bad) is None, bad
    chunk = ChunkMessage(
        device_id="d",
        round=-1,
        task_id="model-v3",
        transfer_id="t1",
        index=0,
        count=1,
        chunk_size=1024,
        total_size=1,
        sha256="0" * 64,
        data=b"x",
    )
    assert is_model_transfer(chunk)
    ack = ChunkAck(device_id="d", round=-1, task_id="model-v3", transfer_id="t1", next=1)
    assert is_model_transfer(ack)
    assert not is_model_transfer(ChunkAck(device_id="d", round=3, task_id="model-v3", transfer_id="t1", next=1))
    assert not is_model_transfer(ChunkAck(device_id="d", round=-1, task_id="r3-x", transfer_id="t1", next=1))


hex_digest = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
channels = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")


@settings(max_examples=150, deadline=None)
@given(
    channel=channels,
    version=st.integers(1, 2**53),
    digest=hex_digest,
    sha=hex_digest,
    size=st.integers(1, 2**40),
    signature=st.binary(max_size=MAX_SIGNATURE_CHARS // 2).map(bytes.hex),
)
def test_any_valid_model_round_trips(channel: str, version: int, digest: str, sha: str, size: int, signature: str):
    message = ModelMessage(
        channel=channel,
        version=version,
        bundle_digest=digest,
        archive_sha256=sha,
        archive_size=size,
        signature=signature,
    )
    assert decode_message(encode_message(message)) == message


json_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False), st.text(max_size=80)
)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(MODEL_HEADER)), value=json_values, is_fetch=st.booleans())
def test_a_mutated_field_either_decodes_to_that_value_or_is_rejected_cleanly(key: str, value: Any, is_fetch: bool):
    base = FETCH_HEADER if is_fetch else MODEL_HEADER
    if key not in base:
        key = "chunk_size"
    try:
        decoded = decode_message(envelope(FETCH if is_fetch else MODEL, base | {key: value}))
    except MalformedMessage:
        return
    assert isinstance(decoded, FetchMessage if is_fetch else ModelMessage)
    assert getattr(decoded, key) == value and type(getattr(decoded, key)) is type(value)


def test_the_worked_fetch_example_in_the_protocol_document_is_exact() -> None:
    header = b'{"device_id":"d1","round":-1,"task_id":"","channel":"current","version":2,"chunk_size":4096}'
    expected = bytes.fromhex("46 46 4C 4B 01 08 00 00 5C 00 00 00") + header
    fetch = FetchMessage(device_id="d1", channel="current", version=2, chunk_size=4096)
    assert encode_message(fetch) == expected and len(expected) == 104
    assert decode_message(expected) == fetch
