"""Byte encoding of the secure-aggregation messages (version 1). No pickle, no JSON.

All integers are little-endian and unsigned: ``u8``, ``u16``, ``u32``; ``f64`` is an IEEE-754
binary64. ``bytes[n]`` is exactly ``n`` raw bytes. Device indices are ``u16`` in ``1..65535``.
Every message starts with a 22-byte header::

    magic    bytes[4]  b"FFSA"
    version  u8        1
    type     u8        1..9, below
    session  bytes[16] the session id every member was given in SETUP

then the body of its type (nothing may follow it)::

    1 SETUP            index u16 | cohort u16 | threshold u16 | quant_bits u8 | ring_bits u8
                       | clip f64 | length u32
    2 ADVERTISE        index u16 | enc_public bytes[32] | mask_public bytes[32]
    3 KEYS             count u16 | count x (index u16 | enc_public bytes[32] | mask_public bytes[32])
    4 SHARES           sender u16 | count u16 | count x (recipient u16 | blob bytes[156])
    5 BUNDLE           recipient u16 | count u16 | count x (sender u16 | blob bytes[156])
    6 MASKED           sender u16 | ring_bits u8 | length u32 | length x value (ceil(ring_bits/8) bytes
                       each, little-endian, each < 2**ring_bits)
    7 UNMASK_REQUEST   n u16 | n x survivor u16 | m u16 | m x dropped u16
    8 UNMASK_RESPONSE  sender u16 | count u16 | count x (owner u16 | kind u8 | share bytes[64])
                       kind 1 = share of the owner's self-mask seed b, 2 = of its mask private key
    9 ABORT            length u16 | reason bytes[length] (UTF-8)

Lists are sorted by strictly increasing index (so each index appears once); the two lists of
UNMASK_REQUEST are disjoint. A ``blob`` is ``nonce[12] | AES-256-GCM ciphertext[128] | tag[16]``
of the plaintext ``mask-key share[64] | self-mask-seed share[64]`` (see
:mod:`edge_agent.secagg.crypto` for keys and associated data); a ``share`` is 16 ``u32`` field
values (:mod:`edge_agent.secagg.shamir`). SETUP's values must satisfy
:class:`~edge_agent.secagg.params.SecAggParams`.

Errors: truncated, oversized or inconsistent bytes raise
:class:`~edge_agent.errors.MalformedMessage`; another version
:class:`~edge_agent.errors.UnsupportedVersion`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import TypeVar

from edge_agent.errors import ConfigError, ContractViolation, MalformedMessage, UnsupportedVersion
from edge_agent.secagg import ring
from edge_agent.secagg.crypto import KEY_BYTES, NONCE_BYTES, SESSION_BYTES, TAG_BYTES
from edge_agent.secagg.messages import (
    Abort,
    AdvertiseKeys,
    DeviceKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    Message,
    Setup,
    ShareBundle,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
)
from edge_agent.secagg.params import SecAggParams
from edge_agent.secagg.shamir import MAX_INDEX, SHARE_BYTES

T = TypeVar("T")
MAGIC = b"FFSA"
VERSION = 1
BLOB_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
HEADER = struct.Struct("<4sBB16s")
SETUP = struct.Struct("<HHHBBdI")
MAX_REASON_BYTES = 1024
TYPES: dict[type, int] = {
    Setup: 1,
    AdvertiseKeys: 2,
    KeyList: 3,
    EncryptedShares: 4,
    ShareBundle: 5,
    MaskedInput: 6,
    UnmaskRequest: 7,
    UnmaskResponse: 8,
    Abort: 9,
}


class _Reader:
    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.view = memoryview(data)
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> memoryview:
        if self.pos + n > len(self.view):
            raise MalformedMessage(
                f"{self.what}: truncated at {field} (needs {n} bytes at offset {self.pos}, {len(self.view)} in total)"
            )
        chunk = self.view[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct, field: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, field))

    def u8(self, field: str) -> int:
        return int(self.take(1, field)[0])

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def index(self, field: str) -> int:
        value = self.u16(field)
        if value == 0:
            raise MalformedMessage(f"{self.what}: {field} is 0 (device indices start at 1)")
        return value

    def indices(self, field: str) -> tuple[int, ...]:
        count = self.u16(f"{field} count")
        return _ascending(tuple(self.index(field) for _ in range(count)), self.what, field)

    def end(self) -> None:
        if self.pos != len(self.view):
            raise MalformedMessage(f"{self.what}: {len(self.view) - self.pos} unexpected bytes after the message")


def _ascending(values: tuple[int, ...], what: str, field: str) -> tuple[int, ...]:
    if any(b <= a for a, b in pairwise(values)):
        raise MalformedMessage(f"{what}: {field} indices are not strictly increasing")
    return values


def _u16(value: int, field: str) -> bytes:
    if not 0 <= value <= MAX_INDEX:
        raise ContractViolation(f"cannot encode {field} = {value}: not a u16")
    return value.to_bytes(2, "little")


def _fixed(value: bytes, size: int, field: str) -> bytes:
    if len(value) != size:
        raise ContractViolation(f"cannot encode {field}: {len(value)} bytes, expected {size}")
    return bytes(value)


def _blobs(blobs: Mapping[int, bytes], field: str) -> bytes:
    parts = [_u16(len(blobs), f"{field} count")]
    for index in sorted(blobs):
        parts += [_u16(index, field), _fixed(blobs[index], BLOB_BYTES, "share blob")]
    return b"".join(parts)


def _body(message: Message) -> bytes:
    if isinstance(message, Setup):
        p, r = message.params, message.params.ring
        return SETUP.pack(message.index, p.cohort, p.threshold, r.quant_bits, r.ring_bits, float(r.clip), p.length)
    if isinstance(message, AdvertiseKeys):
        return _keys(message.keys)
    if isinstance(message, KeyList):
        return _u16(len(message.devices), "device count") + b"".join(_keys(k) for k in message.devices)
    if isinstance(message, EncryptedShares):
        return _u16(message.sender, "sender") + _blobs(message.blobs, "recipient")
    if isinstance(message, ShareBundle):
        return _u16(message.recipient, "recipient") + _blobs(message.blobs, "sender")
    if isinstance(message, MaskedInput):
        values = ring.pack(message.values, message.ring_bits)
        return _u16(message.sender, "sender") + struct.pack("<BI", message.ring_bits, message.values.size) + values
    if isinstance(message, UnmaskRequest):
        lists = (message.survivors, message.dropped)
        return b"".join(_u16(len(xs), "count") + b"".join(_u16(x, "index") for x in xs) for xs in lists)
    if isinstance(message, UnmaskResponse):
        parts = [_u16(message.sender, "sender"), _u16(len(message.shares), "share count")]
        for owner in sorted(message.shares):
            kind, share = message.shares[owner]
            parts += [_u16(owner, "owner"), bytes([int(kind)]), _fixed(share, SHARE_BYTES, "share")]
        return b"".join(parts)
    reason = message.reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return _u16(len(reason), "reason length") + reason


def _keys(keys: DeviceKeys) -> bytes:
    return (
        _u16(keys.index, "index")
        + _fixed(keys.enc_public, KEY_BYTES, "enc_public")
        + _fixed(keys.mask_public, KEY_BYTES, "mask_public")
    )


def _session(message: Message) -> bytes:
    return message.params.session if isinstance(message, Setup) else message.session


def encode(message: Message) -> bytes:
    """The bytes of ``message`` (see the module docstring for the layout)."""
    session = _fixed(_session(message), SESSION_BYTES, "session")
    return HEADER.pack(MAGIC, VERSION, TYPES[type(message)], session) + _body(message)


def decode(data: bytes | memoryview) -> Message:
    """The message in ``data``; :class:`MalformedMessage` / :class:`UnsupportedVersion` if it is not one."""
    reader = _Reader(data, "secagg message")
    magic, version, kind, session = reader.unpack(HEADER, "header")
    if magic != MAGIC:
        raise MalformedMessage(f"secagg message: bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise UnsupportedVersion(f"secagg message version {version} (this code speaks {VERSION})")
    names = {v: k for k, v in TYPES.items()}
    if kind not in names:
        raise MalformedMessage(f"secagg message: unknown type {kind}")
    reader.what = names[kind].__name__
    message = _DECODERS[kind](reader, bytes(session))
    reader.end()
    return message


def decode_as(data: bytes | memoryview, cls: type[T]) -> T:
    """:func:`decode`, then :class:`ContractViolation` unless the message is a ``cls``."""
    message = decode(data)
    if not isinstance(message, cls):
        raise ContractViolation(f"expected a {cls.__name__} message, got {type(message).__name__}")
    return message


def _setup(r: _Reader, session: bytes) -> Setup:
    index, cohort, threshold, quant_bits, ring_bits, clip, length = r.unpack(SETUP, "parameters")
    try:
        spec = ring.RingSpec(clip=clip, quant_bits=quant_bits, ring_bits=ring_bits)
        params = SecAggParams(session=session, cohort=cohort, threshold=threshold, length=length, ring=spec)
        params.check_index(index)
    except ConfigError as exc:
        raise MalformedMessage(f"Setup: {exc.reason}") from exc
    return Setup(params, index)


def _device_keys(r: _Reader) -> DeviceKeys:
    index = r.index("index")
    return DeviceKeys(index, bytes(r.take(KEY_BYTES, "enc_public")), bytes(r.take(KEY_BYTES, "mask_public")))


def _advertise(r: _Reader, session: bytes) -> AdvertiseKeys:
    return AdvertiseKeys(session, _device_keys(r))


def _key_list(r: _Reader, session: bytes) -> KeyList:
    devices = tuple(_device_keys(r) for _ in range(r.u16("device count")))
    _ascending(tuple(d.index for d in devices), r.what, "device")
    return KeyList(session, devices)


def _read_blobs(r: _Reader, field: str) -> dict[int, bytes]:
    entries = [(r.index(field), bytes(r.take(BLOB_BYTES, "share blob"))) for _ in range(r.u16(f"{field} count"))]
    _ascending(tuple(i for i, _ in entries), r.what, field)
    return dict(entries)


def _shares(r: _Reader, session: bytes) -> EncryptedShares:
    sender = r.index("sender")
    return EncryptedShares(session, sender, _read_blobs(r, "recipient"))


def _bundle(r: _Reader, session: bytes) -> ShareBundle:
    recipient = r.index("recipient")
    return ShareBundle(session, recipient, _read_blobs(r, "sender"))


def _masked(r: _Reader, session: bytes) -> MaskedInput:
    sender = r.index("sender")
    ring_bits, length = r.u8("ring_bits"), r.u32("length")
    if not 1 <= ring_bits <= ring.MAX_RING_BITS:
        raise MalformedMessage(f"MaskedInput: ring_bits {ring_bits} is not in 1..{ring.MAX_RING_BITS}")
    width = (ring_bits + 7) // 8
    values = ring.unpack(r.take(length * width, f"{length} values of {width} bytes"), ring_bits, length)
    return MaskedInput(session, sender, ring_bits, values)


def _request(r: _Reader, session: bytes) -> UnmaskRequest:
    survivors, dropped = r.indices("survivor"), r.indices("dropped")
    if set(survivors) & set(dropped):
        raise MalformedMessage("UnmaskRequest: a device is listed as both survivor and dropped")
    return UnmaskRequest(session, survivors, dropped)


def _response(r: _Reader, session: bytes) -> UnmaskResponse:
    sender = r.index("sender")
    shares: dict[int, tuple[ShareKind, bytes]] = {}
    owners: list[int] = []
    for _ in range(r.u16("share count")):
        owner, kind = r.index("owner"), r.u8("kind")
        if kind not in (ShareKind.SELF_MASK_SEED, ShareKind.MASK_KEY):
            raise MalformedMessage(f"UnmaskResponse: unknown share kind {kind} for owner {owner}")
        shares[owner] = (ShareKind(kind), bytes(r.take(SHARE_BYTES, "share")))
        owners.append(owner)
    _ascending(tuple(owners), r.what, "owner")
    return UnmaskResponse(session, sender, shares)


def _abort(r: _Reader, session: bytes) -> Abort:
    length = r.u16("reason length")
    if length > MAX_REASON_BYTES:
        raise MalformedMessage(f"Abort: reason of {length} bytes exceeds {MAX_REASON_BYTES}")
    try:
        reason = bytes(r.take(length, "reason")).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"Abort: reason is not UTF-8: {exc}") from exc
    return Abort(session, reason)


_DECODERS: dict[int, Callable[[_Reader, bytes], Message]] = {
    1: _setup,
    2: _advertise,
    3: _key_list,
    4: _shares,
    5: _bundle,
    6: _masked,
    7: _request,
    8: _response,
    9: _abort,
}
