"""Wire messages: a binary envelope with a JSON header and a tensor-set payload.

Envelope layout, integers little-endian (docs/protocol.md, "Envelope")::

    offset  size  field
    0       4     magic b"FFLK"
    4       1     format version (1)
    5       1     message type (1 STATUS, 2 TASK, 3 UPDATE, 4 ERROR, 5 CHUNK, 6 CHUNK_ACK,
                  7 MODEL, 8 FETCH, 9 SECAGG, 10 CLAIM)
    6       2     flags, zero in version 1
    8       4     u32 header length H (<= 64 KiB)
    12      H     header: a UTF-8 JSON object
    12+H    rest  payload: TASK a tensor set (protocol.tensors), UPDATE an encoded update
                  (edge_agent.codecs, "FFCU"), CHUNK a slice of a larger envelope, else nothing

Every header carries ``device_id``, ``round`` and ``task_id`` (``round`` is -1 and ``task_id``
empty on STATUS, MODEL and FETCH; MODEL, a broadcast, has an empty ``device_id``). An envelope
larger than the link's chunk size travels as CHUNK messages with per-chunk CHUNK_ACKs
(:mod:`edge_agent.protocol.chunks`) and is decoded once reassembled. CHUNK/CHUNK_ACK are defined
in :mod:`~edge_agent.protocol.chunk_messages` and MODEL/FETCH in
:mod:`~edge_agent.protocol.model_messages`; this module registers and re-exports them.
Encode/decode functions come in pairs; decoders raise :class:`MalformedMessage` or
:class:`UnsupportedVersion` and never return half a message.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.errors import MalformedMessage, UnsupportedVersion
from edge_agent.protocol import claim_messages, secagg_messages
from edge_agent.protocol.binding import optional_digest, optional_nonce, payload_digest
from edge_agent.protocol.chunk_messages import (
    ACK_COMPLETE,
    ACK_OK,
    ACK_REJECTED,
    ACK_RESEND,
    ACK_STATUSES,
    SHA256_PATTERN,
    ChunkAck,
    ChunkMessage,
    chunk_ack_header,
    chunk_header,
    decode_chunk,
    decode_chunk_ack,
    no_payload,
)
from edge_agent.protocol.header import Header, parse_header
from edge_agent.protocol.model_messages import (
    FETCH,
    MODEL,
    FetchMessage,
    ModelMessage,
    decode_fetch,
    decode_model,
    model_header,
)
from edge_agent.protocol.secagg_messages import SECAGG, SecAggMessage, SecAggTask
from edge_agent.protocol.task_fields import MIN_CHUNK_BYTES, task_codecs, task_frozen, task_hyperparameters
from edge_agent.protocol.tensors import decode_tensors, encode_tensors

__all__ = [
    "ACK_COMPLETE",
    "ACK_OK",
    "ACK_REJECTED",
    "ACK_RESEND",
    "ACK_STATUSES",
    "MIN_CHUNK_BYTES",
    "SHA256_PATTERN",
    "ChunkAck",
    "ChunkMessage",
    "ErrorMessage",
    "FetchMessage",
    "Message",
    "ModelMessage",
    "StatusMessage",
    "TaskMessage",
    "UpdateMessage",
    "decode_message",
    "encode_message",
]

MAGIC = b"FFLK"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024

STATUS, TASK, UPDATE, ERROR, CHUNK, CHUNK_ACK = 1, 2, 3, 4, 5, 6
_TYPE_NAMES = {STATUS: "STATUS", TASK: "TASK", UPDATE: "UPDATE", ERROR: "ERROR", CHUNK: "CHUNK", CHUNK_ACK: "CHUNK_ACK"}
_TYPE_NAMES |= {MODEL: "MODEL", FETCH: "FETCH", SECAGG: "SECAGG"}
_TYPE_NAMES[claim_messages.CLAIM] = "CLAIM"  # claim checks (docs/blobs.md)

_PREAMBLE = struct.Struct("<4sBBHI")

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class StatusMessage:
    """Presence and capabilities; retained on the device's status topic (and its last will)."""

    device_id: str
    online: bool
    agent_version: str = ""
    bundle_digest: str = ""
    num_examples: int = 0
    capabilities: dict[str, Any] = field(default_factory=dict)
    #: optional: the device's last eligibility decision, ``{"eligible": bool, "phase": str,
    #: "reasons": [{"code": str, "text": str}, ...]}`` (docs/protocol.md §3, STATUS)
    eligibility: dict[str, Any] = field(default_factory=dict)
    #: optional: the sensor snapshot behind it (edge_agent.device.state.DeviceState.as_dict)
    device_state: dict[str, Any] = field(default_factory=dict)
    #: optional: the outcome of the device's last model install or rollback (docs/protocol.md §8.5)
    install: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TaskMessage:
    """Server -> device: train on your data starting from ``weights``."""

    device_id: str
    round: int
    task_id: str
    model_version: int
    bundle_digest: str
    epochs: int
    batch_size: int
    lr: float
    deadline_s: float
    weights: Tensors = field(default_factory=dict)
    #: values for the bundle's graph-input hyper-parameters (manifest ``hyperparameters``)
    hyperparameters: dict[str, float | tuple[float, ...]] = field(default_factory=dict)
    #: tensors whose trainable mask is 0 for this task (bundles exported with masks)
    frozen: tuple[str, ...] = ()
    #: update codecs the server accepts for this task, in its order of preference (empty: fp32 only)
    codecs: tuple[str, ...] = ()
    #: largest CHUNK payload the server wants for the upload (0: the device's own default)
    max_chunk_bytes: int = 0
    #: the task's nonce, echoed in its UPDATE (protocol.binding; "" from a server without binding)
    nonce: str = ""
    #: this device's part in a secure-aggregation session (protocol.secagg_messages); None: plain
    secagg: SecAggTask | None = None
    #: sha256 of the tensor-set payload this TASK arrived with: filled by :func:`decode_message`,
    #: not a header field ("" on a TASK built in memory); the UPDATE's ``base_digest``. Derived from
    #: the payload, so it takes no part in equality (a decoded TASK equals the one encoded)
    weights_digest: str = field(default="", compare=False)


