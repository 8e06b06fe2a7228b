"""What a device needs: GET a presigned URL with resume (Range), PUT to one, verify the digest.

:func:`download_file` appends to ``<dest>.part`` and, after a cut connection, asks for the rest
with ``Range: bytes=<have>-`` (a server that answers 200 instead of 206 is read from the start
again); a restarted device resumes from what the ``.part`` file holds. Nothing is renamed into
place, or returned, before its size and sha256 match the reference: a wrong digest deletes the
partial file and raises :class:`BlobIntegrityError`. A body longer than declared is refused as it
arrives (never buffered). :func:`upload` re-sends the whole body after a failure (a presigned PUT
cannot be resumed; S3 takes one PUT of up to 5 GiB).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.blobs.errors import BlobError, BlobIntegrityError, BlobUnavailable
from edge_agent.blobs.http import TRANSPORT_ERRORS, HttpClient, error_for
from edge_agent.errors import StorageError

__all__ = ["download_bytes", "download_file", "upload"]

_BLOCK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-\d+/(\d+|\*)$")


class _MemorySink:
    def __init__(self) -> None:
        self.buffer = bytearray()

    @property
    def size(self) -> int:
        return len(self.buffer)

    def write(self, block: bytes) -> None:
        self.buffer += block

    def truncate(self) -> None:
        self.buffer.clear()


class _FileSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size if path.exists() else 0
        self._handle = path.open("ab")

    def write(self, block: bytes) -> None:
        self._handle.write(block)
        self.size += len(block)

    def truncate(self) -> None:
        self._handle.truncate(0)
        self._handle.seek(0)
        self.size = 0

    def close(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


def _fetch(
    url: str,
    sink: _MemorySink | _FileSink,
    size: int,
    http: HttpClient,
    attempts: int,
    sleep: Callable[[float], None],
) -> None:
    """Fill ``sink`` with the ``size`` bytes at ``url``, resuming after failures (at most ``attempts``)."""
    failures = 0
    where = url.split("?", 1)[0]
    while sink.size < size:
        before = sink.size
        try:
            _one_request(url, sink, size, http, where)
        except BlobUnavailable as exc:
            problem: BaseException = exc
        except TRANSPORT_ERRORS as exc:  # cut while reading the body
            problem = exc
        else:
            if sink.size >= size:
                return
            problem = BlobUnavailable(f"GET {where}: body ended after {sink.size} of {size} bytes")
        failures = failures + 1 if sink.size == before else 1  # progress resets the count
        if failures >= attempts:
            raise BlobUnavailable(f"GET {where}: gave up after {failures} failed attempts: {problem}") from problem
        sleep(min(8.0, 0.25 * 2 ** (failures - 1)))


def _one_request(url: str, sink: _MemorySink | _FileSink, size: int, http: HttpClient, where: str) -> None:
    headers = {"range": f"bytes={sink.size}-"} if sink.size else {}
    with http.open("GET", url, headers) as (status, response_headers, stream):
        if status == 416 and sink.size == size:
            return
        if status not in (200, 206) or stream is None:
            raise error_for(status, stream.read(4096) if stream is not None else b"", f"GET {where}")
        if status == 206:
            match = _CONTENT_RANGE.match(response_headers.get("content-range", ""))
            if match is None or int(match.group(1)) != sink.size:
                sink.truncate()  # not the range asked for: start over rather than splice
                return
        elif sink.size:
            sink.truncate()  # 200: the server ignored the Range, the body starts at byte 0
        while block := stream.read(_BLOCK):
            if sink.size + len(block) > size:
                raise BlobIntegrityError(f"GET {where}: more than the declared {size} bytes")
            sink.write(block)


def _check(digest: str, sha256: str, where: str) -> None:
    if digest != sha256:
        raise BlobIntegrityError(f"GET {where}: sha256 {digest[:16]}… does not match the expected {sha256[:16]}…")


def download_bytes(
    url: str,
    *,
    size: int,
    sha256: str,
    http: HttpClient | None = None,
    attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """The ``size`` bytes at ``url`` once their sha256 is ``sha256`` (resumes in memory)."""
    sink = _MemorySink()
    _fetch(url, sink, size, http or HttpClient(), attempts, sleep)
    _check(hashlib.sha256(sink.buffer).hexdigest(), sha256, url.split("?", 1)[0])
    return bytes(sink.buffer)


def download_file(
    url: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    http: HttpClient | None = None,
    attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download to ``dest`` through ``dest.part`` (kept across failures and restarts for resuming)."""
    partial = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sink = _FileSink(partial)
    except OSError as exc:
        raise StorageError(f"cannot write {partial}: {exc.strerror or exc}") from exc
    if sink.size > size:
        sink.truncate()
    try:
        _fetch(url, sink, size, http or HttpClient(), attempts, sleep)
    finally:
        sink.close()
    digest = hashlib.sha256()
    with partial.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    try:
        _check(digest.hexdigest(), sha256, url.split("?", 1)[0])
    except BlobIntegrityError:
        partial.unlink(missing_ok=True)  # a corrupt prefix must not be resumed
        raise
    os.replace(partial, dest)
    return dest


def upload(
    url: str,
    data: bytes,
    *,
    http: HttpClient | None = None,
    attempts: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """PUT ``data`` to a presigned URL; transport failures are retried, HTTP refusals raised."""
    client, where = http or HttpClient(), url.split("?", 1)[0]
    for attempt in range(1, attempts + 1):
        try:
            response = client.send("PUT", url, {"content-length": str(len(data))}, data)
        except BlobUnavailable:
            if attempt == attempts:
                raise
            sleep(min(8.0, 0.25 * 2 ** (attempt - 1)))
            continue
        if response.status in (200, 201, 204):
            return
        error = error_for(response.status, response.body, f"PUT {where}")
        if not isinstance(error, BlobUnavailable) or attempt == attempts:
            raise error
        sleep(min(8.0, 0.25 * 2 ** (attempt - 1)))
    raise BlobError(f"PUT {where}: no attempt made")  # attempts < 1
