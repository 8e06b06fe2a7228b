"""TLS and credential files of the MQTT transport, kept free of paho.

* :class:`TlsConfig` says which files to trust and present; constructing it reads nothing.
* :func:`build_context` reads them (from ``MqttTransport.start()``) into a :class:`TlsContext`:
  TLS 1.2 or newer, the broker's certificate and host name always verified. Verification can
  not be turned off on purpose: a device that trusts any broker hands its model updates (and
  its password) to whoever answers.
* :func:`read_password_file` reads ``MqttConfig.password_file`` so config files never hold the
  secret itself; :class:`Secrets` holds what ``start()`` read.
* :func:`describe_connect_error` and :func:`describe_tls_refusal` turn ssl errors into reasons a
  person can act on.

Client certificates and TLS 1.3: the client finishes its handshake before the broker has checked
the client certificate, so a broker that refuses it (missing, expired, unknown CA) answers with an
alert after the handshake. Sent straight away, paho's CONNECT races that alert: on a fast link the
broker has already closed the socket, our CONNECT earns a TCP reset, and the reset discards the
unread alert, leaving only "EOF occurred in violation of protocol". So the sockets of a
:class:`TlsContext` wait up to :data:`VERDICT_WAIT_S` after a TLS 1.3 handshake for the broker's
first records: its session tickets (accepted; OpenSSL-based brokers such as Mosquitto send them
at once) or its alert, which then fails the handshake itself. A broker that sends no tickets
costs that wait on every connect. An alert that still arrives later, on paho's network thread
(paho only logs it and reports "connection lost"), is kept in :attr:`TlsContext.last_alert` so
``start()`` fails at once with the reason instead of waiting for a CONNACK that never comes.
"""

from __future__ import annotations

import logging
import select
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError

__all__ = [
    "MIN_TLS_VERSION",
    "VERDICT_WAIT_S",
    "Secrets",
    "TlsConfig",
    "TlsContext",
    "build_context",
    "describe_connect_error",
    "describe_tls_refusal",
    "read_password_file",
]

_log = logging.getLogger(__name__)

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
VERDICT_WAIT_S = 0.5
"""After a TLS 1.3 handshake: how long to wait for the broker's verdict on our client certificate."""


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """Certificates for an ``mqtts://`` connection; the files are read by ``MqttTransport.start()``.

    ``ca_file``: PEM bundle of the CAs that may sign the broker's certificate; ``None`` trusts the
    system's CA store. ``cert_file`` and ``key_file`` (both or neither, PEM, key not encrypted):
    the client certificate for brokers that require one (Mosquitto ``require_certificate true``).
    The broker's host name is always checked against its certificate.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                raise ConfigError(f"tls {name} must be a pathlib.Path, not {value!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("tls cert_file and key_file go together: give both (mutual TLS) or neither")


class TlsContext(ssl.SSLContext):
    """An :class:`ssl.SSLContext` whose sockets remember the last TLS alert the peer sent."""

    last_alert: ssl.SSLError | None = None
    """Set from paho's network thread; an alert means the broker ended the connection on purpose."""


class _RecordingSocket(ssl.SSLSocket):
    """Awaits the broker's verdict after a TLS 1.3 handshake and keeps TLS alerts on its
    :class:`TlsContext` (paho only logs them); every error is re-raised unchanged."""

    _early = b""  # application data read while awaiting the verdict (instances come from _create, not __init__)

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        if self.version() == "TLSv1.3":
            self._await_verdict()

    def _await_verdict(self) -> None:
        timeout = self.gettimeout()
        try:
            readable, _, _ = select.select([self], [], [], VERDICT_WAIT_S)
            if readable:
                self.setblocking(False)
                self._early = self.recv(1)  # processes tickets or raises the alert; MQTT brokers send no data yet
        except ssl.SSLWantReadError:
            pass  # only session tickets so far: accepted
        finally:
            self.settimeout(timeout)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self._early:
            data, self._early = self._early, b""
            return data
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            self._record(exc)
            raise

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except ssl.SSLError as exc:
            self._record(exc)
            raise

    def _record(self, exc: ssl.SSLError) -> None:
        context = self.context
        if isinstance(context, TlsContext) and "ALERT" in (getattr(exc, "reason", None) or ""):
            context.last_alert = exc


