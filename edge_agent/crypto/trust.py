"""The device's trusted Ed25519 keys and the two checks made with them (docs/security.md, "Signed artifacts").

* :meth:`TrustedKeys.check_statement` — a MODEL's signed release statement
  (:func:`~edge_agent.protocol.model_messages.release_statement`), checked when the MODEL
  arrives, before anything is fetched; then whether it holds at the device's time
  (:mod:`.freshness`: expiry, clock skew, ``require_expiry``: the keys' :attr:`~TrustedKeys.freshness`);
* :meth:`TrustedKeys.check_bundle` — a bundle directory's ``manifest.sig`` over its
  ``manifest.json`` (which pins every file's sha256), checked in the model store's ``signature``
  stage: after the archive is unpacked into staging and its files verified, before the model is
  validated (run) or activated.

Either raises :class:`SignatureError` (a :class:`~.freshness.StaleStatement` for a statement
outside its validity window) with a reason that tells unsigned, signed by a key that is
not trusted, and a signature that does not match (tampered) apart. Several keys may be trusted at
once (key rotation: trust the new key, re-sign, then drop the old one).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.crypto import ed25519
from edge_agent.crypto.errors import SignatureError
from edge_agent.crypto.freshness import FreshnessPolicy, check_freshness
from edge_agent.errors import ConfigError, MalformedMessage
from edge_agent.protocol.manifest import MANIFEST_FILE
from edge_agent.protocol.model_messages import (
    ModelMessage,
    bundle_signed_bytes,
    parse_bundle_signature,
    release_statement,
)

__all__ = ["SIGNATURE_FILE", "SignatureError", "TrustedKeys", "key_id"]

#: the bundle signature's file name (also :data:`edge_agent.ota.archive.SIGNATURE_FILE`)
SIGNATURE_FILE = "manifest.sig"
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")


def key_id(public_key: bytes) -> str:
    """A short name for a key in logs and reasons: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class TrustedKeys:
    """Raw 32-byte Ed25519 public keys; an empty set trusts nothing (callers skip the checks then).

    ``freshness``: how long what these keys sign holds on this device (``[ota] require_expiry``,
    ``max_clock_skew_s``), checked with the signature by :meth:`check_statement`.
    """

    keys: tuple[bytes, ...]
    freshness: FreshnessPolicy = field(default_factory=FreshnessPolicy)

    @classmethod
    def parse(cls, values: Iterable[str], *, source: str = "ota.trusted_keys") -> TrustedKeys:
        """Keys as 64 hex digits; ``ConfigError`` naming ``source`` for a malformed or weak key."""
        keys: list[bytes] = []
        for index, value in enumerate(values):
            text = value.strip() if isinstance(value, str) else value
            if not isinstance(text, str) or not _HEX_KEY.match(text):
                raise ConfigError(f"{source}[{index}]: expected an Ed25519 public key as 64 hex digits, got {value!r}")
            key = bytes.fromhex(text)
            if ed25519.is_weak_public_key(key):
                raise ConfigError(f"{source}[{index}]: {text[:16]}… is not a usable Ed25519 public key")
            if key not in keys:
                keys.append(key)
        return cls(tuple(keys))

    @staticmethod
    def read_file(path: Path, *, source: str) -> list[str]:
        """Keys from a text file: one hex key a line; blank lines and ``#`` comments are skipped."""
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read {path}: {exc}") from exc
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        return [line for line in lines if line]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def describe(self) -> str:
        return ", ".join(key_id(k) for k in self.keys) or "none"

    def check_statement(self, model: ModelMessage, *, now_ms: int) -> str:
        """Verify ``model``'s signature over its release statement, then that the statement holds at
        ``now_ms`` (the device's wall clock, Unix ms); returns the signing key's id."""
        what = f"MODEL v{model.version} on {model.channel}"
        if not model.signature or not model.signing_key or model.issued_at <= 0:
            raise SignatureError(f"{what} is unsigned (no signature, signing_key or issued_at)")
        name = self._check(
            bytes.fromhex(model.signing_key), release_statement(model), bytes.fromhex(model.signature), what
        )
        # only now are issued_at and expires_at the signer's words
        check_freshness(
            issued_at=model.issued_at, expires_at=model.expires_at, now_ms=now_ms, policy=self.freshness, what=what
        )
        return name

    def check_bundle(self, directory: Path) -> str:
        """Verify ``directory/manifest.sig`` over ``directory/manifest.json``; returns the key's id.

        The manifest pins every other file's sha256, which :meth:`Bundle.open` checks: so one
        signature covers the bundle.
        """
        signature_path, manifest_path = directory / SIGNATURE_FILE, directory / MANIFEST_FILE
        if not signature_path.is_file():
            raise SignatureError(f"the bundle is unsigned (no {SIGNATURE_FILE})")
        try:
            public_key, signature = parse_bundle_signature(signature_path.read_bytes())
            manifest = manifest_path.read_bytes()
        except MalformedMessage as exc:
            raise SignatureError(exc.reason) from exc
        except OSError as exc:
            raise SignatureError(f"cannot read the bundle's signature or manifest: {exc.strerror or exc}") from exc
        return self._check(public_key, bundle_signed_bytes(manifest), signature, "the bundle's manifest")

    def _check(self, public_key: bytes, message: bytes, signature: bytes, what: str) -> str:
        name = key_id(public_key)
        if public_key not in self.keys:
            raise SignatureError(f"{what} is signed by key {name}, which is not trusted (trusted: {self.describe()})")
        if not ed25519.verify(public_key, message, signature):
            raise SignatureError(f"{what}: the signature by key {name} does not match (tampered)")
        return name
