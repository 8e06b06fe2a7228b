"""The local filesystem backend: atomic, content-addressed by default, traversal-safe keys.

Layout under ``root``: ``data/<key>`` holds the object, ``meta/<key>`` its ``"<sha256> <size>"``.
An object is streamed into a temporary file beside its target while it is hashed, fsynced and
renamed over the target (:mod:`edge_agent.files` for the small metadata file), so a reader sees
the old object or the new one, never half of one; a crash between the two renames leaves stale
metadata, which :meth:`LocalBlobStore.head` notices (size differs) and recomputes.

Presigned URLs point at the server's blob HTTP endpoint (``base_url``, served by
:mod:`broker_server.blob_http`) and carry an HMAC-SHA256 over method, key and expiry
(:func:`local_signature`), checked by :func:`verify_local_url` with the server's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

from edge_agent.blobs.errors import BlobAccessDenied, BlobError, BlobNotFound, BlobTooLarge, ClaimExpired
from edge_agent.blobs.keys import check_key, content_key
from edge_agent.blobs.store import BlobInfo, Payload
from edge_agent.errors import StorageError
from edge_agent.files import atomic_write

__all__ = ["LocalBlobStore", "local_signature", "verify_local_url"]

_BLOCK = 1 << 20
_CONTEXT = "fedflock local blob v1"


def local_signature(secret: bytes, method: str, key: str, expires_at: int) -> str:
    """Hex HMAC-SHA256 of ``context LF METHOD LF key LF expires_at`` (domain-separated)."""
    message = f"{_CONTEXT}\n{method.upper()}\n{key}\n{expires_at}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify_local_url(secret: bytes, method: str, key: str, expires_at: int, signature: str, now: float) -> None:
    """Raise :class:`BlobAccessDenied` for a wrong signature, :class:`ClaimExpired` after ``expires_at``."""
    expected = local_signature(secret, method, key, expires_at)
    if not hmac.compare_digest(expected, signature):
        raise BlobAccessDenied(f"{method} {key}: signature does not match")
    if now > expires_at:
        raise ClaimExpired(f"{method} {key}: URL expired at {expires_at}")


class LocalBlobStore:
    """Blobs as files under ``root``; ``base_url``/``secret`` only for presigned URLs."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        base_url: str = "",
        secret: bytes = b"",
        clock: Callable[[], float] = time.time,
        max_bytes: int = 4 << 30,
    ) -> None:
        self.root = Path(root)
        self.base_url = base_url.rstrip("/")
        self._secret = secret
        self._clock = clock
        self.max_bytes = max_bytes

    def _data(self, key: str) -> Path:
        return self.root / "data" / check_key(key)

    def _meta(self, key: str) -> Path:
        return self.root / "meta" / check_key(key)

    def put(self, data: Payload, *, key: str | None = None) -> BlobInfo:
        if key is None:
            if not isinstance(data, bytes):
                raise BlobError("a streamed put needs a key (its content address is known only after reading it)")
            key = content_key(hashlib.sha256(data).hexdigest())
        target = self._data(key)
        size, digest = self._write(target, data)
        atomic_write(self._meta(key), f"{digest} {size}".encode("ascii"))
        return BlobInfo(key, size, digest)

    def _write(self, target: Path, data: Payload) -> tuple[int, str]:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        except OSError as exc:
            raise StorageError(f"cannot write blob {target}: {exc.strerror or exc}") from exc
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as handle:
                for block in _blocks(data):
                    size += len(block)
                    if size > self.max_bytes:
                        raise BlobTooLarge(f"blob {target.name} exceeds {self.max_bytes} bytes")
                    digest.update(block)
                    handle.write(block)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except OSError as exc:
            raise StorageError(f"cannot write blob {target}: {exc.strerror or exc}") from exc
        finally:
            Path(temporary).unlink(missing_ok=True)
        return size, digest.hexdigest()

    def get(self, key: str) -> bytes:
        return self.open_range(key, 0)

    def open_range(self, key: str, start: int, end: int | None = None) -> bytes:
        path = self._data(key)
        try:
            with path.open("rb") as handle:
                handle.seek(start)
                return handle.read() if end is None else handle.read(max(0, end - start))
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {key!r}") from None
        except OSError as exc:
            raise StorageError(f"cannot read blob {key!r}: {exc.strerror or exc}") from exc

    def path(self, key: str) -> Path:
        """The file holding ``key`` (the HTTP endpoint streams it); :class:`BlobNotFound` if none."""
        path = self._data(key)
        if not path.is_file():
            raise BlobNotFound(f"no blob {key!r}")
        return path

    def head(self, key: str) -> BlobInfo:
        size = self.path(key).stat().st_size
        try:
            recorded_digest, recorded_size = self._meta(key).read_text("ascii").split()
            if int(recorded_size) == size:
                return BlobInfo(key, size, recorded_digest)
        except (OSError, ValueError):
            pass  # missing or stale metadata (a crash between the renames): recompute below
        digest = hashlib.sha256()
        with self.path(key).open("rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
        return BlobInfo(key, size, digest.hexdigest())

    def delete(self, key: str) -> None:
        for path in (self._data(key), self._meta(key)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot delete blob {key!r}: {exc.strerror or exc}") from exc

    def presign_get(self, key: str, expires_s: int) -> str:
        return self._presign("GET", key, expires_s)

    def presign_put(self, key: str, expires_s: int) -> str:
        return self._presign("PUT", key, expires_s)

    def _presign(self, method: str, key: str, expires_s: int) -> str:
        if not self.base_url or not self._secret:
            raise BlobError("this local blob store has no base_url/secret: it cannot make presigned URLs")
        if expires_s < 1:
            raise BlobError(f"URL lifetime must be >= 1 s, not {expires_s}")
        expires_at = int(self._clock()) + expires_s
        signature = local_signature(self._secret, method, check_key(key), expires_at)
        return f"{self.base_url}/{quote(key)}?expires={expires_at}&signature={signature}"


def _blocks(data: Payload) -> Iterator[bytes]:
    """``data`` in blocks of at most 1 MiB (bytes: one block)."""
    if isinstance(data, bytes):
        yield data
        return
    while block := data.read(_BLOCK):
        yield bytes(block)
