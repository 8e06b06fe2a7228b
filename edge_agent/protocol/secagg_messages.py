"""SECAGG envelopes: secure-aggregation messages carried over MQTT (docs/protocol.md §9).

One envelope type (9, ``SECAGG``) carries every message of a secure-aggregation session
(:mod:`edge_agent.secagg.wire`, the "FFSA" bytes) as its payload. Header (JSON, all required)::

    device_id   the device the message is from (device -> server) or for (server -> device)
    round       the round (sync) or buffer number (FedBuff) the session aggregates, >= 0
    task_id     the TASK the session belongs to (the device's task of that round or buffer)
    session     the session id, 32 lowercase hex digits (16 bytes); must equal the FFSA header's

Server -> device messages (KeyList, ShareBundle, UnmaskRequest, Abort) travel on the device's
``tasks`` topic, device -> server messages (AdvertiseKeys, EncryptedShares, MaskedInput,
UnmaskResponse) on its ``results`` topic, exactly the topics the ACL already grants
(deploy/mosquitto/acl.example). A MaskedInput larger than the chunk size travels as CHUNKs like
an UPDATE.

This module checks only the envelope: the payload starts with the FFSA magic, version 1 and a
known type, and its session equals the header's. It does not import :mod:`edge_agent.secagg`
(which needs ``cryptography``), so every agent can decode, and refuse, SECAGG envelopes; the
receiver decodes the FFSA body against its session (:func:`check_size` first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import ContractViolation, MalformedMessage
from edge_agent.protocol.header import Header

__all__ = [
    "FFSA_HEADER_BYTES",
    "SECAGG",
    "SecAggMessage",
    "check_size",
    "decode_secagg",
    "ffsa_type",
    "secagg_header",
    "session_hex",
]

SECAGG = 9
FFSA_MAGIC = b"FFSA"
FFSA_VERSION = 1
#: magic[4] | version u8 | type u8 | session[16]
FFSA_HEADER_BYTES = 22
FFSA_TYPES = range(1, 10)
SESSION_HEX = re.compile(r"^[0-9a-f]{32}$")
#: the FFSA type names, for logs and errors
TYPE_NAMES = {
    1: "Setup",
    2: "AdvertiseKeys",
    3: "KeyList",
    4: "EncryptedShares",
    5: "ShareBundle",
    6: "MaskedInput",
    7: "UnmaskRequest",
    8: "UnmaskResponse",
    9: "Abort",
}


@dataclass(frozen=True, kw_only=True)
class SecAggMessage:
    """One secure-aggregation message of session ``session`` (16 bytes) for task ``task_id``."""

    device_id: str
    round: int
    task_id: str
    session: bytes
    #: the FFSA bytes (edge_agent.secagg.wire.encode)
    payload: bytes

    @property
    def kind(self) -> int:
        """The FFSA message type (1..9, :data:`TYPE_NAMES`)."""
        return self.payload[5]

    @property
    def kind_name(self) -> str:
        return TYPE_NAMES.get(self.kind, f"type {self.kind}")


def session_hex(session: bytes) -> str:
    return session.hex()


def ffsa_type(payload: bytes | memoryview) -> int:
    """The FFSA type of ``payload`` after checking its magic and version (MalformedMessage if not FFSA)."""
    if len(payload) < FFSA_HEADER_BYTES:
        raise MalformedMessage(f"SECAGG payload of {len(payload)} bytes is shorter than the FFSA header")
    if bytes(payload[:4]) != FFSA_MAGIC:
        raise MalformedMessage(f"SECAGG payload is not an FFSA message (magic {bytes(payload[:4])!r})")
    if payload[4] != FFSA_VERSION:
        raise MalformedMessage(f"SECAGG payload has FFSA version {payload[4]} (this code speaks {FFSA_VERSION})")
    if payload[5] not in FFSA_TYPES:
        raise MalformedMessage(f"SECAGG payload has unknown FFSA type {payload[5]}")
    return int(payload[5])


def secagg_header(message: SecAggMessage) -> tuple[int, dict[str, Any]]:
    """Message type and complete header of ``message``."""
    if len(message.session) != 16:
        raise ValueError(f"a secagg session id is 16 bytes, got {len(message.session)}")
    ffsa_type(message.payload)
    if bytes(message.payload[6:FFSA_HEADER_BYTES]) != message.session:
        raise ValueError("the FFSA payload belongs to another session than the envelope")
    header = {
        "device_id": message.device_id,
        "round": message.round,
        "task_id": message.task_id,
        "session": session_hex(message.session),
    }
    return SECAGG, header


def decode_secagg(h: Header, payload: memoryview) -> SecAggMessage:
    session = h.str_field("session")
    if not SESSION_HEX.match(session):
        raise MalformedMessage("SECAGG field 'session' must be 32 lowercase hex digits")
    ffsa_type(payload)
    if bytes(payload[6:FFSA_HEADER_BYTES]).hex() != session:
        raise MalformedMessage("SECAGG payload belongs to another session than its header names")
    return SecAggMessage(
        device_id=h.device_id(),
        round=h.int_field("round", minimum=0),
        task_id=h.str_field("task_id"),
        session=bytes.fromhex(session),
        payload=bytes(payload),
    )


def check_size(message: SecAggMessage, limit: int) -> None:
    """:class:`ContractViolation` when the payload exceeds ``limit`` bytes (checked before decoding)."""
    if len(message.payload) > limit:
        raise ContractViolation(
            f"{message.kind_name} of {len(message.payload)} bytes exceeds the {limit} bytes this session allows"
        )


@dataclass(frozen=True, kw_only=True)
class SecAggTask:
    """The TASK header's optional ``secagg`` object: this device's part in a session.

    ``weight_unit`` ``W``: the device scales its update by ``num_examples / W`` before quantizing
    and appends ``num_examples`` as exact codes (edge_agent.secagg.weighting), so the sum
    yields ``Σ nᵢxᵢ / W`` and ``Σ nᵢ``; the server picks ``W`` (e.g. the cohort's mean count) so
    that scaled updates stay within ``clip``. ``length`` counts the ring words, weight codes included.
    """

    session: bytes
    index: int
    cohort: int
    threshold: int
    quant_bits: int
    ring_bits: int
    clip: float
    length: int
    weight_unit: float = 1.0

    def as_header(self) -> dict[str, Any]:
        return {
            "session": session_hex(self.session),
            "index": self.index,
            "cohort": self.cohort,
            "threshold": self.threshold,
            "quant_bits": self.quant_bits,
            "ring_bits": self.ring_bits,
            "clip": self.clip,
            "length": self.length,
            "weight_unit": self.weight_unit,
        }


def task_secagg(h: Header) -> SecAggTask | None:
    """The TASK's ``secagg`` object, or None (a plain task); MalformedMessage naming the bad key."""
    if "secagg" not in h.raw:
        return None
    raw = h.dict_field("secagg")
    fields = Header(raw, "TASK secagg")
    session = fields.str_field("session")
    if not SESSION_HEX.match(session):
        raise MalformedMessage("TASK secagg field 'session' must be 32 lowercase hex digits")
    known = set(SecAggTask.__dataclass_fields__)
    if set(raw) - known:
        raise MalformedMessage(f"TASK secagg has unknown fields {sorted(set(raw) - known)[:5]}")
    task = SecAggTask(
        session=bytes.fromhex(session),
        index=fields.int_field("index", minimum=1),
        cohort=fields.int_field("cohort", minimum=2),
        threshold=fields.int_field("threshold", minimum=2),
        quant_bits=fields.int_field("quant_bits", minimum=2),
        ring_bits=fields.int_field("ring_bits", minimum=2),
        clip=fields.float_field("clip"),
        length=fields.int_field("length", minimum=1),
        weight_unit=fields.float_field("weight_unit"),
    )
    if task.cohort > 0xFFFF or task.index > task.cohort or task.threshold > task.cohort:
        raise MalformedMessage("TASK secagg: index and threshold must be within the cohort (at most 65535)")
    if task.quant_bits > 24 or task.ring_bits > 64 or task.length > 0xFFFFFFFF:
        raise MalformedMessage("TASK secagg: quant_bits <= 24, ring_bits <= 64, length < 2**32")
    if not (task.clip > 0 and task.weight_unit > 0):
        raise MalformedMessage("TASK secagg: clip and weight_unit must be > 0")
    return task
