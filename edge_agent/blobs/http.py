"""A small stdlib HTTP(S) client for blob stores and presigned URLs (no new device dependency).

:class:`HttpClient` sends one request and returns the status, the headers and (for
:meth:`~HttpClient.send`) the body; non-2xx statuses are returned, not raised, so the store can
translate S3 error codes. Only transport failures raise, as :class:`BlobUnavailable`.
:meth:`~HttpClient.open` streams a body (ranged downloads write it piece by piece).
:func:`error_for` maps an HTTP status and S3 error document to the blob error tree.
"""

from __future__ import annotations

import http.client
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from edge_agent.blobs.errors import (
    BlobAccessDenied,
    BlobError,
    BlobIntegrityError,
    BlobNotFound,
    BlobTooLarge,
    BlobUnavailable,
)

__all__ = ["TRANSPORT_ERRORS", "HttpClient", "HttpResponse", "error_for", "s3_error_code"]

#: what a cut connection or unreachable host raises from urllib/http.client/socket
TRANSPORT_ERRORS = (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError, OSError)
_CODE = re.compile(rb"<Code>([A-Za-z0-9.]+)</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,300})</Message>")
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NoSuchUpload"}
_INTEGRITY = {"BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest", "InvalidPart", "InvalidPartOrder"}


@dataclass(frozen=True)
class HttpResponse:
    status: int
    #: lower-cased header names
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would re-send a signed request elsewhere: return the 3xx instead."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class HttpClient:
    """One request at a time; ``timeout_s`` bounds every socket operation."""

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirect())

    def send(
        self, method: str, url: str, headers: Mapping[str, str] | None = None, body: bytes | IO[bytes] | None = None
    ) -> HttpResponse:
        """The whole response; raises :class:`BlobUnavailable` only when no response came."""
        with self.open(method, url, headers, body) as (status, response_headers, stream):
            try:
                data = stream.read() if stream is not None else b""
            except TRANSPORT_ERRORS as exc:
                raise BlobUnavailable(f"{method} {_where(url)}: connection lost reading the response: {exc}") from exc
        return HttpResponse(status, response_headers, data)

    @contextmanager
    def open(
        self, method: str, url: str, headers: Mapping[str, str] | None = None, body: bytes | IO[bytes] | None = None
    ) -> Iterator[tuple[int, dict[str, str], IO[bytes] | None]]:
        """(status, headers, body stream) of one request; the stream is closed on exit."""
        fields = dict(headers or {})
        if body is not None and not any(name.lower() == "content-type" for name in fields):
            fields["content-type"] = "application/octet-stream"  # urllib would say form-urlencoded
        request = urllib.request.Request(url, data=body, method=method, headers=fields)
        try:
            response = self._opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:  # a status, not a failure: the caller translates it
            try:
                yield exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc
            finally:
                exc.close()
            return
        except TRANSPORT_ERRORS as exc:
            raise BlobUnavailable(f"{method} {_where(url)}: {getattr(exc, 'reason', exc)}") from exc
        try:
            yield response.status, {k.lower(): v for k, v in response.headers.items()}, response
        finally:
            response.close()


def _where(url: str) -> str:
    """The URL without its query (never log a presigned signature)."""
    return url.split("?", 1)[0]


def s3_error_code(body: bytes) -> tuple[str, str]:
    """(``<Code>``, ``<Message>``) of an S3 XML error document, ``("", "")`` if it has none."""
    code, message = _CODE.search(body), _MESSAGE.search(body)
    return (
        code.group(1).decode("ascii") if code else "",
        message.group(1).decode("utf-8", "replace") if message else "",
    )


def error_for(status: int, body: bytes, what: str) -> BlobError:
    """The blob error for a non-2xx response to ``what`` (e.g. ``"GET models/a"``)."""
    code, message = s3_error_code(body)
    detail = f"{what}: HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if status == 404 or code in _NOT_FOUND:
        return BlobNotFound(detail)
    if code in _INTEGRITY:
        return BlobIntegrityError(detail)
    if status in (401, 403):
        return BlobAccessDenied(detail)
    if status == 413 or code == "EntityTooLarge":
        return BlobTooLarge(detail)
    if status >= 500 or status in (408, 429):
        return BlobUnavailable(detail)
    return BlobError(detail)
