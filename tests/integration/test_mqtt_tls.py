"""``MqttTransport`` over TLS against real Mosquitto brokers: server verification, mutual TLS, password files.

A throwaway PKI is generated once per session with ``cryptography`` (EC P-256, fast): a CA, a
server certificate for 127.0.0.1/localhost, a client certificate, an expired client certificate,
a server certificate for another host name, and a second, unrelated CA. Three brokers:

* ``tls_broker``: TLS, server certificate only; clients log in with a password (``password_file``).
* ``mtls_broker``: TLS with ``require_certificate`` and ``use_identity_as_username``.
* ``misnamed_broker``: TLS with a valid certificate issued for another host name.

Refusals must arrive promptly, not as a CONNACK timeout: every client here has a generous
``connect_timeout`` and the tests assert they failed well within it.
"""

from __future__ import annotations

import datetime
import ipaddress
import queue
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker_server.mosquitto_process import MosquittoProcess, MosquittoTls, free_port
from edge_agent.errors import ConfigError, TransportError
from edge_agent.transport import tls as tls_module
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, TlsConfig

pytestmark = pytest.mark.timeout(60)

CONNECT_TIMEOUT = 10.0
PROMPT_S = 3.0  # a refusal must arrive this fast: well before CONNECT_TIMEOUT
USER, SECRET = "dev-pw", "correct horse battery staple"
CLIENT_CN = "dev-tls-1"


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _issue(
    cn: str,
    issuer: _Issued | None,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
    days: tuple[int, int] = (-1, 30),
) -> _Issued:
    """A certificate for ``cn`` signed by ``issuer`` (self-signed if ``None``), valid for the ``days`` window."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    bits = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False)
    bits |= {"key_cert_sign": ca, "crl_sign": ca, "digital_signature": not ca, "encipher_only": False}
    builder = builder.add_extension(x509.KeyUsage(**bits, decipher_only=False), critical=True)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return _Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def _write(directory: Path, stem: str, issued: _Issued, password: bytes | None = None) -> None:
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    key.write_bytes(issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    key.chmod(0o600)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding ``<name>.crt`` and ``<name>.key`` for every certificate below."""
    out = tmp_path_factory.mktemp("pki")
    ca = _issue("fedflock test CA", None, ca=True)
    other_ca = _issue("unrelated CA", None, ca=True)
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _issue("localhost", ca, san=local, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    misnamed = _issue("broker.invalid", ca, san=[x509.DNSName("broker.invalid")], usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _issue(CLIENT_CN, ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    expired = _issue("dev-expired", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH, days=(-30, -1))
    stranger = _issue("dev-stranger", other_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    issued = {"ca": ca, "other-ca": other_ca, "server": server, "misnamed": misnamed, "client": client}
    for stem, cert in {**issued, "expired": expired, "stranger": stranger}.items():
        _write(out, stem, cert)
    _write(out, "encrypted", client, password=b"sesame")
    return out


def _password_file(path: Path, secret: str, mode: int = 0o600) -> Path:
    path.write_text(secret + "\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def tls_broker(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    work = tmp_path_factory.mktemp("mosquitto-tls")
    passwords = work / "passwords"
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([tool, "-b", "-c", str(passwords), USER, SECRET], check=True, capture_output=True)
    passwords.chmod(0o600)
    tls = MosquittoTls(cafile=pki / "ca.crt", certfile=pki / "server.crt", keyfile=pki / "server.key")
    with MosquittoProcess(work, allow_anonymous=False, extra_config=(f"password_file {passwords}",), tls=tls) as broker:
        yield broker


@pytest.fixture(scope="module")
def mtls_broker(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    tls = MosquittoTls(
        cafile=pki / "ca.crt",
        certfile=pki / "server.crt",
        keyfile=pki / "server.key",
        require_certificate=True,
        use_identity_as_username=True,
    )
    with MosquittoProcess(tmp_path_factory.mktemp("mosquitto-mtls"), allow_anonymous=False, tls=tls) as broker:
        yield broker


@pytest.fixture(scope="module")
def misnamed_broker(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    tls = MosquittoTls(cafile=pki / "ca.crt", certfile=pki / "misnamed.crt", keyfile=pki / "misnamed.key")
    with MosquittoProcess(tmp_path_factory.mktemp("mosquitto-misnamed"), tls=tls) as broker:
        yield broker


@pytest.fixture
def opened() -> Iterator[list[MqttTransport]]:
    transports: list[MqttTransport] = []
    yield transports
    for transport in transports:
        transport.close()


def _transport(url: str, opened: list[MqttTransport], tls: TlsConfig | None, **fields: Any) -> MqttTransport:
    fields.setdefault("client_id", f"tls-{uuid.uuid4().hex[:8]}")
    config = MqttConfig.from_url(url, tls=tls, connect_timeout=CONNECT_TIMEOUT, publish_timeout=5.0, **fields)
    transport = MqttTransport(config)
    opened.append(transport)
    return transport


def _refusal(transport: MqttTransport) -> str:
    """Start ``transport``, expecting a prompt TransportError; its message."""
    began = time.monotonic()
    with pytest.raises(TransportError) as caught:
        transport.start()
    assert time.monotonic() - began < PROMPT_S, f"refusal took a CONNACK timeout: {caught.value}"
    assert not transport.is_connected()
    return str(caught.value)


def _round_trip(sender: MqttTransport, receiver: MqttTransport) -> None:
    topic = f"tls-test/{uuid.uuid4().hex}"
    receiver.subscribe(topic, qos=1)
    sender.publish(topic, b"over tls", qos=1)
    message = receiver.receive(timeout=5.0)
    assert message is not None and (message.topic, message.payload) == (topic, b"over tls")


# -- server verification ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])  # "auto" also runs the MQTT 5 probe over TLS
def test_round_trip_over_tls_with_a_password_file(
    protocol: str, pki: Path, tls_broker: MosquittoProcess, opened: list[MqttTransport], tmp_path: Path
) -> None:
    assert tls_broker.url.startswith("mqtts://")
    secret = _password_file(tmp_path / "secret", SECRET)
    tls = TlsConfig(ca_file=pki / "ca.crt")
    a, b = (
        _transport(tls_broker.url, opened, tls, protocol=protocol, username=USER, password_file=secret) for _ in "ab"
    )
    a.start()
    b.start()
    assert a.protocol_in_use == ("5" if protocol == "auto" else "3.1.1")
    _round_trip(a, b)


def test_a_ca_that_did_not_sign_the_broker_certificate_is_refused(
    pki: Path, tls_broker: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    transport = _transport(
        tls_broker.url, opened, TlsConfig(ca_file=pki / "other-ca.crt"), username=USER, password=SECRET
    )
    reason = _refusal(transport)
    assert f"TLS handshake with 127.0.0.1:{tls_broker.port} failed: certificate verify failed" in reason
    # Mosquitto sends its CA along with its certificate, so OpenSSL meets a CA it does not trust
    assert "self-signed certificate in certificate chain" in reason or "unable to get local issuer" in reason


def test_mqtts_url_without_tls_config_verifies_against_the_system_ca_store(
    tls_broker: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    transport = _transport(tls_broker.url, opened, None, username=USER, password=SECRET)
    assert transport.config.tls == TlsConfig()
    assert "certificate verify failed" in _refusal(transport)  # our private CA is not in the system store


@pytest.mark.parametrize(
    ("host", "expected"), [("127.0.0.1", "IP address mismatch"), ("localhost", "Hostname mismatch")]
)
def test_a_certificate_for_another_host_name_is_refused(
    host: str, expected: str, pki: Path, misnamed_broker: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    transport = _transport(f"mqtts://{host}:{misnamed_broker.port}", opened, TlsConfig(ca_file=pki / "ca.crt"))
    reason = _refusal(transport)
    assert f"certificate verify failed: {expected}, certificate is not valid for '{host}'" in reason


# -- passwords -------------------------------------------------------------------------------


def test_a_wrong_password_from_the_password_file_is_refused(
    pki: Path, tls_broker: MosquittoProcess, opened: list[MqttTransport], tmp_path: Path
) -> None:
    wrong = _password_file(tmp_path / "wrong", "not the secret")
    transport = _transport(
        tls_broker.url, opened, TlsConfig(ca_file=pki / "ca.crt"), username=USER, password_file=wrong
    )
    reason = _refusal(transport)
    assert reason.startswith(f"{tls_broker.url} refused the connection:")
    assert "Bad user name or password" in reason or "Not authorized" in reason


# -- mutual TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["auto", "5"])  # the probe and the real connection see the refusal differently
def test_mutual_tls_accepts_a_client_certificate_and_refuses_none_an_expired_or_a_foreign_one(
    protocol: str, pki: Path, mtls_broker: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    with_cert = TlsConfig(ca_file=pki / "ca.crt", cert_file=pki / "client.crt", key_file=pki / "client.key")
    a, b = (_transport(mtls_broker.url, opened, with_cert, protocol=protocol) for _ in "ab")
    a.start()
    b.start()
    _round_trip(a, b)

    without = _refusal(_transport(mtls_broker.url, opened, TlsConfig(ca_file=pki / "ca.crt"), protocol=protocol))
    assert f"TLS handshake with 127.0.0.1:{mtls_broker.port} failed: the broker refused the session" in without
    assert "certificate required" in without

    expired = TlsConfig(ca_file=pki / "ca.crt", cert_file=pki / "expired.crt", key_file=pki / "expired.key")
    assert "certificate expired" in _refusal(_transport(mtls_broker.url, opened, expired, protocol=protocol))

    foreign = TlsConfig(ca_file=pki / "ca.crt", cert_file=pki / "stranger.crt", key_file=pki / "stranger.key")
    assert "unknown ca" in _refusal(_transport(mtls_broker.url, opened, foreign, protocol=protocol))


class SlowLink:
    """A TCP relay to ``127.0.0.1:port`` that delivers what the broker sends ``delay`` seconds late.

    Everything is read at once and only its delivery is delayed, so a TCP reset from the broker
    cannot discard data it sent before (which is what a slow mobile link looks like to the client).
    """

    def __init__(self, port: int, delay: float) -> None:
        self._target, self._delay = port, delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self._target))
            for src, dst, delay in ((client, upstream, 0.0), (upstream, client, self._delay)):
                late: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(src, late, delay), daemon=True).start()
                threading.Thread(target=self._deliver, args=(late, dst), daemon=True).start()

    def _read(self, src: socket.socket, late: queue.Queue[tuple[float, bytes]], delay: float) -> None:
        data = b"-"
        while data:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            late.put((time.monotonic() + delay, data))

    def _deliver(self, late: queue.Queue[tuple[float, bytes]], dst: socket.socket) -> None:
        data = b"-"
        while data:
            due, data = late.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                dst.sendall(data) if data else dst.close()
            except OSError:
                return


@pytest.mark.parametrize("protocol", ["auto", "5"])
def test_a_refusal_arriving_after_the_verdict_wait_still_fails_start_promptly(
    protocol: str,
    pki: Path,
    mtls_broker: MosquittoProcess,
    opened: list[MqttTransport],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a slow link the broker's alert comes after CONNECT went out and is read on paho's thread."""
    monkeypatch.setattr(tls_module, "VERDICT_WAIT_S", 0.05)
    link = SlowLink(mtls_broker.port, delay=0.3)
    try:
        transport = _transport(
            f"mqtts://127.0.0.1:{link.port}", opened, TlsConfig(ca_file=pki / "ca.crt"), protocol=protocol
        )
        reason = _refusal(transport)
    finally:
        link.close()
    assert "the broker refused the session: tlsv13 alert certificate required" in reason


def test_the_broker_knows_the_device_by_its_certificate(
    pki: Path, mtls_broker: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    """``use_identity_as_username``: the broker logs the certificate's Common Name as the username."""
    tls = TlsConfig(ca_file=pki / "ca.crt", cert_file=pki / "client.crt", key_file=pki / "client.key")
    client_id = f"mtls-{uuid.uuid4().hex[:8]}"
    _transport(mtls_broker.url, opened, tls, client_id=client_id).start()
    deadline = time.monotonic() + 5.0
    while f"u'{CLIENT_CN}'" not in mtls_broker.read_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(client_id in line and f"u'{CLIENT_CN}'" in line for line in mtls_broker.read_log().splitlines())


# -- unusable files: ConfigError from start(), before any connection attempt ------------------


def _start_offline(**fields: Any) -> ConfigError:
    """Start against a port nobody listens on: a ConfigError proves the files were checked first."""
    config = MqttConfig(host="127.0.0.1", port=free_port(), client_id="offline", **fields)
    with pytest.raises(ConfigError) as caught:
        MqttTransport(config).start()
    return caught.value


def test_missing_or_unusable_files_are_config_errors_naming_the_file(pki: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls": TlsConfig(ca_file=missing)}, f"cannot read tls ca_file {missing}"),
        ({"tls": TlsConfig(ca_file=not_pem)}, f"tls ca_file {not_pem} holds no usable CA certificate"),
        ({"tls": TlsConfig(cert_file=missing, key_file=pki / "client.key")}, f"cannot read tls cert_file {missing}"),
        ({"tls": TlsConfig(cert_file=pki / "client.crt", key_file=missing)}, f"cannot read tls key_file {missing}"),
        ({"tls": TlsConfig(cert_file=pki / "client.crt", key_file=pki / "server.key")}, str(pki / "server.key")),
        ({"tls": TlsConfig(cert_file=pki / "client.crt", key_file=pki / "encrypted.key")}, "is encrypted"),
        ({"username": "u", "password_file": missing}, f"cannot read mqtt password_file {missing}"),
    ]
    for fields, expected in cases:
        error = _start_offline(**fields)
        assert expected in str(error), (fields, error)
