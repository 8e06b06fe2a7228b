"""Round trips and rejection of bad bytes for the tensor set and the message envelope."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from edge_agent.errors import ConfigError, ContractViolation, MalformedMessage, UnsupportedVersion
from edge_agent.protocol.messages import (
    ACK_REJECTED,
    ChunkAck,
    ChunkMessage,
    ErrorMessage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
    decode_message,
    encode_message,
)
from edge_agent.protocol.tensors import decode_tensors, encode_tensors, read_tensor_file, write_tensor_file
from edge_agent.protocol.topics import Topics, validate_device_id


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
        "ids": np.arange(7, dtype=np.int64),
        "half": rng.normal(size=(5,)).astype(np.float16),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "bytes": np.arange(256, dtype=np.uint8),
    }


def test_tensor_set_round_trip_preserves_names_order_dtypes_and_values() -> None:
    tensors = sample_tensors()
    decoded = decode_tensors(encode_tensors(tensors))
    assert list(decoded) == list(tensors)
    for name, value in tensors.items():
        assert decoded[name].dtype == value.dtype
        assert decoded[name].shape == value.shape
        np.testing.assert_array_equal(decoded[name], value)


def test_tensor_data_is_8_byte_aligned_and_layout_is_little_endian() -> None:
    data = encode_tensors({"a": np.array([1.0], dtype=np.float32)})
    assert data[:4] == b"FFTS" and data[4] == 1
    assert struct.unpack_from("<I", data, 8) == (1,)
    # header 12 + name len 2 + "a" 1 + dtype 1 + ndim 1 + dim 4 = 21 -> data at 24
    assert struct.unpack_from("<f", data, 24) == (1.0,)
    assert len(data) % 8 == 0


def test_big_endian_input_is_written_little_endian() -> None:
    big = np.arange(4, dtype=">f4")
    decoded = decode_tensors(encode_tensors({"b": big}))
    np.testing.assert_array_equal(decoded["b"], np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("cut", [0, 3, 11, 14, 20, 30])
def test_truncated_tensor_set_is_rejected(cut: int) -> None:
    data = encode_tensors({"weights": np.ones((4, 4), dtype=np.float32)})
    with pytest.raises(MalformedMessage):
        decode_tensors(data[:cut])


def test_bad_magic_version_dtype_and_trailing_bytes_are_rejected() -> None:
    data = bytearray(encode_tensors({"w": np.ones(2, dtype=np.float32)}))
    with pytest.raises(MalformedMessage, match="magic"):
        decode_tensors(b"XXXX" + bytes(data[4:]))
    with pytest.raises(UnsupportedVersion):
        decode_tensors(bytes(data[:4]) + b"\x09" + bytes(data[5:]))
    bad_dtype = bytearray(data)
    bad_dtype[12 + 2 + 1] = 99
    with pytest.raises(MalformedMessage, match="dtype"):
        decode_tensors(bytes(bad_dtype))
    with pytest.raises(MalformedMessage, match="trailing"):
        decode_tensors(bytes(data) + b"\0" * 8)


def test_huge_declared_shape_does_not_allocate() -> None:
    header = struct.pack("<4sB3xI", b"FFTS", 1, 1) + struct.pack("<H1sBB2I", 1, b"w", 1, 2, 100_000, 100_000)
    with pytest.raises(MalformedMessage, match="truncated"):
        decode_tensors(header + b"\0" * 16)


def test_tensor_file_is_written_atomically(tmp_path) -> None:
    path = tmp_path / "w.fft"
    write_tensor_file(path, sample_tensors())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = read_tensor_file(path)
    np.testing.assert_array_equal(loaded["conv.weight"], sample_tensors()["conv.weight"])
    loaded["conv.weight"][0] = 1.0  # copies are writable


MESSAGES = [
    StatusMessage(
        device_id="dev-1",
        online=True,
        agent_version="0.1.0",
        bundle_digest="ab" * 32,
        num_examples=70,
        capabilities={"cores": 4},
    ),
    TaskMessage(
        device_id="dev-1",
        round=3,
        task_id="r3-abc",
        model_version=2,
        bundle_digest="cd" * 32,
        epochs=2,
        batch_size=16,
        lr=0.05,
        deadline_s=60.0,
        weights=sample_tensors(),
        codecs=("topk-int8:0.01", "int8", "fp32"),
        max_chunk_bytes=65536,
    ),
    UpdateMessage(
        device_id="dev_2",
        round=3,
        task_id="r3-abc",
        model_version=2,
        num_examples=70,
        metrics={"train_loss": 0.5, "train_accuracy": 0.75},
        codec="int8",
        attempt=2,
        payload=b"FFCU opaque to the envelope",
    ),
    ErrorMessage(device_id="dev-1", round=3, task_id="r3-abc", code="training_error", reason="loss nan"),
    ChunkMessage(
        device_id="dev-1",
        round=3,
        task_id="r3-abc",
        transfer_id="t-0123abcd",
        index=2,
        count=3,
        chunk_size=4096,
        total_size=8192 + 100,
        sha256="0f" * 32,
        data=bytes(range(100)),
    ),
    ChunkAck(device_id="dev-1", round=3, task_id="r3-abc", transfer_id="t-0123abcd", next=2),
    ChunkAck(device_id="dev-1", round=-1, task_id="", transfer_id="t-9", next=0, status=ACK_REJECTED, reason="too big"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(message) -> None:
    decoded = decode_message(encode_message(message))
    assert type(decoded) is type(message)
    for field, value in vars(message).items():
        got = getattr(decoded, field)
        if isinstance(value, dict) and value and isinstance(next(iter(value.values())), np.ndarray):
            assert list(got) == list(value)
            for name in value:
                np.testing.assert_array_equal(got[name], value[name])
        elif field == "weights_digest":  # derived on decode: sha256 of the TASK payload as received
            assert got == hashlib.sha256(encode_message(message)[-len(encode_tensors(message.weights)) :]).hexdigest()
        else:
            assert got == value, field


def _with_header(message, **changes) -> bytes:
    import json

    data = encode_message(message)
    (header_len,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12 : 12 + header_len])
    header.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del header[key]
    raw = json.dumps(header).encode()
    return data[:8] + struct.pack("<I", len(raw)) + raw + data[12 + header_len :]


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"", MalformedMessage, "truncated"),
        (b"garbage!garbage!", MalformedMessage, "magic"),
        (b"FFLK\x07\x03\x00\x00" + b"\0" * 4, UnsupportedVersion, "version 7"),
        (b"FFLK\x01\x7f\x00\x00" + b"\0" * 4, MalformedMessage, "unknown message type"),
        (b"FFLK\x01\x03\x00\x00" + struct.pack("<I", 1000) + b"{}", MalformedMessage, "header length"),
        (b"FFLK\x01\x03\x00\x00" + struct.pack("<I", 2) + b"[]", MalformedMessage, "JSON object"),
        (b"FFLK\x01\x03\x00\x00" + struct.pack("<I", 2) + b"\xff\xfe", MalformedMessage, "UTF-8"),
    ],
)
def test_malformed_envelopes_are_rejected(data: bytes, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        decode_message(data)


def test_bad_header_fields_are_rejected_with_the_field_name() -> None:
    update = MESSAGES[2]
    with pytest.raises(MalformedMessage, match="num_examples"):
        decode_message(_with_header(update, num_examples=0))
    with pytest.raises(MalformedMessage, match="round"):
        decode_message(_with_header(update, round="3"))
    with pytest.raises(MalformedMessage, match="device_id"):
        decode_message(_with_header(update, device_id="../etc"))
    with pytest.raises(MalformedMessage, match="task_id"):
        decode_message(_with_header(update, task_id=None))
    with pytest.raises(MalformedMessage, match="metric"):
        decode_message(_with_header(update, metrics={"loss": "high"}))
    with pytest.raises(MalformedMessage, match="online"):
        decode_message(_with_header(MESSAGES[0], online=1))


def test_truncated_task_payload_is_rejected() -> None:
    data = encode_message(MESSAGES[1])
    with pytest.raises(MalformedMessage):
        decode_message(data[:-9])


def test_update_idempotency_key_is_device_task_attempt() -> None:
    assert MESSAGES[2].idempotency_key == ("dev_2", "r3-abc", 2)


def test_bad_update_and_task_fields_are_rejected() -> None:
    with pytest.raises(MalformedMessage, match="attempt"):
        decode_message(_with_header(MESSAGES[2], attempt=0))
    with pytest.raises(MalformedMessage, match="codec"):
        decode_message(_with_header(MESSAGES[2], codec="int8; rm -rf"))
    with pytest.raises(MalformedMessage, match="codecs"):
        decode_message(_with_header(MESSAGES[1], codecs="int8"))
    with pytest.raises(MalformedMessage, match="max_chunk_bytes"):
        decode_message(_with_header(MESSAGES[1], max_chunk_bytes=10))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"count": 2}, "count"),
        ({"index": 3}, "index"),
        ({"sha256": "xyz"}, "sha256"),
        ({"transfer_id": "a/b"}, "transfer_id"),
        ({"total_size": 8192 + 99}, "bytes, expected"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_inconsistent_chunks_are_rejected(changes: dict, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode_message(_with_header(MESSAGES[4], **changes))


def test_chunk_ack_status_is_checked() -> None:
    with pytest.raises(MalformedMessage, match="status"):
        decode_message(_with_header(MESSAGES[5], status="maybe"))
    with pytest.raises(MalformedMessage, match="payload"):
        decode_message(encode_message(MESSAGES[5]) + b"x")


def test_status_with_payload_is_rejected() -> None:
    with pytest.raises(MalformedMessage, match="payload"):
        decode_message(encode_message(MESSAGES[0]) + b"x")


def test_topics_layout_and_parsing() -> None:
    topics = Topics()
    assert topics.results("dev-1") == "fedflock/v1/devices/dev-1/results"
    assert topics.all_devices("status") == "fedflock/v1/devices/+/status"
    assert topics.parse("fedflock/v1/devices/dev-1/results") == ("dev-1", "results")
    for bad in ["fedflock/v1/devices/dev-1/other", "other/v1/devices/d/results", "fedflock/v1/devices/a/b/results"]:
        with pytest.raises(ContractViolation):
            topics.parse(bad)


@pytest.mark.parametrize("device_id", ["", "a/b", "a+b", "#", "x" * 65, "dév"])
def test_unsafe_device_ids_are_refused(device_id: str) -> None:
    with pytest.raises(ConfigError):
        validate_device_id(device_id)


def test_task_with_pre_encoded_weights_equals_the_plain_encoding() -> None:
    task = MESSAGES[1]
    bare = TaskMessage(**{**vars(task), "weights": {}})
    assert encode_message(bare, payload=encode_tensors(task.weights)) == encode_message(task)
    with pytest.raises(ValueError, match="not both"):
        encode_message(task, payload=encode_tensors(task.weights))
