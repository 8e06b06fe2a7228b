"""MODEL (type 7) and FETCH (type 8): announcing a model bundle and asking for it (docs/protocol.md §3, §8.5).

MODEL, server -> every device, **retained** on ``{prefix}/models/{channel}``, QoS 1, no payload::

    device_id ""  round -1  task_id ""            (a broadcast: exactly these values)
    channel         token, the topic's last level (``current``, ``canary``, ...)
    version         integer >= 1: the bundle version (a device installs only newer versions)
    bundle_digest   64 hex: sha256 of the bundle's manifest.json (ModelStore checks it on install)
    archive_sha256  64 hex: sha256 of the archive bytes (edge_agent.ota.pack_bundle) sent on FETCH
    archive_size    integer >= 1: their length (a device refuses what exceeds its limit *before* fetching)
    signature       optional hex string: reserved for issue #7; devices ignore it for now

FETCH, device -> server on the device's ``results`` topic, QoS 1, no payload::

    device_id       the device; round -1; task_id ""
    channel         the channel the version was announced on
    version         the version wanted (>= 1)
    chunk_size      >= MIN_CHUNK_BYTES: the chunk size the device prefers (the server may lower it)

The server answers with the archive as CHUNKs on the device's ``tasks`` topic, ``round`` -1 and
``task_id`` :func:`model_object_id` (``"model-v{version}"``, naming the object: the device
stages the download under it, so a later FETCH resumes it). Decoders raise
:class:`MalformedMessage` for anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import MalformedMessage
from edge_agent.protocol.chunk_messages import SHA256_PATTERN, ChunkAck, ChunkMessage, no_payload
from edge_agent.protocol.header import Header
from edge_agent.protocol.task_fields import MIN_CHUNK_BYTES
from edge_agent.protocol.topics import DEVICE_ID_PATTERN

__all__ = [
    "FETCH",
    "MAX_SIGNATURE_CHARS",
    "MODEL",
    "FetchMessage",
    "ModelMessage",
    "decode_fetch",
    "decode_model",
    "is_model_transfer",
    "model_header",
    "model_object_id",
    "model_object_version",
]

MODEL, FETCH = 7, 8
#: 512 signature bytes in hex: room for RSA-4096; Ed25519 needs 128 characters
MAX_SIGNATURE_CHARS = 1024
_SIGNATURE = re.compile(r"^(?:[0-9a-f]{2})*$")
_OBJECT_ID = re.compile(r"^model-v([1-9][0-9]{0,17})$")


def model_object_id(version: int) -> str:
    """The ``task_id`` of the CHUNKs carrying bundle ``version``'s archive: ``"model-v{version}"``."""
    return f"model-v{version}"


def model_object_version(task_id: str) -> int | None:
    """The version named by a model transfer's ``task_id``, or None when it names no model."""
    match = _OBJECT_ID.match(task_id)
    return int(match.group(1)) if match else None


def is_model_transfer(message: ChunkMessage | ChunkAck) -> bool:
    """True for CHUNKs and CHUNK_ACKs of a bundle download (``round`` -1, ``task_id`` ``model-v<N>``).

    A device routes these to its :class:`~edge_agent.ota.updater.ModelUpdater` instead of its
    TASK reassembly (a TASK's round is >= 0, so the two can never be confused).
    """
    return message.round == -1 and model_object_version(message.task_id) is not None


@dataclass(frozen=True, kw_only=True)
class ModelMessage:
    """Server -> all devices: bundle ``version`` is what ``channel`` should run (retained)."""

    channel: str
    version: int
    bundle_digest: str
    archive_sha256: str
    archive_size: int
    #: hex; not verified yet (issue #7): integrity comes from the digests, not authenticity
    signature: str = ""

    # A broadcast names no device, round or task; fixed so that no MODEL can be built with others.
    @property
    def device_id(self) -> str:
        return ""

    @property
    def round(self) -> int:
        return -1

    @property
    def task_id(self) -> str:
        return ""


@dataclass(frozen=True, kw_only=True)
class FetchMessage:
    """Device -> server: send me bundle ``version`` of ``channel`` in chunks of ``chunk_size``."""

    device_id: str
    channel: str
    version: int
    chunk_size: int

    @property
    def round(self) -> int:
        return -1

    @property
    def task_id(self) -> str:
        return ""


def model_header(message: ModelMessage | FetchMessage) -> tuple[int, dict[str, Any]]:
    """Message type and complete header (``device_id``/``round``/``task_id`` included)."""
    base: dict[str, Any] = {"device_id": message.device_id, "round": -1, "task_id": ""}
    if isinstance(message, FetchMessage):
        return FETCH, base | {"channel": message.channel, "version": message.version, "chunk_size": message.chunk_size}
    header = base | {
        "channel": message.channel,
        "version": message.version,
        "bundle_digest": message.bundle_digest,
        "archive_sha256": message.archive_sha256,
        "archive_size": message.archive_size,
    }
    if message.signature:  # optional: omitted when empty
        header["signature"] = message.signature
    return MODEL, header


def decode_model(h: Header, payload: memoryview) -> ModelMessage:
    no_payload(h, payload)
    if h.str_field("device_id") != "":
        raise MalformedMessage("MODEL field 'device_id' must be empty (a broadcast)")
    _no_task(h)
    message = ModelMessage(
        channel=_channel(h),
        version=h.int_field("version", minimum=1),
        bundle_digest=_sha256(h, "bundle_digest"),
        archive_sha256=_sha256(h, "archive_sha256"),
        archive_size=h.int_field("archive_size", minimum=1),
        signature=h.str_field("signature") if "signature" in h.raw else "",
    )
    if len(message.signature) > MAX_SIGNATURE_CHARS or not _SIGNATURE.match(message.signature):
        raise MalformedMessage(f"MODEL field 'signature' is not lowercase hex of at most {MAX_SIGNATURE_CHARS} digits")
    return message


def decode_fetch(h: Header, payload: memoryview) -> FetchMessage:
    no_payload(h, payload)
    _no_task(h)
    return FetchMessage(
        device_id=h.device_id(),
        channel=_channel(h),
        version=h.int_field("version", minimum=1),
        chunk_size=h.int_field("chunk_size", minimum=MIN_CHUNK_BYTES),
    )


def _no_task(h: Header) -> None:
    if h.int_field("round") != -1 or h.str_field("task_id") != "":
        raise MalformedMessage(f"{h.type_name} must have round -1 and an empty task_id")


def _channel(h: Header) -> str:
    channel = h.str_field("channel")
    if not DEVICE_ID_PATTERN.match(channel):
        raise MalformedMessage(f"{h.type_name} field 'channel' is not a valid channel name: {channel[:70]!r}")
    return channel


def _sha256(h: Header, key: str) -> str:
    value = h.str_field(key)
    if not SHA256_PATTERN.match(value):
        raise MalformedMessage(f"{h.type_name} field {key!r} is not 64 lowercase hex digits")
    return value
