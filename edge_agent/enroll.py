"""``fedflock agent enroll``: exchange a one-time token for this device's MQTT credentials.

The device makes its own ECDSA P-256 key (written 0600 before anything is sent), sends only a
certificate signing request to the enrollment endpoint over HTTPS, verified against the CA file
the operator handed out with the token, and writes what comes back::

    OUT/device.key     the private key (0600; never leaves the device)
    OUT/device.crt     the certificate, CN = the device id
    OUT/ca.crt         the CA that signs the broker's certificate
    OUT/mqtt.toml      the [mqtt] lines for agent.toml (cert_file, key_file, ca_file, url)

Making a CSR needs the ``cryptography`` package (``pip install "fedflock[enroll]"``). A device
without it can enroll for a password instead (``credential="password"``): ``OUT/password``
(0600) and ``username``/``password_file`` lines. Standard library otherwise (urllib + ssl).

An endpoint that is rate limiting answers 429 with ``Retry-After`` without looking at the token;
the request is sent again after that many seconds (``busy_retries`` times, each wait at most
``max_retry_wait_s``), else :class:`TransportError` says when to try again. The same key and CSR
are sent each time.
"""

from __future__ import annotations

import json
import math
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_agent.errors import ConfigError, TransportError
from edge_agent.files import atomic_write
from edge_agent.protocol.topics import validate_device_id

__all__ = ["CREDENTIALS", "EnrollRequest", "EnrollResult", "enroll"]

CREDENTIALS = ("certificate", "password")
MAX_RESPONSE = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class EnrollRequest:
    url: str
    token: str
    ca_file: Path
    out_dir: Path
    credential: str = "certificate"
    expected_device_id: str | None = None
    timeout_s: float = 30.0
    #: requests sent again after a 429 answer (rate limited), each after its Retry-After
    busy_retries: int = 3
    #: a Retry-After longer than this is not waited for (the error says when to try again)
    max_retry_wait_s: float = 120.0

    def __post_init__(self) -> None:
        if urlsplit(self.url).scheme != "https":
            raise ConfigError(f"--url {self.url!r}: the enrollment endpoint must be https://")
        if not self.token.strip():
            raise ConfigError("--token: empty")
        if self.credential not in CREDENTIALS:
            raise ConfigError(f"--credential {self.credential!r}: choose one of {', '.join(CREDENTIALS)}")
        if self.expected_device_id is not None:
            validate_device_id(self.expected_device_id)
        if self.busy_retries < 0 or not self.max_retry_wait_s >= 0:
            raise ConfigError("busy_retries and max_retry_wait_s must be >= 0")


@dataclass(frozen=True, kw_only=True)
class EnrollResult:
    device_id: str
    mqtt_snippet: Path
    files: tuple[Path, ...]


def enroll(request: EnrollRequest, *, sleep: Callable[[float], None] = time.sleep) -> EnrollResult:
    """Enroll; :class:`ConfigError` (refused, bad input), :class:`TransportError` (unreachable, or
    still rate limited); ``sleep`` waits out a 429's Retry-After."""
    context = _context(request.ca_file)
    body: dict[str, Any] = {"token": request.token.strip()}
    key_path = request.out_dir / "device.key"
    if request.credential == "certificate":
        key_pem, csr_pem = _key_and_csr()
        atomic_write(key_path, key_pem, 0o600)
        body["csr"] = csr_pem.decode("ascii")
    else:
        body["credential"] = "password"
    reply = _post_until_admitted(request, body, context, sleep)
    device_id = _field(reply, "device_id")
    validate_device_id(device_id)
    if request.expected_device_id is not None and device_id != request.expected_device_id:
        raise ConfigError(f"the token enrolls {device_id!r}, not {request.expected_device_id!r}")
    ca_path = request.out_dir / "ca.crt"
    atomic_write(ca_path, _field(reply, "ca_certificate").encode("ascii"), 0o644)
    files: tuple[Path, ...]
    lines = ["# written by `fedflock agent enroll`: these keys belong in agent.toml's [mqtt] table", "[mqtt]"]
    if isinstance(reply.get("mqtt_url"), str):
        lines.append(f"url = {json.dumps(reply['mqtt_url'])}")
    lines.append(f"ca_file = {json.dumps(str(ca_path.resolve()))}")
    if request.credential == "certificate":
        cert_path = request.out_dir / "device.crt"
        atomic_write(cert_path, _field(reply, "certificate").encode("ascii"), 0o644)
        files = (key_path, cert_path, ca_path)
        lines += [
            f"cert_file = {json.dumps(str(cert_path.resolve()))}",
            f"key_file = {json.dumps(str(key_path.resolve()))}",
        ]
    else:
        password_path = request.out_dir / "password"
        atomic_write(password_path, (_field(reply, "password") + "\n").encode(), 0o600)
        files = (password_path, ca_path)
        lines += [f"username = {json.dumps(device_id)}", f"password_file = {json.dumps(str(password_path.resolve()))}"]
    snippet = request.out_dir / "mqtt.toml"
    atomic_write(snippet, ("\n".join(lines) + "\n").encode(), 0o644)
    return EnrollResult(device_id=device_id, mqtt_snippet=snippet, files=files)


