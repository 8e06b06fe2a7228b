"""Certificates, CSRs and CRLs as pure functions of keys, names and an injected ``now``.

Keys are ECDSA P-256: OpenSSL (and so Mosquitto), Python's ``ssl`` and every TLS stack on a
device accept them, and they are quick to make. Nothing here touches the disk; ``store.py``
decides where the PEM bytes go. ``cryptography``'s errors are translated into
:class:`~edge_agent.errors.ConfigError` at this boundary.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.errors import ConfigError

__all__ = [
    "CertificateAuthority",
    "RevokedEntry",
    "build_crl",
    "ca_certificate",
    "client_certificate",
    "key_pem",
    "load_csr",
    "new_key",
    "server_certificate",
]

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
MIN_RSA_BITS = 2048
_LEEWAY = datetime.timedelta(minutes=5)  # a device whose clock is a little behind still accepts a new cert


@dataclass(frozen=True)
class CertificateAuthority:
    key: PrivateKey
    cert: x509.Certificate


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime.datetime


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: Mosquitto and fedflock read unencrypted keys (protected by file mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(subject: str, issuer: x509.Name, public_key: PublicKey, now: datetime.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _LEEWAY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def ca_certificate(key: PrivateKey, common_name: str, now: datetime.datetime, days: int) -> x509.Certificate:
    """A self-signed CA certificate (path length 0: it signs only end-entity certificates)."""
    return (
        _builder(common_name, _name(common_name), key.public_key(), now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    ca: CertificateAuthority,
    subject: str,
    public_key: PublicKey,
    *,
    now: datetime.datetime,
    not_after: datetime.datetime,
    usage: x509.ObjectIdentifier,
    not_before: datetime.datetime | None = None,
) -> x509.CertificateBuilder:
    builder = _builder(subject, ca.cert.subject, public_key, now)
    if not_before is not None:
        builder = builder.not_valid_before(not_before)
    return (
        builder.not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )


def server_certificate(
    ca: CertificateAuthority, public_key: PublicKey, hosts: Sequence[str], now: datetime.datetime, days: int
) -> x509.Certificate:
    """A TLS server certificate for ``hosts`` (DNS names or IP addresses, all in the SAN; CN = the first)."""
    if not hosts:
        raise ConfigError("server-cert --host: give at least one host name or IP address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:@" for c in host):
                raise ConfigError(f"server-cert --host: {host!r} is neither a DNS name nor an IP address") from None
            names.append(x509.DNSName(host))
    builder = _leaf(
        ca,
        hosts[0],
        public_key,
        now=now,
        not_after=now + datetime.timedelta(days=days),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    return builder.add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca.key, hashes.SHA256())


def client_certificate(
    ca: CertificateAuthority,
    public_key: PublicKey,
    common_name: str,
    *,
    now: datetime.datetime,
    not_after: datetime.datetime,
    not_before: datetime.datetime | None = None,
) -> x509.Certificate:
    """A TLS client certificate whose CN is the MQTT username (Mosquitto ``use_identity_as_username``)."""
    builder = _leaf(
        ca,
        common_name,
        public_key,
        now=now,
        not_after=not_after,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=not_before,
    )
    return builder.sign(ca.key, hashes.SHA256())


def load_csr(pem: bytes) -> PublicKey:
    """The public key of a PEM certificate signing request whose self-signature is valid.

    Everything else in the CSR (subject, extensions) is ignored: the CA decides the name.
    """
    try:
        csr = x509.load_pem_x509_csr(pem)
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(f"not a PEM certificate signing request: {exc}") from exc
    if not valid:
        raise ConfigError("the certificate signing request's signature is invalid")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise ConfigError(f"unsupported curve {public_key.curve.name}: use P-256 or P-384")
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"RSA key of {public_key.key_size} bits: at least {MIN_RSA_BITS} needed")
        return public_key
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    raise ConfigError(f"unsupported key type {type(public_key).__name__}: use ECDSA P-256, Ed25519 or RSA")


def build_crl(
    ca: CertificateAuthority, revoked: Iterable[RevokedEntry], now: datetime.datetime, days: int
) -> x509.CertificateRevocationList:
    """The CA's CRL. OpenSSL refuses every client once ``next_update`` has passed: regenerate it in time."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - _LEEWAY)
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(entry.serial).revocation_date(entry.revoked_at).build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def load_ca(key_pem_bytes: bytes, cert_pem_bytes: bytes) -> CertificateAuthority:
    try:
        key = serialization.load_pem_private_key(key_pem_bytes, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem_bytes)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the CA key or certificate is unreadable: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an ECDSA key")
    return CertificateAuthority(key=key, cert=cert)
