"""AWS Signature Version 4, from the specification, for S3-compatible stores (stdlib only).

Pure functions, no I/O: the caller passes the time. Two forms:

* :func:`sign_headers` — the ``Authorization`` header form used by the server's own requests
  (payload hash = sha256 of the body, sent as ``x-amz-content-sha256``);
* :func:`presign_url` — the query-string form handed to devices: ``X-Amz-*`` parameters, payload
  ``UNSIGNED-PAYLOAD``, only ``host`` signed, so a device needs nothing but an HTTP client.

Steps (AWS "Signature Version 4 signing process"): canonical request
(method, URI-encoded path, sorted encoded query, lower-cased trimmed headers, signed header list,
payload hash) -> string to sign (``AWS4-HMAC-SHA256``, timestamp, scope
``date/region/service/aws4_request``, sha256 of the canonical request) -> signing key
(HMAC chain over date, region, service, ``aws4_request`` seeded with ``"AWS4" + secret``) ->
hex HMAC of the string to sign. Verified against the examples in the S3 SigV4 documentation
(tests/edge_agent/blobs/test_sigv4.py) and, in the dev tests, against botocore's signer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import quote

__all__ = [
    "ALGORITHM",
    "EMPTY_SHA256",
    "UNSIGNED_PAYLOAD",
    "Credentials",
    "amz_date",
    "canonical_query",
    "canonical_request",
    "presign_url",
    "sign_headers",
    "signature",
    "signing_key",
    "string_to_sign",
    "uri_encode",
]

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
#: S3's longest presigned URL lifetime (7 days)
MAX_PRESIGN_S = 7 * 24 * 3600
_SPACES = re.compile(r" +")


@dataclass(frozen=True)
class Credentials:
    """An access key pair (and optional STS session token); the secret never appears in repr."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str = field(default="", repr=False)


def uri_encode(value: str, *, keep_slash: bool = False) -> str:
    """RFC 3986 percent-encoding of everything but ``A-Za-z0-9-_.~`` (and ``/`` in paths)."""
    return quote(value, safe="/~" if keep_slash else "~")


def amz_date(now: datetime) -> str:
    """``YYYYMMDDTHHMMSSZ`` in UTC (a naive datetime is taken as UTC)."""
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def canonical_query(params: Sequence[tuple[str, str]]) -> str:
    """Encoded ``name=value`` pairs sorted by encoded name then value, joined by ``&``."""
    encoded = sorted((uri_encode(k), uri_encode(v)) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    cleaned = {name.lower().strip(): _SPACES.sub(" ", value.strip()) for name, value in headers.items()}
    names = sorted(cleaned)
    return "".join(f"{n}:{cleaned[n]}\n" for n in names), ";".join(names)


def canonical_request(
    method: str, path: str, params: Sequence[tuple[str, str]], headers: Mapping[str, str], payload_hash: str
) -> tuple[str, str]:
    """(canonical request, signed headers). ``path`` is the raw (unencoded) path; every header is signed."""
    canonical, signed = _canonical_headers(headers)
    uri = uri_encode(path or "/", keep_slash=True)
    text = "\n".join((method.upper(), uri, canonical_query(params), canonical, signed, payload_hash))
    return text, signed


def _scope(stamp: str, region: str, service: str) -> str:
    return f"{stamp[:8]}/{region}/{service}/aws4_request"


def string_to_sign(stamp: str, scope: str, canonical: str) -> str:
    return "\n".join((ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()))


def signing_key(secret_key: str, day: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def signature(secret_key: str, stamp: str, region: str, service: str, to_sign: str) -> str:
    key = signing_key(secret_key, stamp[:8], region, service)
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_headers(
    method: str,
    host: str,
    path: str,
    params: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    payload_hash: str,
    credentials: Credentials,
    region: str,
    now: datetime,
    service: str = "s3",
) -> dict[str, str]:
    """The request's headers plus ``host``, ``x-amz-date``, ``x-amz-content-sha256``, the session
    token if any, and ``Authorization``. Every header given is signed."""
    stamp = amz_date(now)
    signed_headers = {"host": host, "x-amz-date": stamp, "x-amz-content-sha256": payload_hash}
    if credentials.session_token:
        signed_headers["x-amz-security-token"] = credentials.session_token
    signed_headers |= {k.lower(): v for k, v in headers.items()}
    canonical, names = canonical_request(method, path, params, signed_headers, payload_hash)
    scope = _scope(stamp, region, service)
    sig = signature(credentials.secret_key, stamp, region, service, string_to_sign(stamp, scope, canonical))
    auth = f"{ALGORITHM} Credential={credentials.access_key}/{scope}, SignedHeaders={names}, Signature={sig}"
    return signed_headers | {"authorization": auth}


def presign_url(
    method: str,
    scheme: str,
    host: str,
    path: str,
    credentials: Credentials,
    region: str,
    now: datetime,
    expires_s: int,
    params: Sequence[tuple[str, str]] = (),
    service: str = "s3",
) -> str:
    """A presigned URL (query-string auth) valid for ``expires_s`` seconds (1..7 days) from ``now``."""
    if not 1 <= expires_s <= MAX_PRESIGN_S:
        raise ValueError(f"presigned URL lifetime {expires_s}s outside 1..{MAX_PRESIGN_S}")
    stamp = amz_date(now)
    scope = _scope(stamp, region, service)
    query = [
        *params,
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{credentials.access_key}/{scope}"),
        ("X-Amz-Date", stamp),
        ("X-Amz-Expires", str(expires_s)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if credentials.session_token:
        query.append(("X-Amz-Security-Token", credentials.session_token))
    canonical, _ = canonical_request(method, path, query, {"host": host}, UNSIGNED_PAYLOAD)
    sig = signature(credentials.secret_key, stamp, region, service, string_to_sign(stamp, scope, canonical))
    encoded_path = uri_encode(path or "/", keep_slash=True)
    return f"{scheme}://{host}{encoded_path}?{canonical_query(query)}&X-Amz-Signature={sig}"
