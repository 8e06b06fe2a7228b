"""Test doubles for device state, public so other packages' tests and the fleet simulator use them.

* :class:`ScriptedMonitor` is a :class:`~edge_agent.device.monitor.Monitor` whose readings are
  set directly, each either a value or a function of the clock's time::

      monitor = ScriptedMonitor(clock=sim.now, battery_percent=80.0, charging=False)
      monitor.set(battery_percent=lambda t: max(0.0, 80.0 - t / 60))  # drains 1 %/min
      monitor.set(network=NetworkState(interface="wwan0", kind="cellular", metered=True))

* :class:`FakeProbes` stands in for the real probes under a
  :class:`~edge_agent.device.monitor.ResourceMonitor`, to exercise the monitor itself (caching,
  failure handling): set a reading to an exception instance and that probe raises it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any, TypeVar

from edge_agent.device.probes import MemoryReading, PowerReading
from edge_agent.device.state import DeviceState, NetworkState

T = TypeVar("T")

#: the readings a ScriptedMonitor can be given (every DeviceState field except taken_at)
READINGS = tuple(f.name for f in fields(DeviceState) if f.name != "taken_at")


class ScriptedMonitor:
    """A monitor whose readings are values or ``f(now)`` callables, evaluated at each sample."""

    def __init__(self, *, clock: Callable[[], float] = time.time, **readings: Any) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._readings: dict[str, Any] = {}
        #: how many samples were taken (``latest()`` included)
        self.samples = 0
        self.set(**readings)

    def set(self, **readings: Any) -> None:
        """Replace some readings; ``None`` makes one unknown. Unknown names raise ``TypeError``."""
        unknown = sorted(set(readings) - set(READINGS))
        if unknown:
            raise TypeError(f"not a device reading: {', '.join(unknown)} (expected some of {', '.join(READINGS)})")
        with self._lock:
            self._readings.update(readings)

    def sample(self) -> DeviceState:
        now = self._clock()
        with self._lock:
            values = {name: value(now) if callable(value) else value for name, value in self._readings.items()}
            self.samples += 1
        return replace(DeviceState(taken_at=now), **values)

    def latest(self, max_age_s: float | None = None) -> DeviceState:
        """Scripted readings are always current, so this is :meth:`sample`."""
        return self.sample()


class FakeProbes:
    """:class:`~edge_agent.device.probes.Probes` with settable readings (attributes).

    A reading set to an exception instance is raised when read, e.g.
    ``probes.temperature = OSError("EIO")``.
    """

    def __init__(
        self,
        *,
        power: PowerReading | Exception | None = None,
        temperature: float | Exception | None = None,
        cpu: float | Exception | None = None,
        memory: MemoryReading | Exception | None = None,
        disk_free: int | Exception | None = None,
        network: NetworkState | Exception | None = None,
    ) -> None:
        self.power_reading = power if power is not None else PowerReading()
        self.temperature = temperature
        self.cpu = cpu
        self.memory_reading = memory if memory is not None else MemoryReading()
        self.disk_free = disk_free
        self.network_state = network if network is not None else NetworkState()
        #: reads per probe name, to check caching
        self.reads: dict[str, int] = {}

    def power(self) -> PowerReading:
        return self._give("power", self.power_reading)

    def temperature_c(self) -> float | None:
        return self._give("temperature_c", self.temperature)

    def cpu_load(self) -> float | None:
        return self._give("cpu_load", self.cpu)

    def memory(self) -> MemoryReading:
        return self._give("memory", self.memory_reading)

    def disk_free_bytes(self) -> int | None:
        return self._give("disk_free_bytes", self.disk_free)

    def network(self) -> NetworkState:
        return self._give("network", self.network_state)

    def _give(self, name: str, value: T | Exception) -> T:
        self.reads[name] = self.reads.get(name, 0) + 1
        if isinstance(value, Exception):
            raise value
        return value
