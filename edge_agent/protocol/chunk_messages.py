"""CHUNK (type 5) and CHUNK_ACK (type 6): the messages of chunked transfers (docs/protocol.md §3, §4c).

Moved out of :mod:`edge_agent.protocol.messages`, which registers them in its envelope codec and
re-exports every name here; the transfer state machines are :mod:`edge_agent.protocol.chunks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import MalformedMessage
from edge_agent.protocol.header import Header

__all__ = [
    "ACK_COMPLETE",
    "ACK_OK",
    "ACK_REJECTED",
    "ACK_RESEND",
    "ACK_STATUSES",
    "SHA256_PATTERN",
    "ChunkAck",
    "ChunkMessage",
    "chunk_ack_header",
    "chunk_header",
    "decode_chunk",
    "decode_chunk_ack",
    "no_payload",
]

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, kw_only=True)
class ChunkMessage:
    """One slice of a larger envelope (a TASK downloaded or an UPDATE uploaded in pieces).

    Chunk ``index`` covers bytes ``[index * chunk_size, min((index + 1) * chunk_size, total_size))``
    of the object; ``sha256`` is the whole object's digest, checked before it is decoded.
    ``device_id`` is always the device end of the transfer (sender of an upload, recipient of a
    download); ``round``/``task_id`` name the task the object belongs to.
    """

    device_id: str
    round: int
    task_id: str
    transfer_id: str
    index: int
    count: int
    chunk_size: int
    total_size: int
    sha256: str
    data: bytes = b""


#: CHUNK_ACK statuses: ``next`` chunks received in order so far / chunk ``next`` is missing (a gap:
#: out of order, or the receiver lost its state), resend from it / the object is complete and
#: verified / the transfer was refused for good (``reason`` says why; the sender stops)
ACK_OK, ACK_RESEND, ACK_COMPLETE, ACK_REJECTED = "ok", "resend", "complete", "rejected"
ACK_STATUSES = (ACK_OK, ACK_RESEND, ACK_COMPLETE, ACK_REJECTED)


@dataclass(frozen=True, kw_only=True)
class ChunkAck:
    """Receiver -> sender: ``next`` chunks of ``transfer_id`` are held (the next one wanted)."""

    device_id: str
    round: int
    task_id: str
    transfer_id: str
    next: int
    status: str = ACK_OK
    reason: str = ""


def chunk_header(message: ChunkMessage) -> dict[str, Any]:
    """The CHUNK header fields after ``device_id``/``round``/``task_id``."""
    return {
        "transfer_id": message.transfer_id,
        "index": message.index,
        "count": message.count,
        "chunk_size": message.chunk_size,
        "total_size": message.total_size,
        "sha256": message.sha256,
    }


def chunk_ack_header(message: ChunkAck) -> dict[str, Any]:
    """The CHUNK_ACK header fields after ``device_id``/``round``/``task_id``."""
    header: dict[str, Any] = {"transfer_id": message.transfer_id, "next": message.next, "status": message.status}
    if message.reason:
        header["reason"] = message.reason
    return header


def no_payload(h: Header, payload: memoryview) -> None:
    if len(payload):
        raise MalformedMessage(f"{h.type_name} carries {len(payload)} unexpected payload bytes")


def decode_chunk(h: Header, payload: memoryview) -> ChunkMessage:
    chunk = ChunkMessage(
        device_id=h.device_id(),
        round=h.int_field("round", minimum=-1),
        task_id=h.str_field("task_id"),
        transfer_id=h.token_field("transfer_id"),
        index=h.int_field("index", minimum=0),
        count=h.int_field("count", minimum=1),
        chunk_size=h.int_field("chunk_size", minimum=1),
        total_size=h.int_field("total_size", minimum=1),
        sha256=h.str_field("sha256"),
        data=bytes(payload),
    )
    if not SHA256_PATTERN.match(chunk.sha256):
        raise MalformedMessage("CHUNK field 'sha256' is not 64 lowercase hex digits")
    if chunk.count != -(-chunk.total_size // chunk.chunk_size):
        raise MalformedMessage(
            f"CHUNK count {chunk.count} does not match total_size {chunk.total_size} / chunk_size {chunk.chunk_size}"
        )
    if chunk.index >= chunk.count:
        raise MalformedMessage(f"CHUNK index {chunk.index} >= count {chunk.count}")
    expected = min(chunk.chunk_size, chunk.total_size - chunk.index * chunk.chunk_size)
    if len(chunk.data) != expected:
        raise MalformedMessage(f"CHUNK {chunk.index} carries {len(chunk.data)} bytes, expected {expected}")
    return chunk


def decode_chunk_ack(h: Header, payload: memoryview) -> ChunkAck:
    no_payload(h, payload)
    status = h.str_field("status")
    if status not in ACK_STATUSES:
        raise MalformedMessage(f"CHUNK_ACK status {status!r} is not one of {list(ACK_STATUSES)}")
    return ChunkAck(
        device_id=h.device_id(),
        round=h.int_field("round", minimum=-1),
        task_id=h.str_field("task_id"),
        transfer_id=h.token_field("transfer_id"),
        next=h.int_field("next", minimum=0),
        status=status,
        reason=h.str_field("reason") if "reason" in h.raw else "",
    )
