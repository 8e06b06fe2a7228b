"""The server's signer of MODEL messages (``[ota] signing_key``; docs/protocol.md §8.5).

Every MODEL the server publishes — channel announcements and a staged rollout's directed MODELs —
carries a signed release statement stamped ``issued_at``. Devices order the statements they act
on by it (a replayed older directed MODEL cannot downgrade them), so the stamps of one signer
strictly increase even when the wall clock does not (two MODELs in one millisecond, a clock step
back): ``max(now_ms, last + 1)``.

With a ``lifetime_s`` (``[ota] statement_lifetime``, default :data:`DEFAULT_STATEMENT_LIFETIME_S`
where the broker config is parsed) every statement also carries ``expires_at = issued_at +
lifetime`` (a v2 statement; devices refuse it once expired: :mod:`edge_agent.crypto.freshness`).
:meth:`ReleaseSigner.resign` renews the expiry of a statement already published *without*
changing ``issued_at``: the same decision, re-certified (``edge_agent/ota/authority.py`` says why
that matters); :meth:`ReleaseSigner.refresh_at` is when to do it — once a quarter of the lifetime
is left (:mod:`broker_server.pki.statement_refresh` does it for the statements retained on the
broker). Without a lifetime, statements are v1 (no expiry), for fleets whose agents predate v2.

Why a day: the statement is what a device should *run*, the freshness role of TUF's timestamp
metadata (whose customary lifetime is a day). A short lifetime costs little: only retained
statements are re-signed (one small MODEL per channel and per directed device every 18 hours),
and when the server is down longer than a day devices keep running what they have — they could
not download anything without the server anyway — and accept the re-signed statements it
publishes when it is back.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.crypto.signing import SigningKey, sign_release
from edge_agent.errors import ConfigError
from edge_agent.protocol.model_messages import ModelMessage

__all__ = [
    "DEFAULT_STATEMENT_LIFETIME_S",
    "MAX_STATEMENT_LIFETIME_S",
    "MIN_STATEMENT_LIFETIME_S",
    "REFRESH_FRACTION",
    "ReleaseSigner",
    "parse_statement_lifetime",
]

#: how long a signed release statement holds by default: one day
DEFAULT_STATEMENT_LIFETIME_S = 86400.0
#: shorter lifetimes drown in devices' clock-skew tolerance (5 minutes by default)
MIN_STATEMENT_LIFETIME_S = 900.0
#: beyond this an expiry bounds little (TUF keeps even its root metadata to about a year)
MAX_STATEMENT_LIFETIME_S = 90 * 86400.0
#: a statement is re-signed once less than this fraction of its lifetime is left
REFRESH_FRACTION = 0.25

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_statement_lifetime(value: object, *, key: str = "ota.statement_lifetime") -> float | None:
    """``"24h"``, ``"7d"``, ``"90m"``, ``"3600s"`` or a number of seconds -> seconds; ``"none"``
    -> None (v1 statements without expiry). :class:`ConfigError` naming ``key`` otherwise."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f'{key}: expected a duration such as "24h" or "7d" (or "none"), got {value!r}')
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ConfigError(f'{key}: expected a duration such as "24h" or "7d" (or "none"), got {value!r}')
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or not MIN_STATEMENT_LIFETIME_S <= seconds <= MAX_STATEMENT_LIFETIME_S:
        raise ConfigError(
            f"{key}: {value!r} is outside {MIN_STATEMENT_LIFETIME_S / 60:g} minutes .. "
            f"{MAX_STATEMENT_LIFETIME_S / 86400:g} days"
        )
    return seconds


class ReleaseSigner:
    """Signs MODEL messages with one key; ``clock`` is wall time in seconds (injected in tests);
    ``lifetime_s`` (None: no expiry) is how long each statement holds."""

    def __init__(
        self, key: SigningKey, *, clock: Callable[[], float] = time.time, lifetime_s: float | None = None
    ) -> None:
        if lifetime_s is not None and not (math.isfinite(lifetime_s) and lifetime_s > 0):
            raise ConfigError(f"statement lifetime must be a positive number of seconds, got {lifetime_s!r}")
        self.key = key
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._last = 0

    @classmethod
    def from_file(
        cls, path: Path, *, source: str = "ota.signing_key", lifetime_s: float | None = None
    ) -> ReleaseSigner:
        return cls(SigningKey.load(path, source=source), lifetime_s=lifetime_s)

    @property
    def key_id(self) -> str:
        return self.key.key_id

    @property
    def public_key_hex(self) -> str:
        return self.key.public_key.hex()

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def sign(self, model: ModelMessage) -> ModelMessage:
        """``model`` with ``issued_at`` (strictly increasing), ``expires_at``, ``signing_key`` and ``signature`` set."""
        self._last = max(self.now_ms(), self._last + 1)
        return sign_release(model, self.key, issued_at=self._last, expires_at=self._expiry(self._last))

    def resign(self, model: ModelMessage) -> ModelMessage:
        """``model`` (a statement this signer issued) with the same ``issued_at``, a new expiry
        (a full lifetime from now) and a new signature."""
        if self.lifetime_s is None:
            raise ConfigError("a signer without a statement lifetime has nothing to renew")
        if model.issued_at < 1:
            raise ConfigError(f"MODEL v{model.version} on {model.channel} was never issued (issued_at 0)")
        expires_at = max(self._expiry(self.now_ms()), model.issued_at + 1)
        return sign_release(model, self.key, issued_at=model.issued_at, expires_at=expires_at)

    def refresh_at(self, model: ModelMessage) -> int | None:
        """Unix ms from which ``model`` should be re-signed (None: it does not expire, or another key signed it)."""
        if self.lifetime_s is None or model.expires_at == 0 or model.signing_key != self.public_key_hex:
            return None
        return model.expires_at - round(self.lifetime_s * 1000 * REFRESH_FRACTION)

    def _expiry(self, start_ms: int) -> int:
        return 0 if self.lifetime_s is None else start_ms + round(self.lifetime_s * 1000)
