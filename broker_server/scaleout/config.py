"""The ``[scaleout]`` table, and what scale-out mode refuses (pure; every error names its key).

Keys (all optional)::

    group              shared-subscription group of the workers (default "fedflock-workers")
    worker_id          this worker's name in the store and in logs (default "<hostname>-<pid>")
    flush_interval_s   a worker flushes its partials at least this often (default 2.0)
    heartbeat_s        a worker beats (and looks for closing rounds) this often (default 0.2)
    lease_s            the coordinator fences a worker whose beats stop this long (default 10.0);
                       after 3 missed beats already, its unflushed claims stop counting
                       towards a round's outcome (:mod:`broker_server.scaleout.liveness`)
    close_timeout_s    at a round's close, how long the coordinator waits for live workers'
                       last flush before fencing them too (default 30.0)
    poll_s             the coordinator counts a round's claims this often (default 0.1)
    max_result_bytes   TASKs ask devices to send results up to this size whole (default 64 MiB)
    fold_threads       threads each worker's streaming mean folds with (default 1: the
                       parallelism is the workers)

**What scale-out refuses, and why.** A worker sees only the updates MQTT gives it, and the
coordinator only the workers' sums; so scale-out runs the FedAvg family (any server strategy:
they all step on the mean delta) in synchronous rounds, nothing that needs the updates
themselves in one place or a protocol of its own:

* ``robust`` — median, trimmed mean and Krum need every update of the round as a row (``clip``
  could run per worker, but is not wired);
* ``trust`` — weighs updates by a reputation learnt from all of a round's updates;
* ``clusters`` — CFL's split test compares the round's updates with each other;
* ``secagg`` — its own multi-phase protocol with one server holding the session's state;
* ``privacy`` — central DP's clip and noisy release are not wired through the partials;
* ``mode = "async"`` and ``late_updates = "async"`` — FedBuff's buffer and the late-update
  ledger are single-process state;
* ``rollout`` and ``blobs`` — FETCH requests and claim checks would reach a random worker,
  which does not serve model downloads;
* a store that is not PostgreSQL (``server.store``) — workers on several hosts need one database.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from broker_server.server_config import ServerConfig
from edge_agent.errors import ConfigError
from edge_agent.protocol.messages import MIN_CHUNK_BYTES

__all__ = ["ROLES", "ScaleoutSettings", "check_scaleout", "parse_scaleout"]

ROLES = ("coordinator", "worker")


@dataclass(frozen=True, kw_only=True)
class ScaleoutSettings:
    group: str = "fedflock-workers"
    worker_id: str = ""
    flush_interval_s: float = 2.0
    heartbeat_s: float = 0.2
    lease_s: float = 10.0
    close_timeout_s: float = 30.0
    poll_s: float = 0.1
    max_result_bytes: int = 64 << 20
    fold_threads: int = 1

    def __post_init__(self) -> None:
        if not self.group or any(c in self.group for c in "/+#"):
            raise ConfigError(f"scaleout.group: a non-empty name without '/', '+' or '#', got {self.group!r}")
        for key in ("flush_interval_s", "heartbeat_s", "lease_s", "close_timeout_s", "poll_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"scaleout.{key}: must be > 0, got {getattr(self, key)!r}")
        if self.lease_s <= 2 * self.heartbeat_s:
            raise ConfigError(f"scaleout.lease_s ({self.lease_s}) must exceed twice heartbeat_s ({self.heartbeat_s})")
        if self.max_result_bytes < MIN_CHUNK_BYTES:
            raise ConfigError(f"scaleout.max_result_bytes: must be >= {MIN_CHUNK_BYTES}, got {self.max_result_bytes}")
        if self.fold_threads < 1:
            raise ConfigError(f"scaleout.fold_threads: must be >= 1, got {self.fold_threads}")

    @property
    def beat_window_s(self) -> float:
        """A worker whose beats the coordinator saw move within this window is *beating*: its
        unflushed claims count towards a round's outcome (3 heartbeats, plus one coordinator poll
        as the coordinator only samples the counters that often; at most ``lease_s``)."""
        return min(3 * self.heartbeat_s + self.poll_s, self.lease_s)

    @property
    def name(self) -> str:
        """The worker's name (``worker_id``, or ``<hostname>-<pid>``)."""
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def parse_scaleout(table: Mapping[str, Any] | None) -> ScaleoutSettings:
    """The ``[scaleout]`` table (None or {}: the defaults); ``ConfigError`` naming a bad key."""
    if table is None:
        return ScaleoutSettings()
    if not isinstance(table, Mapping):
        raise ConfigError(f"scaleout: expected a table, got {table!r}")
    known = {f.name: f for f in fields(ScaleoutSettings)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        field = known.get(key)
        if field is None:
            raise ConfigError(f"unknown key scaleout.{key} (known: {', '.join(sorted(known))})")
        kind = {"str": str, "int": int, "float": float}[str(field.type)]
        if kind is str and not isinstance(value, str):
            raise ConfigError(f"scaleout.{key}: expected a string, got {value!r}")
        if kind is not str and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"scaleout.{key}: expected a number, got {value!r}")
        if kind is int and int(value) != value:
            raise ConfigError(f"scaleout.{key}: expected a whole number, got {value!r}")
        values[key] = kind(value)
    return ScaleoutSettings(**values)


def check_scaleout(config: ServerConfig, store_url: str | None) -> None:
    """``ConfigError`` naming the first setting scale-out mode cannot run (module docstring)."""
    refusals: list[tuple[str, bool, str]] = [
        ("mode", config.mode != "sync", "'async' (FedBuff's buffer is single-process state)"),
        ("late_updates", config.late_updates != "drop", "'async' (the late-update ledger is single-process)"),
        ("robust", bool(config.robust), "a robust rule (it needs every update of a round in one place)"),
        ("trust", config.trust is not None, "tiered trust (it weighs updates against all of a round's)"),
        ("clusters", config.clusters is not None, "clustered FL (its split test compares the updates)"),
        ("secagg", config.secagg is not None, "secure aggregation (its own protocol, one session server)"),
        ("privacy", config.privacy is not None, "central DP (clip and noise are not wired through partials)"),
        ("rollout", config.rollout is not None, "a staged rollout (FETCHes would reach a random worker)"),
        ("blobs", config.blobs is not None, "claim checks (their requests would reach a random worker)"),
    ]
    for key, refused, why in refusals:
        if refused:
            raise ConfigError(f"{key}: scale-out mode (--role) cannot run {why}; docs/scaleout.md")
    if store_url is None or not store_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "server.store: scale-out mode (--role) needs a PostgreSQL store shared by the coordinator and "
            f"every worker (postgresql://...), got {store_url!r}"
        )
