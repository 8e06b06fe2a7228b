"""CLAIM (type 10): claim checks — a large object travels through a blob store, MQTT carries a reference.

One envelope type, no payload, three kinds told apart by the header field ``op`` (docs/blobs.md,
"Wire"). Every header has ``device_id`` (always the device end), ``round`` (-1 for model
bundles), ``task_id`` and ``claim_id`` (a token, ``[A-Za-z0-9_.:+-]{1,64}``, naming the claim):

``op = "grant"`` — server -> device on its ``tasks`` topic, next to a TASK: the device may PUT the
task's result, if it is larger than ``threshold`` bytes and at most ``max_size``, to ``url`` (a
presigned PUT) until ``expires_at`` (Unix seconds), then send a reference naming ``key``.

``op = "reference"`` — the claim check itself, either direction: the object (``kind``
``envelope``: a fedflock envelope, decoded as if it had arrived inline; ``bundle-archive``: a
model archive, §8.5) is ``size`` bytes with digest ``sha256`` at ``url`` (presigned GET) or, for a
receiver holding the store (the server), at ``key``. A receiver refuses a reference above its
limit before fetching, past ``expires_at``, or whose bytes do not hash to ``sha256``.

``op = "ack"`` — receiver -> sender: ``status`` ``complete`` (resolved and verified: the sender may
drop its copy), ``retry`` (transient: try again later) or ``rejected`` (refused for good: send the
object another way), with a ``reason``. The sender keeps the object until it reads ``complete``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import MalformedMessage
from edge_agent.protocol.chunk_messages import SHA256_PATTERN, no_payload
from edge_agent.protocol.header import Header

__all__ = [
    "CLAIM",
    "CLAIM_COMPLETE",
    "CLAIM_KINDS",
    "CLAIM_REJECTED",
    "CLAIM_RETRY",
    "CLAIM_TYPES",
    "ClaimAck",
    "ClaimGrant",
    "ClaimMessage",
    "ClaimReference",
    "claim_header",
    "decode_claim",
]

CLAIM = 10
KIND_ENVELOPE, KIND_BUNDLE = "envelope", "bundle-archive"
CLAIM_KINDS = (KIND_ENVELOPE, KIND_BUNDLE)
CLAIM_COMPLETE, CLAIM_RETRY, CLAIM_REJECTED = "complete", "retry", "rejected"
_STATUSES = (CLAIM_COMPLETE, CLAIM_RETRY, CLAIM_REJECTED)
_URL = re.compile(r"^https?://[\x21-\x7e]{1,4088}$")
#: edge_agent.blobs.keys.KEY_PATTERN (the protocol does not import the store package)
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
MAX_KEY_CHARS = 512


@dataclass(frozen=True, kw_only=True)
class ClaimGrant:
    """Server -> device: where the result of ``task_id`` may be uploaded."""

    device_id: str
    round: int
    task_id: str
    claim_id: str
    url: str
    key: str
    max_size: int
    threshold: int
    expires_at: int


@dataclass(frozen=True, kw_only=True)
class ClaimReference:
    """The claim check: ``size`` bytes hashing to ``sha256`` at ``url`` (or the receiver's ``key``)."""

    device_id: str
    round: int
    task_id: str
    claim_id: str
    kind: str
    sha256: str
    size: int
    expires_at: int
    url: str = ""
    key: str = ""


@dataclass(frozen=True, kw_only=True)
class ClaimAck:
    """Receiver -> sender: the reference ``claim_id`` was resolved (or why not)."""

    device_id: str
    round: int
    task_id: str
    claim_id: str
    status: str
    reason: str = ""


ClaimMessage = ClaimGrant | ClaimReference | ClaimAck
CLAIM_TYPES = (ClaimGrant, ClaimReference, ClaimAck)


def claim_header(message: ClaimMessage) -> tuple[int, dict[str, Any]]:
    """Message type and complete header."""
    base: dict[str, Any] = {
        "device_id": message.device_id,
        "round": message.round,
        "task_id": message.task_id,
        "claim_id": message.claim_id,
    }
    if isinstance(message, ClaimGrant):
        fields: dict[str, Any] = {
            "op": "grant",
            "url": message.url,
            "key": message.key,
            "max_size": message.max_size,
            "threshold": message.threshold,
            "expires_at": message.expires_at,
        }
    elif isinstance(message, ClaimReference):
        fields = {
            "op": "reference",
            "kind": message.kind,
            "sha256": message.sha256,
            "size": message.size,
            "expires_at": message.expires_at,
            "url": message.url,
            "key": message.key,
        }
    else:
        fields = {"op": "ack", "status": message.status, "reason": message.reason}
    return CLAIM, base | fields


def decode_claim(h: Header, payload: memoryview) -> ClaimMessage:
    no_payload(h, payload)
    base: dict[str, Any] = {
        "device_id": h.device_id(),
        "round": h.int_field("round", minimum=-1),
        "task_id": h.str_field("task_id"),
        "claim_id": h.token_field("claim_id"),
    }
    op = h.str_field("op")
    if op == "grant":
        return ClaimGrant(
            **base,
            url=_url(h, required=True),
            key=_key(h, required=True),
            max_size=h.int_field("max_size", minimum=1),
            threshold=h.int_field("threshold", minimum=0),
            expires_at=h.int_field("expires_at", minimum=0),
        )
    if op == "reference":
        kind = h.str_field("kind")
        if kind not in CLAIM_KINDS:
            raise MalformedMessage(f"CLAIM field 'kind' must be one of {CLAIM_KINDS}, not {kind[:40]!r}")
        sha256 = h.str_field("sha256")
        if not SHA256_PATTERN.match(sha256):
            raise MalformedMessage("CLAIM field 'sha256' is not 64 lowercase hex digits")
        url, key = _url(h, required=False), _key(h, required=False)
        if not url and not key:
            raise MalformedMessage("CLAIM reference has neither 'url' nor 'key'")
        return ClaimReference(
            **base,
            kind=kind,
            sha256=sha256,
            size=h.int_field("size", minimum=1),
            expires_at=h.int_field("expires_at", minimum=0),
            url=url,
            key=key,
        )
    if op == "ack":
        status = h.str_field("status")
        if status not in _STATUSES:
            raise MalformedMessage(f"CLAIM field 'status' must be one of {_STATUSES}, not {status[:40]!r}")
        return ClaimAck(**base, status=status, reason=h.str_field("reason")[:1000])
    raise MalformedMessage(f"CLAIM field 'op' must be grant, reference or ack, not {op[:40]!r}")


def _url(h: Header, *, required: bool) -> str:
    url = h.str_field("url") if required or "url" in h.raw else ""
    if (url or required) and not _URL.match(url):
        raise MalformedMessage("CLAIM field 'url' is not an http(s) URL of printable ASCII (<= 4096)")
    return url


def _key(h: Header, *, required: bool) -> str:
    key = h.str_field("key") if required or "key" in h.raw else ""
    if (key or required) and (len(key) > MAX_KEY_CHARS or not _KEY.match(key)):
        raise MalformedMessage("CLAIM field 'key' is not a valid blob key")
    return key
