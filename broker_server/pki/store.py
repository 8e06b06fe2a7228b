"""The PKI state directory: the CA, every certificate it issued, revocations and the CRL.

Layout (``fedflock pki --dir DIR``; docs/security.md)::

    DIR/ca.key  ca.crt           the CA (key mode 0600)
    DIR/crl.pem                  revoked serials; Mosquitto ``crlfile``
    DIR/index.json               every issued certificate: serial, name, kind, expiry, revoked_at
    DIR/issued/<serial>.pem      a copy of every certificate issued (public)
    DIR/server/server.crt|key    the broker's (and the enrollment endpoint's) TLS certificate
    DIR/clients/<name>/          client certificates made here: <name>.crt, <name>.key, ca.crt
    DIR/tokens.json              enrollment tokens (only their SHA-256; ``tokens.py``)
    DIR/denied.txt               revoked names, one a line: the generated ACL denies them everything
    DIR/signing/<name>.key|.pub  Ed25519 release signing keys (``fedflock pki signing-key``; key 0600)

Every write is atomic (``files.atomic_write``) and read-modify-write of ``index.json`` happens
under an exclusive ``flock`` on ``DIR/.lock``, so the CLI and the enrollment server can run at
the same time. The clock is injected: tests issue already-expired certificates by going back.
"""

from __future__ import annotations

import datetime
import fcntl
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from broker_server.pki import certs
from broker_server.pki.crl_renewal import CRL_RENEW_BEFORE_DAYS, renewal_reason
from broker_server.pki.tokens import TokenBook
from edge_agent.errors import ConfigError, StorageError
from edge_agent.files import atomic_write

__all__ = ["CRL_DAYS", "CertRecord", "ClientFiles", "PkiStore", "utc_now"]

CRL_DAYS = 30
INDEX_VERSION = 1
Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True, kw_only=True)
class CertRecord:
    serial: str  # hex
    name: str  # the CN: a device id, a service user or the server's first host
    kind: str  # "device", "service" or "server"
    not_after: str  # ISO 8601, UTC
    revoked_at: str | None = None


@dataclass(frozen=True, kw_only=True)
class ClientFiles:
    cert: Path
    key: Path
    ca: Path
    record: CertRecord


