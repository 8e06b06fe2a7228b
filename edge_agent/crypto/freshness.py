"""When a signed release statement holds: ``issued_at`` ≤ now < ``expires_at``, give or take a clock skew.

A valid signature proves that the server said something *once*. Without an expiry, a statement
captured today can be shown to a device forever: whoever can publish on the broker (a leaked
server credential, a compromised broker or relay) can hold a device on an old decision by
replaying it and withholding newer ones — the *freeze attack* of The Update Framework's threat
model. The replay and downgrade rules (:mod:`edge_agent.ota.authority`) stop an old statement
from moving a device *backwards*; an expiry bounds how long any statement can be used at all.

The server signs ``expires_at`` inside the statement (a ``v2`` release statement,
:func:`~edge_agent.protocol.model_messages.release_statement`), so it cannot be stripped or moved
without breaking the signature, and re-signs the statements retained on the broker before they
expire (``broker_server/pki/statement_refresh.py``). A device checks, with its own wall clock:

* ``now + skew < issued_at`` — :class:`StatementNotYetValid`: the device clock is behind (a device
  whose clock stands in 1970 would otherwise take every expired statement as fresh);
* ``now - skew >= expires_at`` — :class:`StatementExpired` (also when ``expires_at <= issued_at``:
  a statement that was never valid);
* no ``expires_at`` (a v1 statement, from a server older than this check) — accepted unless
  :attr:`FreshnessPolicy.require_expiry`, then :class:`StatementWithoutExpiry`.

The default is ``require_expiry = false``: a device must keep accepting v1 statements while its
server has not been upgraded (upgrade the agents first, then the server, then set the key to
true: docs/security.md, "Statement expiry"). A v1 statement still passes the replay and downgrade
rules; what it lacks is only the bound on its age.

All three errors subclass :class:`~edge_agent.crypto.errors.SignatureError` (the statement is not
acceptable as authority) and have their own ``code``. :func:`check_freshness` is pure: the caller
passes the time.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

from edge_agent.crypto.errors import SignatureError
from edge_agent.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_CLOCK_SKEW_S",
    "MAX_CLOCK_SKEW_S",
    "FreshnessPolicy",
    "StaleStatement",
    "StatementExpired",
    "StatementNotYetValid",
    "StatementWithoutExpiry",
    "check_freshness",
]

#: the clock difference between server and device that is tolerated by default (5 minutes)
DEFAULT_MAX_CLOCK_SKEW_S = 300.0
#: a larger tolerance would make the expiry meaningless (statements live a day by default)
MAX_CLOCK_SKEW_S = 3600.0


class StaleStatement(SignatureError):
    """A correctly signed statement outside its validity window (or without one, when one is required)."""

    code = "stale_statement"


class StatementExpired(StaleStatement):
    code = "statement_expired"


class StatementNotYetValid(StaleStatement):
    code = "statement_not_yet_valid"


class StatementWithoutExpiry(StaleStatement):
    code = "statement_without_expiry"


@dataclass(frozen=True, kw_only=True)
class FreshnessPolicy:
    """The device's ``[ota] require_expiry`` and ``[ota] max_clock_skew_s``."""

    require_expiry: bool = False
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S

    def __post_init__(self) -> None:
        if not isinstance(self.require_expiry, bool):
            raise ConfigError(f"ota.require_expiry: expected true or false, got {self.require_expiry!r}")
        skew = self.max_clock_skew_s
        if isinstance(skew, bool) or not isinstance(skew, int | float) or not math.isfinite(skew):
            raise ConfigError(f"ota.max_clock_skew_s: expected a number of seconds, got {skew!r}")
        if not 0 <= skew <= MAX_CLOCK_SKEW_S:
            raise ConfigError(f"ota.max_clock_skew_s: must be between 0 and {MAX_CLOCK_SKEW_S:g} s, got {skew!r}")


def check_freshness(*, issued_at: int, expires_at: int, now_ms: int, policy: FreshnessPolicy, what: str) -> None:
    """Raise a :class:`StaleStatement` if a statement issued at ``issued_at`` and expiring at
    ``expires_at`` (Unix ms; 0: no expiry) does not hold at ``now_ms``; ``what`` names it in the reason."""
    skew_ms = round(policy.max_clock_skew_s * 1000)
    tolerance = f"{policy.max_clock_skew_s:g} s of clock skew tolerated"
    if expires_at == 0:
        if policy.require_expiry:
            raise StatementWithoutExpiry(
                f"{what} has no expiry (a v1 statement: an old server, or an old statement replayed) "
                "and this device requires one ([ota] require_expiry)"
            )
        return
    if expires_at <= issued_at:
        raise StatementExpired(f"{what} expires at {_utc(expires_at)}, not after it was issued: never valid")
    if now_ms + skew_ms < issued_at:
        raise StatementNotYetValid(
            f"{what} was issued at {_utc(issued_at)}, {_seconds(issued_at - now_ms)} after this device's time "
            f"{_utc(now_ms)} ({tolerance}): the device clock is behind (is it synchronised?)"
        )
    if now_ms - skew_ms >= expires_at:
        raise StatementExpired(
            f"{what} expired at {_utc(expires_at)}, {_seconds(now_ms - expires_at)} before this device's time "
            f"{_utc(now_ms)} ({tolerance}): a replayed or stale statement, or a device clock ahead"
        )


def _utc(ms: int) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):  # far outside the calendar: say the number
        return f"{ms} ms"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.0f} s" if ms < 10 * 60_000 else f"{ms / 3_600_000:.1f} h"
