"""Blob keys: one safe grammar for every backend, and content-addressed keys.

A key is 1..512 characters of ``/``-separated segments, each starting with a letter or digit and
continuing with ``A-Za-z0-9._-``. So ``..``, ``.hidden``, empty segments, a leading ``/`` and
backslashes are impossible: a key can never leave a local store's root, and it needs no escaping
in an S3 URL path (the signer still encodes per RFC 3986).
"""

from __future__ import annotations

import hashlib
import re

from edge_agent.errors import ConfigError

__all__ = ["KEY_PATTERN", "MAX_KEY_CHARS", "check_key", "content_key", "sha256_hex"]

MAX_KEY_CHARS = 512
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_key(key: str) -> str:
    """``key`` if it is a valid blob key, else :class:`ConfigError` naming it."""
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not KEY_PATTERN.match(key):
        raise ConfigError(f"invalid blob key {str(key)[:80]!r}: segments of [A-Za-z0-9._-], alphanumeric first")
    return key


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(sha256: str, prefix: str = "sha256") -> str:
    """The content-addressed key of an object: ``{prefix}/{sha[:2]}/{sha}`` (fans out directories)."""
    if not _HEX64.match(sha256):
        raise ConfigError(f"not a sha256 hex digest: {sha256[:70]!r}")
    return check_key(f"{prefix}/{sha256[:2]}/{sha256}")
