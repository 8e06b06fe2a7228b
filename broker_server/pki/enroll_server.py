"""The enrollment endpoint: HTTPS, one route, a one-time token exchanged for device credentials.

``POST /v1/enroll`` with a JSON body (at most 16 KiB)::

    {"token": "<one-time token>", "csr": "-----BEGIN CERTIFICATE REQUEST-----..."}
        -> 200 {"device_id", "certificate", "ca_certificate", "mqtt_url"?}
    {"token": "<one-time token>", "credential": "password"}   (only with a password file)
        -> 200 {"device_id", "username", "password", "ca_certificate", "mqtt_url"?}

Errors are JSON ``{"error": "..."}``: 400 (malformed request or CSR: the token is NOT used up),
403 (token unknown, used or expired: one message for all three), 404, 405, 411, 413, and 429
with ``Retry-After`` (seconds) when the client's or the endpoint's rate limit is reached
(:mod:`.rate_limit`: a token bucket per client address and a global one; a refused token costs
its client ``failure_cost`` requests; the request's token is not looked at, so it is not used up). The
certificate's CN is the token's device id whatever the CSR asks for; the private key never
leaves the device. A password is generated here, written (hashed) into Mosquitto's password file
and returned once. ``on_change`` runs after the password file changed (e.g. SIGHUP Mosquitto).

Standard library only (``http.server`` + ``ssl``) plus ``cryptography`` through ``PkiStore``.
TLS handshakes run on the request's thread, with a timeout, so a stalled client blocks no one.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from broker_server.pki.passwords import PasswordFile, new_password
from broker_server.pki.rate_limit import EnrollmentLimiter, RateLimits
from broker_server.pki.store import PkiStore
from broker_server.pki.tokens import TokenRefused
from edge_agent.errors import ConfigError, FedflockError, TransportError

__all__ = ["ENROLL_PATH", "EnrollmentConfig", "EnrollmentServer"]

log = logging.getLogger("broker_server.pki.enroll")

ENROLL_PATH = "/v1/enroll"
MAX_BODY = 16 * 1024


@dataclass(frozen=True, kw_only=True)
class EnrollmentConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    certfile: Path
    keyfile: Path
    cert_days: int = 365
    password_file: Path | None = None
    mqtt_url: str | None = None
    request_timeout_s: float = 10.0
    limits: RateLimits = field(default_factory=RateLimits)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--listen port {self.port}: not a TCP port")
        if self.cert_days < 1:
            raise ConfigError(f"--cert-days must be at least 1, got {self.cert_days}")


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class EnrollmentServer:
    """``start()`` binds and serves on a thread; ``close()`` stops. No I/O in the constructor.

    ``clock`` (monotonic seconds) drives the rate limits (``config.limits``).
    """

    def __init__(
        self,
        store: PkiStore,
        config: EnrollmentConfig,
        *,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._store, self.config = store, config
        self._on_change = on_change
        self.limiter = EnrollmentLimiter(config.limits, clock=clock)
        self._lock = threading.Lock()  # one password-file edit at a time in this process
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise TransportError("the enrollment server is not started")
        return f"https://{self.config.host}:{self._httpd.server_address[1]}{ENROLL_PATH}"

    def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(self.config.certfile), str(self.config.keyfile))
            httpd = ThreadingHTTPServer((self.config.host, self.config.port), _handler_class(self))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot serve enrollment on {self.config.host}:{self.config.port}: {exc}") from exc
        httpd.daemon_threads = True
        httpd.handle_error = _log_failed_connection  # type: ignore[method-assign]
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="fedflock-enroll", daemon=True)
        self._thread.start()
        log.info("enrollment endpoint at %s", self.url)

    def close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(5.0)

    def __enter__(self) -> EnrollmentServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one route -----------------------------------------------------------------------

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The 200 response for a decoded request body; :class:`_Refusal` for anything else."""
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise _Refusal(400, "the request needs a string 'token'")
        reply: dict[str, Any] = {"ca_certificate": self._store.ca_cert.read_text(encoding="ascii")}
        if self.config.mqtt_url is not None:
            reply["mqtt_url"] = self.config.mqtt_url
        if body.get("credential") == "password":
            return reply | self._password(token)
        csr = body.get("csr")
        if not isinstance(csr, str):
            raise _Refusal(400, 'the request needs a PEM \'csr\' (or "credential": "password")')
        try:
            device_id, cert = self._store.enroll_csr(token, csr.encode("ascii", "replace"), self.config.cert_days)
        except TokenRefused as exc:
            log.warning("enrollment refused: %s", exc.reason)
            raise _Refusal(403, "token refused: unknown, already used or expired") from exc
        except ConfigError as exc:
            raise _Refusal(400, exc.reason) from exc
        log.info("enrolled %s with a certificate", device_id)
        return reply | {"device_id": device_id, "certificate": cert.decode("ascii")}

    def _password(self, token: str) -> dict[str, Any]:
        if self.config.password_file is None:
            raise _Refusal(400, "this endpoint issues certificates only: send a 'csr'")
        try:
            device_id = self._store.redeem_token(token)
        except TokenRefused as exc:
            log.warning("enrollment refused: %s", exc.reason)
            raise _Refusal(403, "token refused: unknown, already used or expired") from exc
        password = new_password()
        with self._lock:
            PasswordFile(self.config.password_file).add(device_id, password, replace=True)
            self._store.set_denied(device_id, False)
        if self._on_change is not None:
            self._on_change()
        log.info("enrolled %s with a password", device_id)
        return {"device_id": device_id, "username": device_id, "password": password}


def _log_failed_connection(request: object, client_address: object) -> None:
    """A failed TLS handshake or a client that vanished: no traceback on stderr, one log line."""
    log.info("enrollment connection from %s failed", client_address)


def _handler_class(server: EnrollmentServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = server.config.request_timeout_s
        server_version = "fedflock-enroll"
        sys_version = ""

        def setup(self) -> None:
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
            super().setup()

        def do_POST(self) -> None:
            client = str(self.client_address[0])
            retry_after = server.limiter.admit(client)
            if retry_after is not None:
                self._drain()
                log.info("enrollment request from %s rate limited (retry after %d s)", client, retry_after)
                message = f"too many enrollment requests; retry after {retry_after} s"
                self._send(429, {"error": message}, {"Retry-After": str(retry_after)})
                return
            try:
                if self.path != ENROLL_PATH:
                    raise _Refusal(404, f"no such endpoint; POST {ENROLL_PATH}")
                self._send(200, server.answer(self._body()))
            except _Refusal as refusal:
                if refusal.status == 403:  # a refused token: its client pays more (guessing slows down)
                    server.limiter.failed(client)
                self._send(refusal.status, {"error": refusal.message})
            except FedflockError as exc:  # storage trouble: the operator must look, the device retries later
                log.error("enrollment failed: [%s] %s", exc.code, exc.reason)
                self._send(500, {"error": "enrollment failed on the server; try again later"})

        def do_GET(self) -> None:
            self._send(405, {"error": f"POST {ENROLL_PATH}"})

        def _body(self) -> dict[str, Any]:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise _Refusal(411, "Content-Length required")
            if int(length) > MAX_BODY:
                raise _Refusal(413, f"request larger than {MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(int(length)))
            except (ValueError, UnicodeDecodeError) as exc:
                raise _Refusal(400, f"the body is not JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise _Refusal(400, "the body must be a JSON object")
            return body

        def _drain(self) -> None:
            """Read a refused request's body (bounded): closing with unread bytes could reset the
            connection before the client reads the answer."""
            length = self.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) <= MAX_BODY:
                self.rfile.read(int(length))

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