@dataclass(frozen=True, kw_only=True)
class Secrets:
    """What ``MqttTransport.start()`` read from the files its config names."""

    context: TlsContext | None = None
    password: str | None = None

    @classmethod
    def load(cls, tls: TlsConfig | None, *, password: str | None, password_file: Path | None) -> Secrets:
        """:class:`ConfigError` naming the file if a certificate, key or password file is unusable."""
        context = build_context(tls) if tls is not None else None
        return cls(context=context, password=password if password_file is None else read_password_file(password_file))

    def tls_refusal(self, host: str, port: int) -> str | None:
        """Why the broker ended our TLS session with an alert, if it did (see :class:`TlsContext`)."""
        alert = self.context.last_alert if self.context is not None else None
        return None if alert is None else describe_tls_refusal(host, port, alert)


def build_context(tls: TlsConfig) -> TlsContext:
    """Read ``tls``'s files into a client context; :class:`ConfigError` naming the file if one is unusable."""
    context = TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname are its defaults
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.minimum_version = MIN_TLS_VERSION
    context.sslsocket_class = _RecordingSocket
    if tls.ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _check_readable(tls.ca_file, "ca_file")
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except ssl.SSLError as exc:
            raise ConfigError(f"tls ca_file {tls.ca_file} holds no usable CA certificate: {_reason(exc)}") from exc
    if tls.cert_file is not None and tls.key_file is not None:
        _check_readable(tls.cert_file, "cert_file")
        _check_readable(tls.key_file, "key_file")
        try:  # the password callback stops OpenSSL from prompting on the terminal for an encrypted key
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=_no_key_password(tls.key_file))
        except ssl.SSLError as exc:
            raise ConfigError(
                f"tls cert_file {tls.cert_file} / key_file {tls.key_file}: not a PEM certificate and its "
                f"matching private key: {_reason(exc)}"
            ) from exc
    return context


def read_password_file(path: Path) -> str:
    """The password in ``path``: its content without the trailing newline; :class:`ConfigError` if unusable.

    A file that everyone on the machine may read is used, but logged as a warning.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read mqtt password_file {path}: {_os_reason(exc)}") from exc
    if mode & stat.S_IROTH:
        _log.warning("mqtt password_file %s is readable by every user; chmod 600 it", path)
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"mqtt password_file {path} is empty")
    return password


def describe_connect_error(host: str, port: int, url: str, exc: OSError | ValueError) -> str:
    """Why connecting to ``host:port`` raised ``exc``: TLS handshake failures get their verification reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake with {host}:{port} failed: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and "ALERT" in (getattr(exc, "reason", None) or ""):
        return describe_tls_refusal(host, port, exc)
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {host}:{port} failed: {_reason(exc)}"
    return f"cannot connect to {url}: {exc}"


def describe_tls_refusal(host: str, port: int, alert: ssl.SSLError) -> str:
    """Why the broker ended a TLS connection with ``alert`` before CONNACK (most often: our client certificate)."""
    return (
        f"TLS handshake with {host}:{port} failed: the broker refused the session: {_reason(alert)} "
        "(if it requires a client certificate: check tls cert_file/key_file)"
    )


def _check_readable(path: Path, name: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read tls {name} {path}: {_os_reason(exc)}") from exc


def _no_key_password(key_file: Path) -> Callable[[], bytes]:
    def refuse() -> bytes:
        raise ConfigError(
            f"tls key_file {key_file} is encrypted; fedflock needs an unencrypted key (protect it with chmod 600)"
        )

    return refuse


def _reason(exc: ssl.SSLError) -> str:
    """``"tlsv13 alert certificate required"`` rather than ``"[SSL: TLSV13_...] ... (_ssl.c:2580)"``."""
    reason = getattr(exc, "reason", None)
    return reason.lower().replace("_", " ") if reason else str(exc)


def _os_reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"not UTF-8 text ({exc.reason})"