@dataclass(frozen=True, kw_only=True)
class UpdateMessage:
    """Device -> server: trained weights - received weights for the aggregated tensors.

    ``payload`` is the delta encoded with :func:`edge_agent.codecs.encode_update` using ``codec``
    (the server decodes it straight into its aggregate). ``attempt`` counts uploads of this
    task's result (1 = first; a device that re-sends after a restart increments it); the
    idempotency key is ``(device_id, task_id, attempt)`` and a server accepts at most one update
    per ``(device_id, task_id)`` whatever the attempt.
    """

    device_id: str
    round: int
    task_id: str
    model_version: int
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    codec: str = "fp32"
    attempt: int = 1
    #: the TASK's nonce and the sha256 of the TASK payload trained from (protocol.binding)
    nonce: str = ""
    base_digest: str = ""
    payload: bytes = b""

    @property
    def idempotency_key(self) -> tuple[str, str, int]:
        return (self.device_id, self.task_id, self.attempt)


@dataclass(frozen=True, kw_only=True)
class ErrorMessage:
    """Device -> server: the task failed; ``code`` is an :mod:`edge_agent.errors` code."""

    device_id: str
    round: int
    task_id: str
    code: str
    reason: str


_Transfer = ChunkMessage | ChunkAck | ModelMessage | FetchMessage | SecAggMessage | claim_messages.ClaimMessage
Message = StatusMessage | TaskMessage | UpdateMessage | ErrorMessage | _Transfer


