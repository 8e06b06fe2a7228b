"""The blob store port: a narrow protocol every backend implements (docs/blobs.md).

Keys follow :mod:`edge_agent.blobs.keys`. ``put`` stores bytes or a binary file (streamed, for
objects larger than memory should hold) and returns what was stored, sha256 included; without a
key the object is stored under its content address (:func:`~edge_agent.blobs.keys.content_key`).
``open_range`` reads ``[start, end)``; ``presign_get``/``presign_put`` make URLs a device can use
with a plain HTTP client for ``expires_s`` seconds: the device never holds store credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Protocol, runtime_checkable

__all__ = ["BlobInfo", "BlobStore", "Payload"]

#: what ``put`` takes: bytes, or a binary file positioned at its start (read to its end)
Payload = bytes | IO[bytes]


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    #: lower-case hex; "" when the store does not know it (an object a device PUT through a URL)
    sha256: str = ""


@runtime_checkable
class BlobStore(Protocol):
    def put(self, data: Payload, *, key: str | None = None) -> BlobInfo:
        """Store ``data`` under ``key`` (default: its content address); atomic: all or nothing."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object; :class:`~edge_agent.blobs.errors.BlobNotFound` if there is none."""
        ...

    def open_range(self, key: str, start: int, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the object (``end`` None: to its end)."""
        ...

    def head(self, key: str) -> BlobInfo:
        """Size (and sha256 when known) without reading the object."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...

    def presign_get(self, key: str, expires_s: int) -> str:
        """A URL anyone holding it may GET (with Range) until it expires."""
        ...

    def presign_put(self, key: str, expires_s: int) -> str:
        """A URL anyone holding it may PUT one object to until it expires."""
        ...