def _key_and_csr() -> tuple[bytes, bytes]:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError as exc:
        raise ConfigError(
            "enrolling for a certificate needs the cryptography package: pip install 'fedflock[enroll]' "
            "(or enroll with --credential password)"
        ) from exc
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))  # the CA sets the name from the token
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _context(ca_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca-file {ca_file}: not a readable PEM CA certificate: {exc}") from exc
    return context


class _Busy(TransportError):
    """A 429 answer: try again after ``retry_after`` seconds (handled by :func:`_post_until_admitted`)."""

    def __init__(self, retry_after: float, text: str) -> None:
        super().__init__(text)
        self.retry_after = retry_after


def _post_until_admitted(
    request: EnrollRequest, body: dict[str, Any], context: ssl.SSLContext, sleep: Callable[[float], None]
) -> dict[str, Any]:
    retries = 0
    while True:
        try:
            return _post(request.url, body, context, request.timeout_s)
        except _Busy as busy:
            if retries >= request.busy_retries or busy.retry_after > request.max_retry_wait_s:
                raise TransportError(
                    f"the enrollment endpoint is rate limiting ({busy.reason}): try again in {busy.retry_after:g} s"
                ) from None
            retries += 1
            sleep(busy.retry_after)


def _post(url: str, body: dict[str, Any], context: ssl.SSLContext, timeout_s: float) -> dict[str, Any]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=timeout_s) as response:
            raw = response.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            raise _Busy(_retry_after(exc.headers.get("Retry-After")), _error_text(exc)) from exc
        raise ConfigError(f"enrollment refused ({exc.code}): {_error_text(exc)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransportError(f"cannot reach the enrollment endpoint {url}: {reason}") from exc
    if len(raw) > MAX_RESPONSE:
        raise TransportError(f"the enrollment endpoint {url} sent more than {MAX_RESPONSE} bytes")
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise TransportError(f"the enrollment endpoint {url} did not answer JSON: {exc}") from exc
    if not isinstance(reply, dict):
        raise TransportError(f"the enrollment endpoint {url} did not answer a JSON object")
    return reply


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds (RFC 9110 also allows an HTTP date: then, and when absent, 60 s)."""
    try:
        seconds = float(value) if value is not None else 60.0
    except ValueError:
        return 60.0
    return seconds if math.isfinite(seconds) and seconds >= 0 else 60.0


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read(MAX_RESPONSE))
    except (ValueError, OSError):
        return str(exc.reason)
    return str(body.get("error", exc.reason)) if isinstance(body, dict) else str(exc.reason)


def _field(reply: dict[str, Any], name: str) -> str:
    value = reply.get(name)
    if not isinstance(value, str) or not value:
        raise TransportError(f"the enrollment answer has no {name!r}")
    return value