def encode_message(message: Message, *, payload: bytes | None = None) -> bytes:
    """Encode a message into one envelope.

    ``payload`` is an already encoded tensor set to send instead of the message's own tensors:
    the server encodes the global weights once per round, not once per device.
    """
    if isinstance(message, UpdateMessage | ChunkMessage | SecAggMessage):
        if payload is not None:
            raise ValueError(f"{type(message).__name__} carries its own payload")
        payload = message.data if isinstance(message, ChunkMessage) else message.payload
    msg_type, header, tensors = _parts(message)
    raw_header = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    if payload is None:
        payload = encode_tensors(tensors) if tensors is not None else b""
    elif tensors:
        raise ValueError("give the tensors in the message or as an encoded payload, not both")
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, msg_type, 0, len(raw_header)) + raw_header + payload


def _parts(message: Message) -> tuple[int, dict[str, Any], Tensors | None]:
    """Message type, header and tensors of ``message``."""
    if isinstance(message, StatusMessage):
        header = {
            "online": message.online,
            "agent_version": message.agent_version,
            "bundle_digest": message.bundle_digest,
            "num_examples": message.num_examples,
            "capabilities": message.capabilities,
        }
        if message.eligibility:  # optional fields: omitted when empty
            header["eligibility"] = message.eligibility
        if message.device_state:
            header["device_state"] = message.device_state
        if message.install:
            header["install"] = message.install
        return STATUS, _base(message.device_id, -1, "") | header, None
    if isinstance(message, TaskMessage):
        header = {
            "model_version": message.model_version,
            "bundle_digest": message.bundle_digest,
            "epochs": message.epochs,
            "batch_size": message.batch_size,
            "lr": message.lr,
            "deadline_s": message.deadline_s,
        }
        if message.hyperparameters:  # optional fields: omitted when empty (older devices ignore them)
            header["hyperparameters"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in message.hyperparameters.items()
            }
        if message.frozen:
            header["frozen"] = list(message.frozen)
        if message.codecs:
            header["codecs"] = list(message.codecs)
        if message.max_chunk_bytes:
            header["max_chunk_bytes"] = message.max_chunk_bytes
        if message.nonce:
            header["nonce"] = message.nonce
        if message.secagg is not None:
            header["secagg"] = message.secagg.as_header()
        return TASK, _base(message.device_id, message.round, message.task_id) | header, message.weights
    if isinstance(message, UpdateMessage):
        header = {
            "model_version": message.model_version,
            "num_examples": message.num_examples,
            "metrics": message.metrics,
            "codec": message.codec,
            "attempt": message.attempt,
        }
        if message.nonce:  # binding fields: omitted by (and for) peers that predate them
            header["nonce"] = message.nonce
        if message.base_digest:
            header["base_digest"] = message.base_digest
        return UPDATE, _base(message.device_id, message.round, message.task_id) | header, None
    if isinstance(message, ChunkMessage):
        return CHUNK, _base(message.device_id, message.round, message.task_id) | chunk_header(message), None
    if isinstance(message, ChunkAck):
        return CHUNK_ACK, _base(message.device_id, message.round, message.task_id) | chunk_ack_header(message), None
    if isinstance(message, ModelMessage | FetchMessage):
        return (*model_header(message), None)
    if isinstance(message, SecAggMessage):
        return (*secagg_messages.secagg_header(message), None)
    if isinstance(message, claim_messages.CLAIM_TYPES):
        return (*claim_messages.claim_header(message), None)
    header = {"code": message.code, "reason": message.reason}
    return ERROR, _base(message.device_id, message.round, message.task_id) | header, None


