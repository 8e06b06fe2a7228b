"""A test hook: make a real ``fedflock agent`` process SIGKILL itself at a chosen point.

Opt-in, for the fault drills only: ``fedflock agent --config ...`` reads the environment
variable :data:`CRASH_ENV` once at start-up (``fedflock/agent_cli.py``) and, when it is set,
wraps the device's transport in :class:`CrashingTransport`. Points:

``after-result-publish``
    Right after a publish on the device's results topic returned (the broker's PUBACK arrived)
    and before the agent's outbox recorded the delivery: the broker has the UPDATE, the device
    believes it does not. A restart sends it again as the next attempt; the server must count
    it once.

Nothing else changes; a process without the variable never imports this module.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping

from edge_agent.errors import ConfigError
from edge_agent.transport.base import InboundMessage, Transport

__all__ = ["CRASH_ENV", "CRASH_POINTS", "CrashingTransport", "crash_point_from_env", "wrap_for_drill"]

CRASH_ENV = "FEDFLOCK_DRILL_CRASH"
CRASH_POINTS = ("after-result-publish",)


def crash_point_from_env(environ: Mapping[str, str]) -> str | None:
    """The crash point :data:`CRASH_ENV` names, None if unset; ConfigError naming the variable."""
    value = environ.get(CRASH_ENV, "").strip()
    if not value:
        return None
    if value not in CRASH_POINTS:
        raise ConfigError(f"{CRASH_ENV} must be one of {list(CRASH_POINTS)}, got {value!r}")
    return value


def _kill_self() -> None:
    sys.stderr.write(f"{CRASH_ENV}: killing this agent (pid {os.getpid()}) with SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class CrashingTransport:
    """Delegates to ``inner``; calls ``crash()`` right after a publish on ``results_topic`` returns."""

    def __init__(self, inner: Transport, results_topic: str, *, crash: Callable[[], None] = _kill_self) -> None:
        self._inner = inner
        self._results_topic = results_topic
        self._crash = crash

    def start(self) -> None:
        self._inner.start()

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: float | None = None
    ) -> None:
        self._inner.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)
        if topic == self._results_topic:
            self._crash()

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self._inner.subscribe(topic_filter, qos=qos)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        return self._inner.receive(timeout)

    def close(self) -> None:
        self._inner.close()

    def is_connected(self) -> bool:
        probe = getattr(self._inner, "is_connected", None)
        return bool(probe()) if probe is not None else True


def wrap_for_drill(transport: Transport, results_topic: str, environ: Mapping[str, str]) -> Transport:
    """``transport``, wrapped to crash at the point :data:`CRASH_ENV` names (unwrapped if unset)."""
    point = crash_point_from_env(environ)
    if point is None:
        return transport
    return CrashingTransport(transport, results_topic)