class PkiStore:
    """The state directory ``root``; no I/O until a method is called."""

    def __init__(self, root: Path, *, clock: Clock = utc_now) -> None:
        self.root = root
        self._clock = clock

    ca_key = property(lambda self: self.root / "ca.key")
    ca_cert = property(lambda self: self.root / "ca.crt")
    crl = property(lambda self: self.root / "crl.pem")
    index = property(lambda self: self.root / "index.json")
    server_cert = property(lambda self: self.root / "server" / "server.crt")
    server_key = property(lambda self: self.root / "server" / "server.key")

    def client_dir(self, name: str) -> Path:
        return self.root / "clients" / name

    # -- the CA ------------------------------------------------------------------------------

    def init(self, common_name: str, days: int) -> None:
        """Make the CA and an empty CRL; :class:`ConfigError` if a CA is already there (never overwritten)."""
        _positive(days, "--days")
        with self._locked():
            for path in (self.ca_key, self.ca_cert):
                if path.exists():
                    raise ConfigError(f"a CA already exists at {path}; refusing to overwrite it (use another --dir)")
            key = certs.new_key()
            cert = certs.ca_certificate(key, common_name, self._clock(), days)
            atomic_write(self.ca_key, certs.key_pem(key), 0o600)
            atomic_write(self.ca_cert, certs.cert_pem(cert))
            self._write_index([])
            self._write_crl(certs.CertificateAuthority(key=key, cert=cert), [], CRL_DAYS)

    def authority(self) -> certs.CertificateAuthority:
        try:
            key, cert = self.ca_key.read_bytes(), self.ca_cert.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"no CA in {self.root}: run `fedflock pki init --dir {self.root}` first") from None
        except OSError as exc:
            raise StorageError(f"cannot read the CA in {self.root}: {exc.strerror or exc}") from exc
        return certs.load_ca(key, cert)

    # -- issuing -----------------------------------------------------------------------------

    def issue_server(self, hosts: list[str], days: int) -> CertRecord:
        """The broker's TLS certificate (and key) in ``server/``; replaces an earlier one."""
        _positive(days, "--days")
        ca, key, now = self.authority(), certs.new_key(), self._clock()
        cert = certs.server_certificate(ca, key.public_key(), hosts, now, days)
        with self._locked():
            atomic_write(self.server_key, certs.key_pem(key), 0o600)
            atomic_write(self.server_cert, certs.cert_pem(cert))
            return self._record(cert, hosts[0], "server")

    def issue_client(self, name: str, days: int, *, kind: str) -> ClientFiles:
        """A client certificate and key made here, in ``clients/<name>/`` (the key never leaves this host
        unless you copy it; enrollment, :meth:`sign_csr`, keeps keys on the device)."""
        _positive(days, "--days")
        key = certs.new_key()
        cert = self._sign(name, key.public_key(), days)
        folder = self.client_dir(name)
        with self._locked():
            atomic_write(folder / f"{name}.key", certs.key_pem(key), 0o600)
            atomic_write(folder / f"{name}.crt", certs.cert_pem(cert))
            atomic_write(folder / "ca.crt", self.ca_cert.read_bytes())
            record = self._record(cert, name, kind)
        return ClientFiles(cert=folder / f"{name}.crt", key=folder / f"{name}.key", ca=folder / "ca.crt", record=record)

    def sign_csr(self, name: str, csr_pem: bytes, days: int) -> bytes:
        """Sign a device's CSR with CN forced to ``name`` (the CSR's own subject is ignored); the PEM."""
        _positive(days, "--days")
        cert = self._sign(name, certs.load_csr(csr_pem), days)
        with self._locked():
            self._record(cert, name, "device")
        return certs.cert_pem(cert)

    def _sign(self, name: str, public_key: certs.PublicKey, days: int) -> x509.Certificate:
        now = self._clock()
        return certs.client_certificate(
            self.authority(), public_key, name, now=now, not_after=now + datetime.timedelta(days=days)
        )

    def _record(self, cert: x509.Certificate, name: str, kind: str) -> CertRecord:
        record = CertRecord(
            serial=f"{cert.serial_number:x}", name=name, kind=kind, not_after=cert.not_valid_after_utc.isoformat()
        )
        atomic_write(self.root / "issued" / f"{record.serial}.pem", certs.cert_pem(cert))
        self._write_index([*self.records(), record])
        if kind != "server":
            self._set_denied(name, False)
        return record

    # -- enrollment --------------------------------------------------------------------------

    def tokens(self) -> TokenBook:
        return TokenBook(self.root / "tokens.json", self._clock)

    def issue_token(self, device_id: str, ttl_s: int) -> str:
        with self._locked():
            return self.tokens().issue(device_id, ttl_s)

    def redeem_token(self, token: str) -> str:
        """The device id ``token`` enrolls, marking it used; :class:`TokenRefused` if it cannot be used."""
        with self._locked():
            return self.tokens().redeem(token)

    def enroll_csr(self, token: str, csr_pem: bytes, days: int) -> tuple[str, bytes]:
        """Redeem ``token`` and sign the CSR for its device: ``(device_id, certificate PEM)``.

        The CSR is checked first, so a malformed one does not burn the token.
        """
        certs.load_csr(csr_pem)
        device_id = self.redeem_token(token)
        return device_id, self.sign_csr(device_id, csr_pem, days)

    # -- revocation --------------------------------------------------------------------------

    def revoke(self, name: str, crl_days: int = CRL_DAYS) -> list[CertRecord]:
        """Revoke every unrevoked certificate issued to ``name``, rewrite the CRL and deny ``name`` in
        the ACL (:meth:`denied`); the records revoked (none if it had only a password entry)."""
        with self._locked():
            records = self.records()
            stamp = self._clock().isoformat()
            revoked = []
            for index, record in enumerate(records):
                if record.name == name and record.kind != "server" and record.revoked_at is None:
                    records[index] = replace(record, revoked_at=stamp)
                    revoked.append(records[index])
            self._write_index(records)
            self._write_crl(self.authority(), records, crl_days)
            self._set_denied(name, True)
        return revoked

    def known(self, name: str) -> bool:
        """Whether a client certificate was ever issued to ``name``."""
        return any(r.name == name and r.kind != "server" for r in self.records())

    def denied(self) -> list[str]:
        """Revoked names that were not issued new credentials since (the ACL denies them ``#``)."""
        try:
            return [line for line in self._denied_path.read_text(encoding="utf-8").splitlines() if line]
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"cannot read {self._denied_path}: {exc}") from exc

    def set_denied(self, name: str, denied: bool) -> None:
        with self._locked():
            self._set_denied(name, denied)

    @property
    def _denied_path(self) -> Path:
        return self.root / "denied.txt"

    def _set_denied(self, name: str, denied: bool) -> None:
        names = [n for n in self.denied() if n != name] + ([name] if denied else [])
        atomic_write(self._denied_path, "".join(f"{n}\n" for n in sorted(names)).encode())

    def write_crl(self, days: int = CRL_DAYS) -> None:
        """Re-sign the CRL (OpenSSL refuses all clients once its next-update time has passed)."""
        _positive(days, "--days")
        with self._locked():
            self._write_crl(self.authority(), self.records(), days)

    def renew_crl(self, days: int = CRL_DAYS, renew_before_days: int = CRL_RENEW_BEFORE_DAYS) -> str | None:
        """Re-sign the CRL (valid ``days``) only if it is due (:func:`~.crl_renewal.renewal_reason`,
        e.g. its next update is at most ``renew_before_days`` away); returns why it was, or None
        when nothing was written. Decided and written under the directory lock, atomically."""
        _positive(days, "--days")
        _positive(renew_before_days, "--renew-before")
        if renew_before_days >= days:  # a fresh CRL would be due at once: every run would re-sign
            raise ConfigError(f"--renew-before ({renew_before_days}) must be less than --days ({days})")
        with self._locked():
            ca, records = self.authority(), self.records()
            try:
                current: bytes | None = self.crl.read_bytes()
            except FileNotFoundError:
                current = None
            except OSError as exc:
                raise StorageError(f"cannot read {self.crl}: {exc.strerror or exc}") from exc
            revoked = {int(r.serial, 16) for r in records if r.revoked_at is not None}
            window = datetime.timedelta(days=renew_before_days)
            reason = renewal_reason(current, ca, revoked, self._clock(), window)
            if reason is not None:
                self._write_crl(ca, records, days)
            return reason

    def _write_crl(self, ca: certs.CertificateAuthority, records: list[CertRecord], days: int) -> None:
        revoked = [
            certs.RevokedEntry(serial=int(r.serial, 16), revoked_at=datetime.datetime.fromisoformat(r.revoked_at))
            for r in records
            if r.revoked_at is not None
        ]
        crl = certs.build_crl(ca, revoked, self._clock(), days)
        atomic_write(self.crl, crl.public_bytes(certs.serialization.Encoding.PEM))

    # -- the index ---------------------------------------------------------------------------

    def records(self) -> list[CertRecord]:
        try:
            data: Any = json.loads(self.index.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no CA in {self.root}: run `fedflock pki init --dir {self.root}` first") from None
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {self.index}: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
            raise StorageError(f"{self.index}: not a fedflock PKI index (version {INDEX_VERSION})")
        try:
            return [CertRecord(**entry) for entry in data["certificates"]]
        except (KeyError, TypeError) as exc:
            raise StorageError(f"{self.index}: malformed entry: {exc}") from exc

    def _write_index(self, records: list[CertRecord]) -> None:
        body = {"version": INDEX_VERSION, "certificates": [asdict(r) for r in records]}
        atomic_write(self.index, (json.dumps(body, indent=1) + "\n").encode())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = (self.root / ".lock").open("a")
        except OSError as exc:
            raise StorageError(f"cannot use PKI directory {self.root}: {exc.strerror or exc}") from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _positive(value: int, name: str) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
