"""One-time enrollment tokens: only their SHA-256 is stored, each is good once, until it expires.

A token is 32 random bytes (URL-safe base64, 43 characters), printed once by
``fedflock pki token DEVICE_ID`` and never written down by fedflock. ``DIR/tokens.json`` maps
``sha256(token)`` to the device id it enrolls, its expiry, and when it was used. Redeeming a
token marks it used *before* the certificate is signed (under the PKI directory's lock), so two
concurrent requests with the same token cannot both succeed; a request that fails after that
point has burnt the token, and the operator issues a new one (fail closed).

Why a bearer token and not, e.g., a pre-shared CA pin: the device must prove it is the device
the operator meant, once, over a channel it can verify. The enrollment endpoint is HTTPS with
the fedflock CA (the device gets ``ca.crt`` with the token), so the token is never visible on
the network; 256 bits make guessing useless. The endpoint's rate limits (``rate_limit.py``)
protect its resources and slow a client presenting bad tokens; the tokens' safety does not
depend on them.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError, StorageError
from edge_agent.files import atomic_write
from edge_agent.protocol.topics import validate_device_id

__all__ = ["TokenBook", "TokenRecord", "TokenRefused", "new_token", "parse_ttl", "token_digest"]

TOKEN_BYTES = 32
MAX_TTL_S = 30 * 24 * 3600


class TokenRefused(ConfigError):
    """The token is unknown, already used or expired (the HTTP answer does not say which)."""

    code = "token_refused"


@dataclass(frozen=True, kw_only=True)
class TokenRecord:
    device_id: str
    expires_at: str  # ISO 8601 UTC
    used_at: str | None = None


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_ttl(text: str) -> int:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` or plain seconds -> seconds (at most 30 days)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = int(number) * unit
    except ValueError:
        raise ConfigError(f"--ttl {text!r}: expected a number with s, m, h or d, e.g. 1h") from None
    if not 0 < seconds <= MAX_TTL_S:
        raise ConfigError(f"--ttl {text!r}: must be between 1 s and 30 days")
    return seconds


def _expired(record: TokenRecord, now: datetime.datetime) -> bool:
    return datetime.datetime.fromisoformat(record.expires_at) <= now


@dataclass(frozen=True)
class TokenBook:
    """``tokens.json`` at ``path``. Callers hold the PKI directory lock around :meth:`redeem`."""

    path: Path
    clock: Callable[[], datetime.datetime]

    def issue(self, device_id: str, ttl_s: int) -> str:
        validate_device_id(device_id)
        token = new_token()
        expires = self.clock() + datetime.timedelta(seconds=ttl_s)
        records = self._live(self._load())
        records[token_digest(token)] = TokenRecord(device_id=device_id, expires_at=expires.isoformat())
        self._save(records)
        return token

    def redeem(self, token: str) -> str:
        """Mark ``token`` used and return its device id; :class:`TokenRefused` otherwise."""
        records = self._load()
        digest = token_digest(token)
        match = next((d for d in records if hmac.compare_digest(d, digest)), None)
        if match is None:
            raise TokenRefused("enrollment token unknown")
        record = records[match]
        if record.used_at is not None:
            raise TokenRefused(f"enrollment token for {record.device_id} was already used at {record.used_at}")
        now = self.clock()
        if _expired(record, now):
            raise TokenRefused(f"enrollment token for {record.device_id} expired at {record.expires_at}")
        records[match] = replace(record, used_at=now.isoformat())
        self._save(records)
        return record.device_id

    def records(self) -> dict[str, TokenRecord]:
        return self._load()

    def _live(self, records: dict[str, TokenRecord]) -> dict[str, TokenRecord]:
        """Drop expired tokens (used ones stay until they expire: a replay is then reported as such)."""
        now = self.clock()
        return {digest: r for digest, r in records.items() if not _expired(r, now)}

    def _load(self) -> dict[str, TokenRecord]:
        try:
            data: Any = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {self.path}: {exc}") from exc
        try:
            return {digest: TokenRecord(**entry) for digest, entry in data["tokens"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"{self.path}: malformed token entry: {exc}") from exc

    def _save(self, records: dict[str, TokenRecord]) -> None:
        body = {"version": 1, "tokens": {d: asdict(r) for d, r in records.items()}}
        atomic_write(self.path, (json.dumps(body, indent=1) + "\n").encode(), 0o600)


def new_token() -> str:
    """``TOKEN_BYTES`` random bytes, URL-safe base64, never starting with ``-``: operators paste a
    token after ``--token`` on a command line, where a leading dash reads as an option (argparse:
    "expected one argument"). Redrawing keeps the token uniform over the allowed strings."""
    while (token := secrets.token_urlsafe(TOKEN_BYTES)).startswith("-"):
        pass
    return token