def _base(device_id: str, round_: int, task_id: str) -> dict[str, Any]:
    return {"device_id": device_id, "round": round_, "task_id": task_id}


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Decode an envelope into its typed message; raises on anything malformed."""
    view = memoryview(data).cast("B")
    if len(view) < _PREAMBLE.size:
        raise MalformedMessage(f"message truncated: {len(view)} bytes < {_PREAMBLE.size}-byte preamble")
    magic, version, msg_type, flags, header_len = _PREAMBLE.unpack_from(view, 0)
    if magic != MAGIC:
        raise MalformedMessage(f"not a fedflock message: magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"message format version {version} (this code speaks {FORMAT_VERSION})")
    if msg_type not in _TYPE_NAMES:
        raise MalformedMessage(f"unknown message type {msg_type}")
    if flags != 0:
        raise MalformedMessage(f"flags {flags:#06x} set; version 1 defines none")
    if header_len > MAX_HEADER_BYTES or _PREAMBLE.size + header_len > len(view):
        raise MalformedMessage(f"header length {header_len} exceeds the message ({len(view)} bytes)")
    header = parse_header(view[_PREAMBLE.size : _PREAMBLE.size + header_len])
    payload = view[_PREAMBLE.size + header_len :]
    return _DECODERS[msg_type](Header(header, _TYPE_NAMES[msg_type]), payload)


def _tensors(h: Header, payload: memoryview) -> Tensors:
    if not len(payload):
        return {}
    return decode_tensors(payload)


def _decode_status(h: Header, payload: memoryview) -> StatusMessage:
    no_payload(h, payload)
    return StatusMessage(
        device_id=h.device_id(),
        online=h.bool_field("online"),
        agent_version=h.str_field("agent_version"),
        bundle_digest=h.str_field("bundle_digest"),
        num_examples=h.int_field("num_examples", minimum=0),
        capabilities=h.dict_field("capabilities"),
        eligibility=h.dict_field("eligibility") if "eligibility" in h.raw else {},
        device_state=h.dict_field("device_state") if "device_state" in h.raw else {},
        install=h.dict_field("install") if "install" in h.raw else {},
    )


def _decode_task(h: Header, payload: memoryview) -> TaskMessage:
    return TaskMessage(
        device_id=h.device_id(),
        round=h.int_field("round", minimum=0),
        task_id=h.str_field("task_id"),
        model_version=h.int_field("model_version", minimum=0),
        bundle_digest=h.str_field("bundle_digest"),
        epochs=h.int_field("epochs", minimum=1),
        batch_size=h.int_field("batch_size", minimum=1),
        lr=h.float_field("lr"),
        deadline_s=h.float_field("deadline_s"),
        weights=_tensors(h, payload),
        hyperparameters=task_hyperparameters(h),
        frozen=task_frozen(h),
        codecs=task_codecs(h),
        max_chunk_bytes=h.int_field("max_chunk_bytes", minimum=MIN_CHUNK_BYTES) if "max_chunk_bytes" in h.raw else 0,
        nonce=optional_nonce(h),
        secagg=secagg_messages.task_secagg(h),
        weights_digest=payload_digest(payload),
    )


def _decode_update(h: Header, payload: memoryview) -> UpdateMessage:
    metrics = h.dict_field("metrics")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MalformedMessage(f"UPDATE metric {key!r} is not a finite number")
    return UpdateMessage(
        device_id=h.device_id(),
        round=h.int_field("round", minimum=0),
        task_id=h.str_field("task_id"),
        model_version=h.int_field("model_version", minimum=0),
        num_examples=h.int_field("num_examples", minimum=1),
        metrics={str(k): float(v) for k, v in metrics.items()},
        codec=h.token_field("codec"),
        attempt=h.int_field("attempt", minimum=1),
        nonce=optional_nonce(h),
        base_digest=optional_digest(h),
        payload=bytes(payload),
    )


def _decode_error(h: Header, payload: memoryview) -> ErrorMessage:
    no_payload(h, payload)
    return ErrorMessage(
        device_id=h.device_id(),
        round=h.int_field("round", minimum=-1),
        task_id=h.str_field("task_id"),
        code=h.str_field("code"),
        reason=h.str_field("reason"),
    )


_DECODERS: dict[int, Callable[[Header, memoryview], Message]] = {
    STATUS: _decode_status,
    TASK: _decode_task,
    UPDATE: _decode_update,
    ERROR: _decode_error,
    CHUNK: decode_chunk,
    CHUNK_ACK: decode_chunk_ack,
    MODEL: decode_model,
    FETCH: decode_fetch,
    SECAGG: secagg_messages.decode_secagg,
    claim_messages.CLAIM: claim_messages.decode_claim,
}
