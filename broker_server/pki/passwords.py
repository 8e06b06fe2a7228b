"""Mosquitto 2 password-file entries, written without ``mosquitto_passwd``.

Mosquitto 2.0 reads lines ``username:$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-SHA512 over
the password with a 12-byte salt, a 64-byte derived key, both base64 (standard alphabet,
padded); ``mosquitto_passwd`` uses 101 iterations. Mosquitto re-reads the file on SIGHUP.

:func:`hash_password` and :func:`verify_password` are pure; :class:`PasswordFile` edits a file
atomically (temporary file + rename, mode 0600) and never loses the entries it did not touch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import ConfigError, StorageError
from edge_agent.files import atomic_write

__all__ = ["ITERATIONS", "PasswordFile", "hash_password", "new_password", "verify_password"]

ITERATIONS = 101
SALT_BYTES = 12
KEY_BYTES = 64


def hash_password(password: str, salt: bytes, iterations: int = ITERATIONS) -> str:
    """The ``$7$...`` string Mosquitto 2 stores for ``password``."""
    if not password:
        raise ConfigError("password: must not be empty")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, KEY_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    parts = stored.split("$")
    if len(parts) != 5 or parts[1] != "7":
        raise ConfigError(f"not a Mosquitto $7$ password hash: {stored[:12]!r}...")
    try:
        iterations, salt = int(parts[2]), base64.b64decode(parts[3], validate=True)
    except ValueError as exc:
        raise ConfigError(f"malformed Mosquitto password hash: {exc}") from exc
    return hmac.compare_digest(hash_password(password, salt, iterations), stored)


def new_password() -> str:
    """32 random bytes, URL-safe base64: nothing to escape in a file, a shell or JSON."""
    return secrets.token_urlsafe(32)


def _check_username(username: str) -> str:
    if not username or ":" in username or "\n" in username or "\r" in username:
        raise ConfigError(f"password file username {username!r}: no ':' or line breaks, not empty")
    return username


@dataclass(frozen=True)
class PasswordFile:
    """A Mosquitto password file at ``path`` (created by the first :meth:`add`)."""

    path: Path

    def entries(self) -> dict[str, str]:
        """username -> stored hash; ``{}`` when the file does not exist yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"cannot read password file {self.path}: {exc}") from exc
        found: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            user, sep, stored = line.partition(":")
            if not sep:
                raise StorageError(f"password file {self.path} line {number}: no ':' (not a Mosquitto password file)")
            found[user] = stored
        return found

    def add(self, username: str, password: str, *, replace: bool = False) -> None:
        entries = self.entries()
        if username in entries and not replace:
            raise ConfigError(f"password file {self.path} already has an entry for {username!r} (use --replace)")
        entries[_check_username(username)] = hash_password(password, secrets.token_bytes(SALT_BYTES))
        self._write(entries)

    def remove(self, username: str) -> bool:
        """Remove ``username``'s entry; ``False`` if it had none (the file is then unchanged)."""
        entries = self.entries()
        if entries.pop(username, None) is None:
            return False
        self._write(entries)
        return True

    def _write(self, entries: dict[str, str]) -> None:
        atomic_write(self.path, "".join(f"{user}:{stored}\n" for user, stored in entries.items()).encode(), 0o600)
