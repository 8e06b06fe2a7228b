"""The resource monitor: turns the device's probes into :class:`DeviceState` snapshots.

:meth:`ResourceMonitor.sample` reads every probe now; :meth:`ResourceMonitor.latest` reuses the
last sample while it is young enough. :meth:`ResourceMonitor.start` adds a daemon thread that
samples every ``interval_s`` so ``latest()`` never waits on sysfs or nmcli.

A probe that fails (``OSError``, ``ValueError``, :class:`psutil.Error`) yields ``None`` for its
reading(s); the first failure of each probe is logged as a warning on ``fedflock.device``, later
ones at debug level. Sampling never raises for a sensor problem.

Known limitation: the first sample's ``cpu_load`` is ``None`` (the CPU meter needs two readings).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar, runtime_checkable

from edge_agent.device.network import NetworkConfig, NetworkProbe
from edge_agent.device.probes import PROBE_ERRORS, MemoryReading, PowerReading, Probes, SystemProbes
from edge_agent.device.state import DeviceState, NetworkState
from edge_agent.errors import ConfigError

log = logging.getLogger("fedflock.device")

T = TypeVar("T")

#: ``wait(stop, timeout_s)`` blocks up to ``timeout_s`` and returns ``True`` once ``stop`` is set.
WaitFn = Callable[[threading.Event, float], bool]


@runtime_checkable
class Monitor(Protocol):
    """What the agent and its policies read device state from."""

    def sample(self) -> DeviceState:
        """A fresh reading of every sensor."""
        ...

    def latest(self, max_age_s: float | None = None) -> DeviceState:
        """A reading no older than ``max_age_s`` (default: the monitor's interval)."""
        ...


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    #: background sampling period, and the default freshness of :meth:`ResourceMonitor.latest`
    interval_s: float = 30.0
    #: filesystem whose free space is reported; ``None`` (nothing persisted) reports ``None``
    state_dir: Path | None = None
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ConfigError(f"interval_s must be > 0, got {self.interval_s}")


def _wait_on_event(stop: threading.Event, timeout_s: float) -> bool:
    return stop.wait(timeout_s)


class ResourceMonitor:
    """:class:`Monitor` over real (or injected) probes; no I/O until the first sample.

    Without ``probes`` it reads this machine through :class:`SystemProbes` with the config's
    ``state_dir`` and ``network``; injected probes carry their own settings.

    Used as a context manager it starts the background sampler and closes it on exit.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        probes: Probes | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        wait: WaitFn = _wait_on_event,
    ) -> None:
        self.config = config if config is not None else MonitorConfig()
        if probes is None:
            network = NetworkProbe(self.config.network)
            probes = SystemProbes(state_dir=self.config.state_dir, network=network)
        self._probes = probes
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._wait = wait
        self._lock = threading.Lock()
        self._cached: tuple[float, DeviceState] | None = None
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- sampling ------------------------------------------------------------------------------

    def sample(self) -> DeviceState:
        with self._lock:
            return self._sample_locked()

    def latest(self, max_age_s: float | None = None) -> DeviceState:
        limit = self.config.interval_s if max_age_s is None else max_age_s
        with self._lock:
            if self._cached is not None and self._monotonic() - self._cached[0] <= limit:
                return self._cached[1]
            return self._sample_locked()

    def _sample_locked(self) -> DeviceState:
        taken_at = self._wall_clock()
        probes = self._probes
        power = self._read("power", probes.power) or PowerReading()
        memory = self._read("memory", probes.memory) or MemoryReading()
        state = DeviceState(
            taken_at=taken_at,
            battery_percent=power.battery_percent,
            charging=power.charging,
            cpu_load=self._read("cpu_load", probes.cpu_load),
            memory_available_bytes=memory.available_bytes,
            memory_total_bytes=memory.total_bytes,
            temperature_c=self._read("temperature_c", probes.temperature_c),
            disk_free_bytes=self._read("disk_free_bytes", probes.disk_free_bytes),
            network=self._read("network", probes.network) or NetworkState(),
        )
        self._cached = (self._monotonic(), state)
        return state

    def _read(self, name: str, probe: Callable[[], T]) -> T | None:
        try:
            return probe()
        except PROBE_ERRORS as exc:
            self._report_failure(name, exc)
            return None

    def _report_failure(self, name: str, exc: Exception) -> None:
        if name in self._failed:
            log.debug("device probe %s failed again: %s", name, exc)
            return
        self._failed.add(name)
        log.warning("device probe %s failed, reporting it as unknown: %s: %s", name, type(exc).__name__, exc)

    # --- background sampler --------------------------------------------------------------------

    def start(self) -> None:
        """Start the daemon sampling thread (no-op when it is already running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fedflock-device-monitor", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the sampling thread and wait up to ``timeout_s`` for it; safe to call twice."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a bug, not a sensor: keep the sampler alive and make it visible
                log.exception("device sampling failed")
            if self._wait(self._stop, self.config.interval_s):
                return

    def __enter__(self) -> ResourceMonitor:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
