"""Rate limits of the enrollment endpoint: a token bucket per client address and a global one.

Guessing a 256-bit token is hopeless, so the limit is not what keeps tokens safe; it keeps one
client (or many) from spending the endpoint's CPU (CSR checks, signatures, password hashing), its
PKI directory lock and its log, and it makes a client that keeps presenting bad tokens slow.

* Every request takes one token from its client's bucket and one from the global bucket, both
  or neither: a client refused for the global limit keeps its own tokens.
* A refused token (the 403 answer) costs ``failure_cost`` in all from its client's bucket (the
  extra is charged after the answer, and may leave the bucket in debt down to ``-client_burst``),
  so a guessing client soon gets one attempt per ``failure_cost / client_rate`` seconds while an
  honest one enrolling a batch of devices behind one NAT address keeps ``client_rate``.
* A refused request gets 429 with ``Retry-After``: the seconds until both buckets hold a token.
  A 429 costs nothing (it is cheap to send) and never touches the token in the request.
* At most ``max_clients`` per-address buckets are kept; the least recently used one is dropped
  beyond that (an attacker rotating addresses then meets the global bucket).

The bucket arithmetic (:func:`take`, :func:`charge`) is pure; :class:`EnrollmentLimiter` holds the
buckets for a threaded HTTP server (one lock) and reads an injected monotonic clock. The client
address is the TCP peer's: behind a reverse proxy every request has the proxy's address, and the
per-client limit becomes a second global one (fedflock does not trust ``X-Forwarded-For``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.errors import ConfigError

__all__ = ["Bucket", "EnrollmentLimiter", "RateLimits", "charge", "take"]


@dataclass(frozen=True, kw_only=True)
class RateLimits:
    """Requests per second (``rate``) and at once (``burst``) per client address and in all."""

    client_rate: float = 1.0
    client_burst: float = 20.0
    global_rate: float = 20.0
    global_burst: float = 200.0
    failure_cost: float = 10.0
    max_clients: int = 10_000

    def __post_init__(self) -> None:
        flags = {
            "--client-rate": self.client_rate,
            "--client-burst": self.client_burst,
            "--global-rate": self.global_rate,
            "--global-burst": self.global_burst,
        }
        for flag, value in flags.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a positive number, got {value!r}")
        for flag, burst in (("--client-burst", self.client_burst), ("--global-burst", self.global_burst)):
            if burst < 1:
                raise ConfigError(f"{flag} must be at least 1 (one request), got {burst!r}")
        if not (math.isfinite(self.failure_cost) and self.failure_cost >= 1):
            raise ConfigError(f"--failed-token-cost must be at least 1, got {self.failure_cost!r}")
        if self.max_clients < 1:
            raise ConfigError(f"max_clients must be at least 1, got {self.max_clients!r}")


@dataclass(frozen=True)
class Bucket:
    """``tokens`` available at time ``at`` (negative: in debt)."""

    tokens: float
    at: float


def _refill(bucket: Bucket, now: float, rate: float, burst: float) -> Bucket:
    elapsed = max(0.0, now - bucket.at)  # a clock that steps back refills nothing
    return Bucket(min(burst, bucket.tokens + elapsed * rate), max(now, bucket.at))


def take(bucket: Bucket, now: float, *, rate: float, burst: float, cost: float = 1.0) -> tuple[Bucket, float]:
    """``(bucket after, 0.0)`` when ``cost`` tokens were taken, else ``(bucket refilled, seconds to wait)``."""
    current = _refill(bucket, now, rate, burst)
    if current.tokens >= cost:
        return Bucket(current.tokens - cost, current.at), 0.0
    return current, (cost - current.tokens) / rate


def charge(bucket: Bucket, now: float, *, rate: float, burst: float, cost: float) -> Bucket:
    """``bucket`` with ``cost`` more taken unconditionally, down to ``-burst`` at most (a penalty)."""
    current = _refill(bucket, now, rate, burst)
    return Bucket(max(-burst, current.tokens - cost), current.at)


class EnrollmentLimiter:
    """Thread-safe: :meth:`admit` before answering a request, :meth:`failed` after a refused token."""

    def __init__(self, limits: RateLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, Bucket] = OrderedDict()
        self._global: Bucket | None = None

    def admit(self, client: str) -> int | None:
        """None: go ahead (a token taken from both buckets); else the ``Retry-After`` seconds (>= 1)."""
        limits = self.limits
        with self._lock:
            now = self._clock()
            own, own_wait = take(self._client(client, now), now, rate=limits.client_rate, burst=limits.client_burst)
            every, all_wait = take(self._all(now), now, rate=limits.global_rate, burst=limits.global_burst)
            if own_wait == 0.0 and all_wait == 0.0:
                self._clients[client], self._global = own, every
                return None
            return max(1, math.ceil(max(own_wait, all_wait)))

    def failed(self, client: str) -> None:
        """``client`` presented a refused token: charge the rest of ``failure_cost``."""
        limits = self.limits
        with self._lock:
            now = self._clock()
            bucket = self._client(client, now)
            extra = limits.failure_cost - 1
            self._clients[client] = charge(bucket, now, rate=limits.client_rate, burst=limits.client_burst, cost=extra)

    def _client(self, client: str, now: float) -> Bucket:
        bucket = self._clients.get(client)
        if bucket is None:
            bucket = Bucket(self.limits.client_burst, now)
            self._clients[client] = bucket
            while len(self._clients) > self.limits.max_clients:
                self._clients.popitem(last=False)
        self._clients.move_to_end(client)
        return bucket

    def _all(self, now: float) -> Bucket:
        if self._global is None:
            self._global = Bucket(self.limits.global_burst, now)
        return self._global
