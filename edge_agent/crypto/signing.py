"""Making Ed25519 keys and signatures, where ``cryptography`` is installed (export machine, server).

Devices never import this module: they only verify (:mod:`.trust`, pure Python). A private key is
a PKCS#8 PEM file written with mode 0600; its public key is a one-line text file of 64 hex digits
(what a device's ``[ota] trusted_keys`` takes). ``cryptography`` is imported on first use, so a
missing package is a :class:`ConfigError` that says what to install.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.crypto.trust import SIGNATURE_FILE, key_id
from edge_agent.errors import ConfigError, StorageError
from edge_agent.files import atomic_write
from edge_agent.protocol.manifest import MANIFEST_FILE, load_manifest
from edge_agent.protocol.model_messages import (
    ModelMessage,
    bundle_signature_line,
    bundle_signed_bytes,
    release_statement,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["SigningKey", "bundle_signer", "sign_bundle", "sign_release", "write_key_pair"]


def _ed25519() -> type[Ed25519PrivateKey]:
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError as exc:
        raise ConfigError("signing needs the 'cryptography' package (pip install 'fedflock[broker]')") from exc
    return Ed25519PrivateKey


@dataclass(frozen=True, eq=False)
class SigningKey:
    """An Ed25519 private key: :meth:`sign` bytes, :attr:`public_key` (32 raw bytes)."""

    _key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(_ed25519().generate())

    @classmethod
    def load(cls, path: Path, *, source: str = "signing key") -> SigningKey:
        """Read a PEM private key; refuses one that others may read (``ConfigError`` naming ``source``)."""
        private_class = _ed25519()
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"{source}: {path} is readable by others: chmod 600 it")
            key = load_pem_private_key(path.read_bytes(), password=None)
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read {path}: {exc.strerror or exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {path} is not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, private_class):
            raise ConfigError(f"{source}: {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @property
    def public_key(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        return self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def write_key_pair(key: SigningKey, private_path: Path, public_path: Path, *, overwrite: bool = False) -> None:
    """Write the private key (0600, created so from the start) and the public key (hex line, 0644)."""
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists: refusing to overwrite a key")
    atomic_write(private_path, key.private_pem(), 0o600)
    atomic_write(public_path, f"{key.public_key.hex()}\n".encode("ascii"), 0o644)


def bundle_signer(key: SigningKey) -> Callable[[bytes], bytes]:
    """manifest.json bytes -> the ``manifest.sig`` content (``model_export.export_bundle(signer=...)``)."""

    def sign(manifest: bytes) -> bytes:
        return bundle_signature_line(key.public_key, key.sign(bundle_signed_bytes(manifest)))

    return sign


def sign_bundle(directory: Path, key: SigningKey) -> Path:
    """Write ``directory/manifest.sig`` (atomically) after checking every file against the manifest."""
    load_manifest(directory, verify=True)  # never sign files that do not match their manifest
    try:
        manifest = (directory / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {directory / MANIFEST_FILE}: {exc.strerror or exc}") from exc
    path = directory / SIGNATURE_FILE
    atomic_write(path, bundle_signer(key)(manifest), 0o644)
    return path


def sign_release(model: ModelMessage, key: SigningKey, *, issued_at: int, expires_at: int = 0) -> ModelMessage:
    """``model`` stamped ``issued_at`` (Unix ms, >= 1) and ``expires_at`` (Unix ms after ``issued_at``;
    0: no expiry, a v1 statement) and signed: its release statement's signature."""
    if issued_at < 1:
        raise ConfigError(f"issued_at must be >= 1 (Unix milliseconds), got {issued_at}")
    if expires_at != 0 and expires_at <= issued_at:
        raise ConfigError(f"expires_at ({expires_at}) must be after issued_at ({issued_at}), or 0 for none")
    stamped = replace(model, issued_at=issued_at, expires_at=expires_at, signing_key=key.public_key.hex(), signature="")
    return replace(stamped, signature=key.sign(release_statement(stamped)).hex())
