"""Wire messages: a binary envelope with a JSON header and a tensor-set payload.

Envelope layout, integers little-endian (docs/protocol.md, "Envelope")::

    offset  size  field
    0       4     magic b"FFLK"
    4       1     format version (1)
    5       1     message type (1 STATUS, 2 TASK, 3 UPDATE, 4 ERROR)
    6       2     flags, zero in version 1
    8       4     u32 header length H (<= 64 KiB)
    12      H     header: a UTF-8 JSON object
    12+H    rest  payload: a tensor set (protocol.tensors) or nothing

Every header carries ``device_id``, ``round`` and ``task_id`` (``round`` is -1 and ``task_id``
empty on STATUS). Encode/decode functions come in pairs; decoders raise
:class:`MalformedMessage` or :class:`UnsupportedVersion` and never return half a message.
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
from edge_agent.protocol.tensors import decode_tensors, encode_tensors
from edge_agent.protocol.topics import DEVICE_ID_PATTERN

MAGIC = b"FFLK"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024

STATUS, TASK, UPDATE, ERROR = 1, 2, 3, 4
_TYPE_NAMES = {STATUS: "STATUS", TASK: "TASK", UPDATE: "UPDATE", ERROR: "ERROR"}

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


@dataclass(frozen=True, kw_only=True)
class UpdateMessage:
    """Device -> server: ``delta`` = trained weights - received weights, for aggregated tensors."""

    device_id: str
    round: int
    task_id: str
    model_version: int
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    delta: Tensors = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ErrorMessage:
    """Device -> server: the task failed; ``code`` is an :mod:`edge_agent.errors` code."""

    device_id: str
    round: int
    task_id: str
    code: str
    reason: str


Message = StatusMessage | TaskMessage | UpdateMessage | ErrorMessage


def encode_message(message: Message, *, payload: bytes | None = None) -> bytes:
    """Encode a message into one envelope.

    ``payload`` is an already encoded tensor set to send instead of the message's own tensors:
    the server encodes the global weights once per round, not once per device.
    """
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
        return TASK, _base(message.device_id, message.round, message.task_id) | header, message.weights
    if isinstance(message, UpdateMessage):
        header = {
            "model_version": message.model_version,
            "num_examples": message.num_examples,
            "metrics": message.metrics,
        }
        return UPDATE, _base(message.device_id, message.round, message.task_id) | header, message.delta
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
    header = _parse_header(view[_PREAMBLE.size : _PREAMBLE.size + header_len])
    payload = view[_PREAMBLE.size + header_len :]
    return _DECODERS[msg_type](_Header(header, _TYPE_NAMES[msg_type]), payload)


def _parse_header(raw: memoryview) -> dict[str, Any]:
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise MalformedMessage("header is not a JSON object")
    return header


class _Header:
    """Typed access to header fields with errors that name the field."""

    def __init__(self, raw: dict[str, Any], type_name: str) -> None:
        self.raw = raw
        self.type_name = type_name

    def _get(self, key: str, types: type | tuple[type, ...]) -> Any:
        if key not in self.raw:
            raise MalformedMessage(f"{self.type_name} header lacks field {key!r}")
        value = self.raw[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise MalformedMessage(f"{self.type_name} field {key!r} has wrong type bool")
        if not isinstance(value, types):
            raise MalformedMessage(f"{self.type_name} field {key!r} has wrong type {type(value).__name__}")
        return value

    def str_field(self, key: str) -> str:
        return str(self._get(key, str))

    def int_field(self, key: str, *, minimum: int | None = None) -> int:
        value = int(self._get(key, int))
        if minimum is not None and value < minimum:
            raise MalformedMessage(f"{self.type_name} field {key!r} = {value} < {minimum}")
        return value

    def float_field(self, key: str) -> float:
        value = float(self._get(key, (int, float)))
        if not math.isfinite(value):
            raise MalformedMessage(f"{self.type_name} field {key!r} is not finite")
        return value

    def bool_field(self, key: str) -> bool:
        return bool(self._get(key, bool))

    def dict_field(self, key: str) -> dict[str, Any]:
        return dict(self._get(key, dict))

    def device_id(self) -> str:
        device_id = self.str_field("device_id")
        if not DEVICE_ID_PATTERN.match(device_id):
            raise MalformedMessage(f"invalid device_id {device_id!r}")
        return device_id


def _no_payload(h: _Header, payload: memoryview) -> None:
    if len(payload):
        raise MalformedMessage(f"{h.type_name} carries {len(payload)} unexpected payload bytes")


def _tensors(h: _Header, payload: memoryview) -> Tensors:
    if not len(payload):
        return {}
    return decode_tensors(payload)


def _decode_status(h: _Header, payload: memoryview) -> StatusMessage:
    _no_payload(h, payload)
    return StatusMessage(
        device_id=h.device_id(),
        online=h.bool_field("online"),
        agent_version=h.str_field("agent_version"),
        bundle_digest=h.str_field("bundle_digest"),
        num_examples=h.int_field("num_examples", minimum=0),
        capabilities=h.dict_field("capabilities"),
    )


def _decode_task(h: _Header, payload: memoryview) -> TaskMessage:
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
        hyperparameters=_hyperparameters(h),
        frozen=_frozen(h),
    )


#: Caps on the optional TASK fields (the header itself is capped at 64 KiB).
MAX_HYPERPARAMETER_VALUES = 4096


def _hyperparameters(h: _Header) -> dict[str, float | tuple[float, ...]]:
    if "hyperparameters" not in h.raw:
        return {}
    out: dict[str, float | tuple[float, ...]] = {}
    for key, value in h.dict_field("hyperparameters").items():
        if not key:
            raise MalformedMessage("TASK hyperparameters has an empty name")
        items = value if isinstance(value, list) else [value]
        if not items or len(items) > MAX_HYPERPARAMETER_VALUES or not all(_finite_number(v) for v in items):
            raise MalformedMessage(f"TASK hyperparameter {key!r} must be a finite number or a list of them")
        out[key] = tuple(float(v) for v in items) if isinstance(value, list) else float(value)
    return out


def _frozen(h: _Header) -> tuple[str, ...]:
    if "frozen" not in h.raw:
        return ()
    names = h.raw["frozen"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise MalformedMessage("TASK field 'frozen' must be a list of tensor names")
    if len(set(names)) != len(names):
        raise MalformedMessage("TASK field 'frozen' names a tensor twice")
    return tuple(names)


def _finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _decode_update(h: _Header, payload: memoryview) -> UpdateMessage:
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
        delta=_tensors(h, payload),
    )


def _decode_error(h: _Header, payload: memoryview) -> ErrorMessage:
    _no_payload(h, payload)
    return ErrorMessage(
        device_id=h.device_id(),
        round=h.int_field("round", minimum=-1),
        task_id=h.str_field("task_id"),
        code=h.str_field("code"),
        reason=h.str_field("reason"),
    )


_DECODERS: dict[int, Callable[[_Header, memoryview], Message]] = {
    STATUS: _decode_status,
    TASK: _decode_task,
    UPDATE: _decode_update,
    ERROR: _decode_error,
}
