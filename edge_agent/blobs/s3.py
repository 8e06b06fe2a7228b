"""The S3-compatible backend: SigV4-signed requests over the stdlib HTTP client.

Path-style (``https://endpoint/bucket/key``: MinIO, Ceph, moto, most on-premises stores) or
virtual-host style (``https://bucket.endpoint/key``: AWS). Every request is signed with
:func:`~edge_agent.blobs.sigv4.sign_headers` over the body's sha256, so the store rejects a body
changed in transit (``XAmzContentSHA256Mismatch``); the object's sha256 is kept as user metadata
``x-amz-meta-sha256`` for :meth:`S3BlobStore.head`. Objects above ``multipart_threshold`` are
uploaded in ``part_size`` parts (S3: 5 MiB..5 GiB each, <= 10,000 parts) and the upload is aborted
if any part fails, so no half object is ever visible. HTTP errors become the blob error tree
(:func:`~edge_agent.blobs.http.error_for`: NoSuchKey, AccessDenied/SignatureDoesNotMatch,
BadDigest, 5xx).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO
from urllib.parse import urlsplit

from edge_agent.blobs import sigv4
from edge_agent.blobs.errors import BlobError
from edge_agent.blobs.http import HttpClient, HttpResponse, error_for
from edge_agent.blobs.keys import check_key, content_key
from edge_agent.blobs.store import BlobInfo, Payload
from edge_agent.errors import ConfigError

__all__ = ["MIN_PART_BYTES", "S3BlobStore", "S3Location"]

MIN_PART_BYTES = 5 << 20
_UPLOAD_ID = re.compile(rb"<UploadId>([^<]+)</UploadId>")


@dataclass(frozen=True, kw_only=True)
class S3Location:
    """Where the bucket is: ``endpoint`` (scheme://host[:port]), ``bucket``, ``region``, addressing."""

    endpoint: str
    bucket: str
    region: str = "us-east-1"
    #: "path" (endpoint/bucket/key) or "virtual" (bucket.endpoint/key)
    addressing: str = "path"

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ConfigError(f"blobs.endpoint must be http(s)://host[:port], not {self.endpoint!r}")
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", self.bucket):
            raise ConfigError(f"blobs.bucket {self.bucket!r} is not a valid bucket name")
        if self.addressing not in ("path", "virtual"):
            raise ConfigError(f"blobs.addressing must be 'path' or 'virtual', not {self.addressing!r}")

    def host_and_path(self, key: str) -> tuple[str, str, str]:
        """(scheme, host, unencoded path) of ``key`` (``key`` "" addresses the bucket)."""
        parts = urlsplit(self.endpoint)
        if self.addressing == "virtual":
            return parts.scheme, f"{self.bucket}.{parts.netloc}", f"/{key}"
        return parts.scheme, parts.netloc, f"/{self.bucket}/{key}" if key else f"/{self.bucket}"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class S3BlobStore:
    """An S3 bucket as a :class:`~edge_agent.blobs.store.BlobStore` (the server's; devices get URLs)."""

    def __init__(
        self,
        location: S3Location,
        credentials: sigv4.Credentials,
        *,
        http: HttpClient | None = None,
        now: Callable[[], datetime] = _utcnow,
        part_size: int = 16 << 20,
        multipart_threshold: int = 64 << 20,
    ) -> None:
        if part_size < MIN_PART_BYTES:
            raise ConfigError(f"blobs.part_size must be >= {MIN_PART_BYTES} (S3's minimum part), not {part_size}")
        self.location = location
        self._credentials = credentials
        self._http = http or HttpClient()
        self._now = now
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, part_size)

    # -- requests -------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        key: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        ok: tuple[int, ...] = (200,),
    ) -> HttpResponse:
        scheme, host, path = self.location.host_and_path(key)
        payload_hash = hashlib.sha256(body).hexdigest()
        region, credentials = self.location.region, self._credentials
        signed = sigv4.sign_headers(
            method, host, path, params, headers or {}, payload_hash, credentials, region, now=self._now()
        )
        url = f"{scheme}://{host}{sigv4.uri_encode(path, keep_slash=True)}"
        if params:
            url += "?" + sigv4.canonical_query(params)
        signed.pop("host")  # urllib sets Host from the URL (same value)
        response = self._http.send(method, url, signed, body if method in ("PUT", "POST") else None)
        if response.status not in ok:
            raise error_for(response.status, response.body, f"{method} {key or self.location.bucket}")
        return response

    def create_bucket(self) -> None:
        """Create the bucket (tests, first deployment); an existing bucket of ours is fine."""
        body = b""
        if self.location.region != "us-east-1":
            body = (
                "<CreateBucketConfiguration><LocationConstraint>"
                f"{self.location.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        try:
            self._request("PUT", "", body=body)
        except BlobError as exc:
            if "BucketAlreadyOwnedByYou" not in exc.reason:
                raise

    # -- the BlobStore protocol -------------------------------------------------------------------

    def put(self, data: Payload, *, key: str | None = None) -> BlobInfo:
        if isinstance(data, bytes):
            digest = hashlib.sha256(data).hexdigest()
            key = check_key(key) if key is not None else content_key(digest)
            if len(data) > self.multipart_threshold:
                return self._multipart(key, _split(data, self.part_size))
            self._request("PUT", key, headers={"x-amz-meta-sha256": digest}, body=data)
            return BlobInfo(key, len(data), digest)
        if key is None:
            raise BlobError("a streamed put needs a key (its content address is known only after reading it)")
        first = data.read(self.multipart_threshold + 1)
        if len(first) <= self.multipart_threshold:
            return self.put(bytes(first), key=key)
        return self._multipart(check_key(key), _chain(first, data, self.part_size))

    def _multipart(self, key: str, parts: Iterator[bytes]) -> BlobInfo:
        """Create, upload every part (each signed over its own sha256), complete; abort on failure."""
        created = self._request("POST", key, params=[("uploads", "")], headers={"x-amz-meta-sha256": "pending"})
        match = _UPLOAD_ID.search(created.body)
        if match is None:
            raise BlobError(f"POST {key}?uploads: no UploadId in the response")
        upload_id = match.group(1).decode()
        digest, size, etags = hashlib.sha256(), 0, []
        try:
            for number, part in enumerate(parts, start=1):
                digest.update(part)
                size += len(part)
                params = [("partNumber", str(number)), ("uploadId", upload_id)]
                response = self._request("PUT", key, params=params, body=part)
                etags.append(response.headers.get("etag", ""))
            body = "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>" for n, etag in enumerate(etags, 1)
            )
            xml = f"<CompleteMultipartUpload>{body}</CompleteMultipartUpload>".encode()
            done = self._request("POST", key, params=[("uploadId", upload_id)], body=xml)
            if b"<Error>" in done.body:  # S3 may report a failed completion inside a 200
                raise error_for(500, done.body, f"POST {key}?uploadId")
        except BaseException:
            self._abort(key, upload_id)
            raise
        # the sha256 of a multipart object is known only now: record it on a tiny sidecar object
        info = BlobInfo(key, size, digest.hexdigest())
        self._request("PUT", _sidecar(key), body=info.sha256.encode("ascii"))
        return info

    def _abort(self, key: str, upload_id: str) -> None:
        # best effort: the bucket's lifecycle rule (docs/blobs.md) reaps abandoned uploads
        with contextlib.suppress(BlobError):
            self._request("DELETE", key, params=[("uploadId", upload_id)], ok=(200, 204))

    def get(self, key: str) -> bytes:
        return self._request("GET", check_key(key)).body

    def open_range(self, key: str, start: int, end: int | None = None) -> bytes:
        if end is not None and end <= start:
            return b""
        wanted = f"bytes={start}-" + ("" if end is None else str(end - 1))
        response = self._request("GET", check_key(key), headers={"range": wanted}, ok=(200, 206, 416))
        if response.status == 416:
            return b""
        return response.body if response.status == 206 else response.body[start:end]

    def head(self, key: str) -> BlobInfo:
        response = self._request("HEAD", check_key(key))
        size = int(response.headers.get("content-length", "0"))
        digest = response.headers.get("x-amz-meta-sha256", "")
        if digest == "pending":  # a multipart object: its digest is in the sidecar
            digest = self._request("GET", _sidecar(key), ok=(200, 404)).body.decode("ascii", "replace")
            digest = digest if re.fullmatch(r"[0-9a-f]{64}", digest) else ""
        return BlobInfo(key, size, digest)

    def delete(self, key: str) -> None:
        self._request("DELETE", check_key(key), ok=(200, 204, 404))
        self._request("DELETE", _sidecar(key), ok=(200, 204, 404))

    def presign_get(self, key: str, expires_s: int) -> str:
        return self._presign("GET", key, expires_s)

    def presign_put(self, key: str, expires_s: int) -> str:
        return self._presign("PUT", key, expires_s)

    def _presign(self, method: str, key: str, expires_s: int) -> str:
        scheme, host, path = self.location.host_and_path(check_key(key))
        try:
            return sigv4.presign_url(
                method, scheme, host, path, self._credentials, self.location.region, self._now(), expires_s
            )
        except ValueError as exc:
            raise BlobError(str(exc)) from exc


def _sidecar(key: str) -> str:
    return check_key(f"{key}.sha256")


def _split(data: bytes, part_size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for offset in range(0, len(data), part_size):
        yield bytes(view[offset : offset + part_size])


def _chain(first: bytes, rest: IO[bytes], part_size: int) -> Iterator[bytes]:
    """Parts of ``part_size`` from ``first`` followed by the rest of the stream."""
    buffer = bytearray(first)
    while True:
        while len(buffer) < part_size and (block := rest.read(part_size - len(buffer))):
            buffer += block
        if len(buffer) < part_size:
            if buffer:
                yield bytes(buffer)
            return
        yield bytes(buffer[:part_size])
        del buffer[:part_size]
