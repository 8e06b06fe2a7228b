"""The cryptographic primitives of secure aggregation, on the ``cryptography`` package.

* Key agreement: X25519 (RFC 7748). Private keys are 32 bytes drawn from the injected
  :class:`RandomSource` (the library clamps them); the raw 32 bytes are what gets Shamir-shared.
* Key derivation: HKDF-SHA256 (RFC 5869) from the 32-byte X25519 output ``z``, ``salt`` = the
  16-byte session id, 32 output bytes, ``info`` =

  - mask seed of devices ``u < v``: ``b"fedflock/secagg/v1/mask" || u16le(u) || u16le(v)``
  - share key from ``sender`` to ``recipient``: ``b"fedflock/secagg/v1/share" || u16le(sender) || u16le(recipient)``

  Both directions of a pair share one X25519 secret, so the share keys differ by direction.
* Share transport: AES-256-GCM with a random 12-byte nonce, associated data
  ``session || u16le(sender) || u16le(recipient)``; the blob is ``nonce || ciphertext || tag``.

Failures of the library are translated here: an authentication failure becomes
:class:`~edge_agent.errors.SecAggTampered`, an unusable public key
:class:`~edge_agent.errors.ContractViolation`. Pure (no I/O besides drawing randomness).
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_agent.errors import ContractViolation, SecAggTampered

KEY_BYTES = 32
SESSION_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
MASK_INFO = b"fedflock/secagg/v1/mask"
SHARE_INFO = b"fedflock/secagg/v1/share"
_PAIR = struct.Struct("<HH")


class RandomSource(Protocol):
    """Where secret randomness comes from (keys, self-mask seeds, Shamir coefficients, nonces)."""

    def token_bytes(self, n: int) -> bytes: ...


class SystemRandomSource:
    """The default :class:`RandomSource`: the operating system's CSPRNG via :mod:`secrets`."""

    def token_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair: the raw private bytes (shared by Shamir), the key object and the public bytes."""

    private: bytes
    key: X25519PrivateKey
    public: bytes


def keypair_from_private(private: bytes) -> KeyPair:
    if len(private) != KEY_BYTES:
        raise SecAggTampered(f"an X25519 private key is {KEY_BYTES} bytes, got {len(private)}")
    key = X25519PrivateKey.from_private_bytes(private)
    return KeyPair(private, key, key.public_key().public_bytes_raw())


def generate_keypair(rng: RandomSource) -> KeyPair:
    return keypair_from_private(rng.token_bytes(KEY_BYTES))


def agree(own: KeyPair, peer_public: bytes, peer: int) -> bytes:
    """The 32-byte X25519 shared secret with device ``peer``'s public key."""
    try:
        return own.key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong length, or a low-order point giving the all-zero secret
        raise ContractViolation(f"device {peer}'s X25519 public key is unusable: {exc}") from exc


def _hkdf(shared: bytes, session: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=info).derive(shared)


def mask_seed(shared: bytes, session: bytes, u: int, v: int) -> bytes:
    """The PRG seed of the pairwise mask between devices ``u`` and ``v`` (order-independent)."""
    low, high = min(u, v), max(u, v)
    return _hkdf(shared, session, MASK_INFO + _PAIR.pack(low, high))


def share_key(shared: bytes, session: bytes, sender: int, recipient: int) -> bytes:
    """The AES-256-GCM key of the shares ``sender`` encrypts for ``recipient``."""
    return _hkdf(shared, session, SHARE_INFO + _PAIR.pack(sender, recipient))


def _aad(session: bytes, sender: int, recipient: int) -> bytes:
    return session + _PAIR.pack(sender, recipient)


def seal(key: bytes, session: bytes, sender: int, recipient: int, plaintext: bytes, rng: RandomSource) -> bytes:
    nonce = rng.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(session, sender, recipient))


def open_sealed(key: bytes, session: bytes, sender: int, recipient: int, blob: bytes) -> bytes:
    """Decrypt a :func:`seal` blob; :class:`SecAggTampered` if it was altered, forged or misrouted."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggTampered(f"encrypted shares from device {sender} are too short ({len(blob)} bytes)")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(session, sender, recipient))
    except InvalidTag as exc:
        raise SecAggTampered(f"encrypted shares from device {sender} to {recipient} failed authentication") from exc
