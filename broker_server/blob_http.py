"""The local backend's HTTP endpoint: devices GET (with Range) and PUT through presigned URLs.

:class:`LocalBlobServer` serves a :class:`~edge_agent.blobs.LocalBlobStore` on its own port
(stdlib ``ThreadingHTTPServer``; put TLS in front of it, or use S3, outside a trusted network).
Every request must carry a URL made by the store's ``presign_get``/``presign_put``: the HMAC is
checked (:func:`~edge_agent.blobs.local.verify_local_url`) before the store is touched; 403 for a
wrong signature or an expired URL, 404 for a missing object, 413 above ``max_put_bytes``, 411
without a Content-Length. GET honours one ``bytes=a-`` / ``bytes=a-b`` range (206), which is what
a resuming device sends. Explicit :meth:`start`/:meth:`close`; no I/O in the constructor.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from urllib.parse import parse_qs, unquote, urlsplit

from edge_agent.blobs import BlobError, BlobNotFound, LocalBlobStore
from edge_agent.blobs.errors import BlobAccessDenied, BlobTooLarge
from edge_agent.blobs.local import verify_local_url
from edge_agent.errors import ConfigError

__all__ = ["LocalBlobServer"]

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_BLOCK = 1 << 20


class _Limited:
    """At most ``remaining`` bytes of ``stream`` (the request body)."""

    def __init__(self, stream: BufferedIOBase, remaining: int) -> None:
        self._stream, self.remaining = stream, remaining

    def read(self, size: int = -1) -> bytes:
        size = self.remaining if size < 0 else min(size, self.remaining)
        data = self._stream.read(size) if size else b""
        self.remaining -= len(data)
        return data


class LocalBlobServer:
    def __init__(
        self,
        store: LocalBlobStore,
        secret: bytes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_put_bytes: int = 1 << 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._secret = secret
        self._address = (host, port)
        self.max_put_bytes = max_put_bytes
        self._clock = clock
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` once started (give it to the store as ``base_url``)."""
        if self._server is None:
            raise BlobError("the blob HTTP server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        handler = _handler(self)
        try:
            self._server = ThreadingHTTPServer(self._address, handler)
        except OSError as exc:
            raise ConfigError(f"blobs.listen_port: cannot listen on {self._address}: {exc.strerror or exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="blob-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalBlobServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def authorize(self, method: str, raw_path: str) -> str:
        """The key a request may act on; raises :class:`BlobAccessDenied` (or ClaimExpired)."""
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query)
        try:
            expires_at = int(query["expires"][0])
            signature = query["signature"][0]
        except (KeyError, ValueError, IndexError):
            raise BlobAccessDenied(f"{method}: not a presigned URL") from None
        key = unquote(parts.path.lstrip("/"))
        verify_local_url(self._secret, method, key, expires_at, signature, self._clock())
        return key


def _handler(owner: LocalBlobServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet: no signatures in logs
            return

        def _fail(self, status: int, exc: BlobError) -> None:
            body = f"<Error><Code>{exc.code}</Code><Message>{exc.reason[:200]}</Message></Error>".encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            try:
                key = owner.authorize("GET", self.path)
                path = owner.store.path(key)
            except BlobAccessDenied as exc:
                return self._fail(403, exc)
            except (BlobNotFound, ConfigError) as exc:
                return self._fail(404, exc if isinstance(exc, BlobError) else BlobNotFound(exc.reason))
            size = path.stat().st_size
            start, end = 0, size
            match = _RANGE.match(self.headers.get("range", ""))
            if match:
                start = int(match.group(1))
                end = min(size, int(match.group(2)) + 1) if match.group(2) else size
                if start >= size:
                    self.send_response(416)
                    self.send_header("content-range", f"bytes */{size}")
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return None
            self.send_response(206 if match else 200)
            if match:
                self.send_header("content-range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("content-length", str(end - start))
            self.send_header("accept-ranges", "bytes")
            self.end_headers()
            with path.open("rb") as handle:
                handle.seek(start)
                remaining = end - start
                while remaining and (block := handle.read(min(_BLOCK, remaining))):
                    self.wfile.write(block)
                    remaining -= len(block)
            return None

        def do_PUT(self) -> None:
            try:
                key = owner.authorize("PUT", self.path)
            except BlobAccessDenied as exc:
                return self._fail(403, exc)
            length = self.headers.get("content-length")
            if length is None or not length.isdigit():
                return self._fail(411, BlobError("PUT needs a Content-Length"))
            if int(length) > owner.max_put_bytes:
                self.close_connection = True
                return self._fail(413, BlobTooLarge(f"{length} bytes exceeds {owner.max_put_bytes}"))
            body = _Limited(self.rfile, int(length))
            try:
                owner.store.put(body, key=key)  # type: ignore[arg-type]
            except (BlobError, ConfigError) as exc:
                self.close_connection = True
                return self._fail(400, exc if isinstance(exc, BlobError) else BlobError(exc.reason))
            if body.remaining:
                return self._fail(400, BlobError("request body shorter than its Content-Length"))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()
            return None

    return Handler
