"""MODEL (type 7) and FETCH (type 8): announcing a model bundle and asking for it (docs/protocol.md §3, §8.5).

MODEL, server -> every device, **retained** on ``{prefix}/models/{channel}``, QoS 1, no payload::

    device_id ""  round -1  task_id ""            (a broadcast: exactly these values)
    channel         token, the topic's last level (``current``, ``canary``, ...)
    version         integer >= 1: the bundle version (a device installs only newer versions)
    bundle_digest   64 hex: sha256 of the bundle's manifest.json (ModelStore checks it on install)
    archive_sha256  64 hex: sha256 of the archive bytes (edge_agent.ota.pack_bundle) sent on FETCH
    archive_size    integer >= 1: their length (a device refuses what exceeds its limit *before* fetching)
    issued_at       optional integer >= 0: when the server issued it, Unix milliseconds (0/omitted: unsigned)
    expires_at      optional integer >= 0: Unix ms after which it no longer holds (0/omitted: no expiry, v1)
    rollout_id      optional string (printable ASCII, no spaces, <= 128): the staged rollout of a directed MODEL
    signing_key     optional 64 hex: the Ed25519 public key that made ``signature``
    signature       optional hex: Ed25519 signature (128 hex) of :func:`release_statement` (issue #7)

The signed *release statement* (:func:`release_statement`) covers every field above but the
signature itself, domain-separated (docs/protocol.md §8.5 gives the exact bytes: ``v2`` with
``expires_at``, ``v1`` without); a bundle's ``manifest.sig`` is the line
:func:`bundle_signature_line` over :func:`bundle_signed_bytes`.

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

from edge_agent.errors import ContractViolation, MalformedMessage
from edge_agent.protocol.chunk_messages import SHA256_PATTERN, ChunkAck, ChunkMessage, no_payload
from edge_agent.protocol.header import Header
from edge_agent.protocol.task_fields import MIN_CHUNK_BYTES
from edge_agent.protocol.topics import DEVICE_ID_PATTERN

__all__ = [
    "BUNDLE_CONTEXT",
    "FETCH",
    "MAX_SIGNATURE_CHARS",
    "MODEL",
    "RELEASE_CONTEXT",
    "RELEASE_CONTEXT_V2",
    "ROLLOUT_ID_PATTERN",
    "FetchMessage",
    "ModelMessage",
    "bundle_signature_line",
    "bundle_signed_bytes",
    "decode_fetch",
    "decode_model",
    "is_model_transfer",
    "model_header",
    "model_object_id",
    "model_object_version",
    "parse_bundle_signature",
    "release_statement",
]

MODEL, FETCH = 7, 8
#: 512 signature bytes in hex: room for RSA-4096; Ed25519 needs 128 characters
MAX_SIGNATURE_CHARS = 1024
_SIGNATURE = re.compile(r"^(?:[0-9a-f]{2})*$")
_OBJECT_ID = re.compile(r"^model-v([1-9][0-9]{0,17})$")
#: a MODEL's ``rollout_id``: printable ASCII without spaces, at most 128 characters
ROLLOUT_ID_PATTERN = re.compile(r"^[\x21-\x7e]{0,128}$")
_KEY_HEX = re.compile(r"^[0-9a-f]{64}$")
_SIG_HEX = re.compile(r"^[0-9a-f]{128}$")
#: first line of a release statement (domain separation: no other signed fedflock text starts so)
RELEASE_CONTEXT = "fedflock release statement v1"
#: first line of a release statement that carries ``expires_at`` (edge_agent.crypto.freshness)
RELEASE_CONTEXT_V2 = "fedflock release statement v2"
#: prefix of the bytes a bundle signature covers, followed by the manifest.json bytes
BUNDLE_CONTEXT = b"fedflock bundle manifest v1\n"


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
    #: Unix milliseconds when the server issued the statement (0: unsigned); orders a device's statements
    issued_at: int = 0
    #: Unix milliseconds after which the statement no longer holds (0: no expiry; a v1 statement)
    expires_at: int = 0
    #: the staged rollout a directed MODEL belongs to ("" on channel announcements)
    rollout_id: str = ""
    #: the Ed25519 public key (64 hex) that made ``signature`` ("" when unsigned)
    signing_key: str = ""
    #: Ed25519 signature (128 hex) of :func:`release_statement` ("" when unsigned)
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
    optional = {
        "issued_at": message.issued_at,
        "expires_at": message.expires_at,
        "rollout_id": message.rollout_id,
        "signing_key": message.signing_key,
        "signature": message.signature,
    }
    header.update({key: value for key, value in optional.items() if value})  # omitted when empty/0
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
        issued_at=h.int_field("issued_at", minimum=0) if "issued_at" in h.raw else 0,
        expires_at=h.int_field("expires_at", minimum=0) if "expires_at" in h.raw else 0,
        rollout_id=h.str_field("rollout_id") if "rollout_id" in h.raw else "",
        signing_key=h.str_field("signing_key") if "signing_key" in h.raw else "",
        signature=h.str_field("signature") if "signature" in h.raw else "",
    )
    if len(message.signature) > MAX_SIGNATURE_CHARS or not _SIGNATURE.match(message.signature):
        raise MalformedMessage(f"MODEL field 'signature' is not lowercase hex of at most {MAX_SIGNATURE_CHARS} digits")
    if message.signing_key and not _KEY_HEX.match(message.signing_key):
        raise MalformedMessage("MODEL field 'signing_key' is not 64 lowercase hex digits")
    if not ROLLOUT_ID_PATTERN.match(message.rollout_id):
        raise MalformedMessage("MODEL field 'rollout_id' is not printable ASCII without spaces (<= 128)")
    return message


def release_statement(message: ModelMessage) -> bytes:
    """The exact bytes a MODEL's ``signature`` signs (docs/protocol.md §8.5): ASCII lines, each ending in LF.

    ``RELEASE_CONTEXT``, then ``key=value`` for channel, version, bundle_digest, archive_sha256,
    archive_size, rollout_id, issued_at, in this order; integers in decimal without leading zeros.
    With ``expires_at`` (> 0) the first line is ``RELEASE_CONTEXT_V2`` and ``expires_at`` follows
    ``issued_at``, so an expiry can be neither removed nor changed without breaking the signature.
    """
    if not ROLLOUT_ID_PATTERN.match(message.rollout_id):
        raise ContractViolation(f"rollout id {message.rollout_id[:40]!r} cannot be signed: printable ASCII, no spaces")
    expiry = (f"expires_at={message.expires_at}",) if message.expires_at else ()
    lines = (
        RELEASE_CONTEXT_V2 if message.expires_at else RELEASE_CONTEXT,
        f"channel={message.channel}",
        f"version={message.version}",
        f"bundle_digest={message.bundle_digest}",
        f"archive_sha256={message.archive_sha256}",
        f"archive_size={message.archive_size}",
        f"rollout_id={message.rollout_id}",
        f"issued_at={message.issued_at}",
        *expiry,
    )
    return "".join(f"{line}\n" for line in lines).encode("ascii")


def bundle_signed_bytes(manifest_bytes: bytes) -> bytes:
    """What a bundle signature signs: :data:`BUNDLE_CONTEXT` followed by the manifest.json bytes."""
    return BUNDLE_CONTEXT + manifest_bytes


def bundle_signature_line(public_key: bytes, signature: bytes) -> bytes:
    """The content of ``manifest.sig``: ``ed25519 <public key hex> <signature hex>`` and LF."""
    return f"ed25519 {public_key.hex()} {signature.hex()}\n".encode("ascii")


def parse_bundle_signature(data: bytes) -> tuple[bytes, bytes]:
    """(public key, signature) from ``manifest.sig`` bytes; :class:`MalformedMessage` if it is not that line."""
    try:
        scheme, key, signature = data.decode("ascii").removesuffix("\n").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise MalformedMessage("manifest.sig is not one line 'ed25519 <key hex> <signature hex>'") from None
    if scheme != "ed25519" or not _KEY_HEX.match(key) or not _SIG_HEX.match(signature):
        raise MalformedMessage("manifest.sig is not one line 'ed25519 <64 hex key> <128 hex signature>'")
    return bytes.fromhex(key), bytes.fromhex(signature)


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
