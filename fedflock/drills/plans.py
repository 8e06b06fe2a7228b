"""Fault plans for the drill proxy: pure data, and the pure decision of what to do with each chunk.

A :class:`FaultPlan` gives each TCP connection the proxy accepts (in accept order) one
:class:`Fault`, or none (a clean link). A fault acts on one direction of its connection:

* ``drop``: pass ``after_bytes`` bytes, then cut the connection (the cut usually falls inside an
  MQTT packet: the peer sees a truncated packet, then EOF).
* ``cut``: once a chunk contains ``trigger`` (e.g. a device's results topic, i.e. its UPDATE's
  PUBLISH), pass only the first ``keep`` bytes of that chunk and cut the connection: a packet cut
  in the middle, at a chosen place.
* ``delay``: hold every chunk ``delay_s`` seconds before passing it (a slow link; order is kept).
* ``blackhole``: from the first chunk containing ``trigger`` in its direction (every chunk if
  ``trigger`` is empty) on, the whole connection passes nothing, either way, for ``seconds``;
  then it is cut. Packets vanish and the peers notice only through their keepalive or publish
  timeouts, like a dead NAT mapping or a pulled cable.
* ``mute``: the chunk containing ``trigger`` passes, then the other direction passes nothing for
  ``seconds`` before the connection is cut: the broker got the PUBLISH, its PUBACK is lost.

:func:`seeded_plan` draws a reproducible plan. :func:`decide` is the whole per-chunk logic, so
the proxy's threads only move bytes and sleep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from edge_agent.errors import ConfigError

__all__ = [
    "DIRECTIONS",
    "FAULT_KINDS",
    "Action",
    "Fault",
    "FaultPlan",
    "decide",
    "seeded_plan",
]

#: ``up``: client -> broker; ``down``: broker -> client
DIRECTIONS = ("up", "down")
FAULT_KINDS = ("drop", "cut", "delay", "blackhole", "mute")


@dataclass(frozen=True, kw_only=True)
class Fault:
    """One fault on one direction of one connection (see the module docstring for the kinds)."""

    kind: str
    direction: str = "up"
    after_bytes: int = 0
    trigger: bytes = b""
    keep: int = 0
    delay_s: float = 0.0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ConfigError(f"fault kind must be one of {list(FAULT_KINDS)}, got {self.kind!r}")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"fault direction must be one of {list(DIRECTIONS)}, got {self.direction!r}")
        if self.after_bytes < 0 or self.keep < 0 or self.delay_s < 0 or self.seconds < 0:
            raise ConfigError(f"fault {self.kind}: after_bytes, keep, delay_s and seconds must be >= 0")
        if self.kind in ("cut", "mute") and not self.trigger:
            raise ConfigError(f"fault {self.kind} needs a trigger (the bytes that mark the packet)")

    def describe(self) -> str:
        detail = {
            "drop": f"after {self.after_bytes} B",
            "cut": f"keep {self.keep} B of the packet with {self.trigger!r}",
            "delay": f"{self.delay_s * 1000:.0f} ms per chunk",
            "blackhole": f"{self.seconds:.1f} s" + (f" from {self.trigger!r}" if self.trigger else ""),
            "mute": f"the answer to {self.trigger!r} for {self.seconds:.1f} s",
        }[self.kind]
        return f"{self.kind} {self.direction} {detail}"


@dataclass(frozen=True)
class FaultPlan:
    """Faults by connection: the i-th accepted connection gets ``faults[i]`` (``None``: clean);
    connections past the end of the tuple are clean, so a fleet eventually gets through."""

    faults: tuple[Fault | None, ...] = ()

    def for_connection(self, index: int) -> Fault | None:
        return self.faults[index] if 0 <= index < len(self.faults) else None

    @property
    def injected(self) -> int:
        return sum(fault is not None for fault in self.faults)


@dataclass(frozen=True)
class Action:
    """What to do with a chunk: pass its first ``forward`` bytes after ``wait_s``, then maybe ``close``.

    ``hold_until`` (seconds on the proxy's clock) is set when a blackhole or mute starts; until
    then the directions in ``hold_scope`` swallow everything, and the connection is cut at its end.
    """

    forward: int
    wait_s: float = 0.0
    close: bool = False
    hold_until: float | None = None
    hold_scope: tuple[str, ...] = ()


def decide(
    fault: Fault | None, direction: str, chunk: bytes, passed: int, now: float, held_until: float | None
) -> Action:
    """What the proxy does with ``chunk`` on ``direction``, which already passed ``passed`` bytes.

    ``held_until``: the end of a hold (blackhole or mute) covering this direction, or None.
    """
    if held_until is not None:
        return Action(forward=0, close=now >= held_until)
    if fault is None or fault.direction != direction:
        return Action(forward=len(chunk))
    if fault.kind == "delay":
        return Action(forward=len(chunk), wait_s=fault.delay_s)
    if fault.kind == "drop":
        room = fault.after_bytes - passed
        if room >= len(chunk):
            return Action(forward=len(chunk))
        return Action(forward=max(room, 0), close=True)
    hit = chunk.find(fault.trigger) if fault.trigger else 0
    if hit < 0:
        return Action(forward=len(chunk))
    if fault.kind == "cut":
        return Action(forward=min(fault.keep, len(chunk)), close=True)
    until = now + fault.seconds
    if fault.kind == "mute":  # the triggering packet goes through; its answer never comes back
        return Action(forward=len(chunk), hold_until=until, hold_scope=(_other(direction),))
    return Action(forward=0, hold_until=until, hold_scope=DIRECTIONS)  # blackhole


def _other(direction: str) -> str:
    return "down" if direction == "up" else "up"


def seeded_plan(
    seed: int,
    connections: int,
    *,
    kinds: tuple[str, ...] = FAULT_KINDS,
    trigger: bytes = b"",
    fault_rate: float = 0.5,
    max_drop_bytes: int = 4096,
    max_delay_s: float = 0.05,
    max_blackhole_s: float = 2.0,
) -> FaultPlan:
    """A reproducible plan for the first ``connections`` connections: each gets a fault with
    probability ``fault_rate``, of a kind drawn from ``kinds`` (``cut``/``blackhole`` use
    ``trigger``; without one, ``cut`` and ``mute`` become ``drop``)."""
    if not 0.0 <= fault_rate <= 1.0:
        raise ConfigError(f"fault_rate must be within [0, 1], got {fault_rate}")
    unknown = set(kinds) - set(FAULT_KINDS)
    if not kinds or unknown:
        raise ConfigError(f"kinds must be a non-empty subset of {list(FAULT_KINDS)}, got {list(kinds)}")
    rng = random.Random(seed)
    faults: list[Fault | None] = []
    for _ in range(connections):
        if rng.random() >= fault_rate:
            faults.append(None)
            continue
        kind = rng.choice(kinds)
        direction = rng.choice(DIRECTIONS)
        if kind in ("cut", "mute") and not trigger:
            kind = "drop"
        if kind == "drop":
            faults.append(Fault(kind="drop", direction=direction, after_bytes=rng.randint(1, max_drop_bytes)))
        elif kind == "cut":
            faults.append(Fault(kind="cut", direction="up", trigger=trigger, keep=rng.randint(1, 64)))
        elif kind == "delay":
            faults.append(Fault(kind="delay", direction=direction, delay_s=rng.uniform(0.0, max_delay_s)))
        elif kind == "mute":
            seconds = rng.uniform(0.2, max_blackhole_s)
            faults.append(Fault(kind="mute", direction="up", trigger=trigger, seconds=seconds))
        else:
            seconds = rng.uniform(0.2, max_blackhole_s)
            side = "up" if trigger else direction  # the trigger (a results topic) travels up
            faults.append(Fault(kind="blackhole", direction=side, trigger=trigger, seconds=seconds))
    return FaultPlan(tuple(faults))
