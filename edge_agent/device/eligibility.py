"""May this device train, keep training, download or upload now? One pure function: :func:`decide`.

Which checks apply to which phase::

    check                         train  continue  download  upload
    power (charging or battery)     x       x         x        x
    temperature                     x       x         x        x
    idle (max_cpu_load)             x
    memory                          x       x
    disk                            x       x         x
    windows, network, unmetered   as ``windows_for`` / ``require_network_for`` / ``unmetered_for``
                                  say ("train" there covers "continue")
    budget                          x                 x

``continue`` is the re-check at every step boundary of a running round: the agent's own load must
not stop it (no idle check) and a started round is finished (no budget check). Its working set is
already allocated, so it only needs ``min_free_memory_mb`` left over, while ``train`` needs the
working set on top. ``download`` checks the budget too: a bundle the device may not train on is
wasted data. A check on an unknown reading passes or fails as ``[policy.unknown]`` says, and a
failure says "unknown" (``temperature unknown (policy: deny)``). A network kind of ``cellular``
with no metered flag counts as metered; with no link at all, nothing is metered.

Every failed check is listed, each as a :class:`Reason` with a stable ``code`` (reported to the
server) and a short text for people; :data:`REASON_CODES` lists the codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edge_agent.device.budget import budget_allows, describe_budget
from edge_agent.device.policy import MB, UNKNOWN_SENSORS, Policy
from edge_agent.device.state import DeviceState

#: Phases :func:`decide` is asked about.
DECISION_PHASES = ("train", "continue", "download", "upload")
#: Every :attr:`Reason.code`: a failed check, or ``<sensor>_unknown`` for a denied unknown reading.
REASON_CODES = (
    "battery_low",
    "not_charging",
    "too_hot",
    "cpu_busy",
    "memory_low",
    "disk_low",
    "outside_window",
    "network_down",
    "network_metered",
    "budget_exhausted",
    *(f"{sensor}_unknown" for sensor in UNKNOWN_SENSORS),
)


@dataclass(frozen=True, kw_only=True)
class Reason:
    """One failed check: ``code`` for machines (one of :data:`REASON_CODES`), ``text`` for people."""

    code: str
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The answer for one phase; eligible exactly when no check failed."""

    phase: str
    reasons: tuple[Reason, ...] = ()

    @property
    def eligible(self) -> bool:
        return not self.reasons

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(r.code for r in self.reasons)

    def __str__(self) -> str:
        return "eligible" if self.eligible else "not eligible: " + ", ".join(map(str, self.reasons))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as reported to the server."""
        reasons = [{"code": r.code, "text": r.text} for r in self.reasons]
        return {"phase": self.phase, "eligible": self.eligible, "reasons": reasons}


def decide(
    state: DeviceState,
    policy: Policy,
    *,
    phase: str,
    now: datetime,
    history: Sequence[float] = (),
    working_set_bytes: int = 0,
) -> Decision:
    """Whether ``phase`` may run on a device in ``state`` under ``policy``.

    ``now`` is local time for the windows; its wall-clock fields are used as they are (naive, or
    aware in the device's zone). The budget's clock is ``state.taken_at``, and ``history`` holds
    the Unix start times of past participations. ``working_set_bytes`` is the model's memory need
    for ``train`` (see ``load.adapt_batch_size``). Raises :class:`ValueError` for an unknown phase.
    """
    if phase not in DECISION_PHASES:
        raise ValueError(f"phase must be one of {DECISION_PHASES}, got {phase!r}")
    base = "train" if phase == "continue" else phase
    reasons = [*_power(state, policy), *_temperature(state, policy)]
    if phase == "train":
        reasons += _idle(state, policy)
    if base == "train":
        reasons += _memory(state, policy, working_set_bytes if phase == "train" else 0)
    if phase != "upload":
        reasons += _disk(state, policy)
    if base in policy.windows_for:
        reasons += _window(now, policy)
    link = _link(state)
    if base in policy.require_network_for:
        reasons += _network(link, policy)
    if base in policy.unmetered_for and link is not False:
        reasons += _metered(state, policy)
    budget = policy.budget
    if phase in ("train", "download") and budget is not None and not budget_allows(history, budget, state.taken_at):
        text = f"budget: {describe_budget(history, budget, state.taken_at)}"
        reasons.append(Reason(code="budget_exhausted", text=text))
    return Decision(phase=phase, reasons=tuple(reasons))


def _unknown(sensor: str, policy: Policy) -> tuple[Reason, ...]:
    if policy.unknown.allows(sensor):
        return ()
    return (Reason(code=f"{sensor}_unknown", text=f"{sensor.replace('_', ' ')} unknown (policy: deny)"),)


def _num(value: float) -> str:
    return f"{value:.4g}"


def _power(state: DeviceState, policy: Policy) -> tuple[Reason, ...]:
    """Charging, or (unless charging is required) enough battery; both sides' reasons when neither holds."""
    if state.charging is None:
        charging = _unknown("charging", policy)
    else:
        charging = () if state.charging else (Reason(code="not_charging", text="not charging"),)
    if policy.require_charging or not charging:
        return charging
    battery = state.battery_percent
    if battery is None:
        on_battery = _unknown("battery", policy)
    elif battery < policy.min_battery_percent:
        text = f"battery {_num(battery)}% < {_num(policy.min_battery_percent)}%"
        on_battery = (Reason(code="battery_low", text=text),)
    else:
        on_battery = ()
    return on_battery + charging if on_battery else ()


def _temperature(state: DeviceState, policy: Policy) -> tuple[Reason, ...]:
    temp = state.temperature_c
    if temp is None:
        return _unknown("temperature", policy)
    if temp <= policy.max_temperature_c:
        return ()
    return (Reason(code="too_hot", text=f"temperature {_num(temp)} C > {_num(policy.max_temperature_c)} C"),)


def _idle(state: DeviceState, policy: Policy) -> tuple[Reason, ...]:
    limit, load = policy.max_cpu_load, state.cpu_load
    if limit is None:
        return ()
    if load is None:
        return _unknown("cpu_load", policy)
    if load <= limit:
        return ()
    return (Reason(code="cpu_busy", text=f"cpu busy {_num(load * 100)}% > {_num(limit * 100)}%"),)


def _memory(state: DeviceState, policy: Policy, working_set_bytes: int) -> tuple[Reason, ...]:
    available = state.memory_available_bytes
    if available is None:
        return _unknown("memory", policy)
    needed = working_set_bytes + policy.min_free_memory_mb * MB
    if available >= needed:
        return ()
    # floor and ceil: the printed numbers never contradict the verdict
    text = f"memory {available // MB} MB available < {math.ceil(needed / MB)} MB needed"
    return (Reason(code="memory_low", text=text),)


def _disk(state: DeviceState, policy: Policy) -> tuple[Reason, ...]:
    free = state.disk_free_bytes
    if free is None:
        return _unknown("disk", policy)
    needed = policy.min_free_disk_mb * MB
    if free >= needed:
        return ()
    return (Reason(code="disk_low", text=f"disk {free // MB} MB free < {math.ceil(needed / MB)} MB"),)


def _window(now: datetime, policy: Policy) -> tuple[Reason, ...]:
    if not policy.windows:
        return ()
    seconds = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
    if any(w.contains(seconds) for w in policy.windows):
        return ()
    plural = "s" if len(policy.windows) > 1 else ""
    text = f"outside window{plural} {', '.join(map(str, policy.windows))} (now {now:%H:%M})"
    return (Reason(code="outside_window", text=text),)


def _link(state: DeviceState) -> bool | None:
    """Is there a usable link? ``None``: unknown."""
    if state.network.kind == "none":
        return False
    return state.network.link_up


def _network(link: bool | None, policy: Policy) -> tuple[Reason, ...]:
    if link is None:
        return _unknown("network", policy)
    return () if link else (Reason(code="network_down", text="no network"),)


def _metered(state: DeviceState, policy: Policy) -> tuple[Reason, ...]:
    metered = state.network.metered
    if metered is None and state.network.kind == "cellular":
        metered = True
    if metered is None:
        return _unknown("metered", policy)
    return (Reason(code="network_metered", text="network metered"),) if metered else ()
