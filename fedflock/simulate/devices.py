"""Simulated devices: a real :class:`~edge_agent.agent.Agent` with simulated sensors and compute.

Thousands of agents share one process, so what each would own alone is shared here:

* :class:`SessionPool`: one set of onnxruntime sessions per bundle for every agent of the process
  (``InferenceSession.run`` is thread-safe), opened at the first training, and a semaphore of
  ``slots`` so at most that many devices compute at once (the rest queue, as CPUs would).
* :class:`SimTrainer`: an :class:`OrtTrainer` on the pool's sessions; after the real training it
  sleeps (injected ``sleep``) for ``(compute_factor - 1)`` times the compute time, and with the
  profile's dropout probability cuts its connection halfway through that sleep (the broker
  publishes the will; the result is uploaded after the reconnect, late).
* one :class:`~edge_agent.transport.hub.ClientHub` network thread for every MQTT connection.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from edge_agent.agent import Agent, AgentConfig
from edge_agent.data import Dataset
from edge_agent.device.fake import ScriptedMonitor
from edge_agent.errors import TransportError
from edge_agent.presence import offline_will, online_birth
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer, Sessions, TrainResult
from edge_agent.transport.hub import ClientHub
from edge_agent.transport.mqtt import MqttConfig, MqttTransport
from fedflock.simulate.mixes import SimDeviceSpec
from fedflock.simulate.profiles import SimClock, battery_percent, charging_at, network_at, temperature_at

__all__ = ["DeviceCounters", "SessionPool", "SimDevice", "SimTrainer", "build_device"]


class SessionPool:
    """One bundle's onnxruntime sessions for every device of a process, and ``slots`` to compute."""

    def __init__(self, bundle: Bundle, *, slots: int = 1, threads: int = 1) -> None:
        self.bundle = bundle
        self._threads = threads
        self._lock = threading.Lock()
        self._sessions: Sessions | None = None
        self._slots = threading.BoundedSemaphore(slots)
        self._template: OrtTrainer | None = None

    def sessions(self) -> Sessions:
        with self._lock:
            if self._sessions is None:
                self._template = OrtTrainer.open(self.bundle, threads=self._threads)
                self._sessions = self._template._runners()  # the sessions OrtTrainer.open built
            return self._sessions

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._slots:
            yield


@dataclass
class DeviceCounters:
    """What the simulator counts per process, beyond the hub's connection and byte counters."""

    trained: int = 0
    compute_s: float = 0.0
    slowdown_s: float = 0.0
    #: wall-clock times of mid-task dropouts (the coordinator assigns them to rounds)
    dropouts: list[float] = field(default_factory=list)
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, compute_s: float, slowdown_s: float) -> None:
        with self._lock:
            self.trained += 1
            self.compute_s += compute_s
            self.slowdown_s += slowdown_s

    def dropped(self, at: float) -> None:
        with self._lock:
            self.dropouts.append(at)

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "trained": self.trained,
                "compute_s": self.compute_s,
                "slowdown_s": self.slowdown_s,
                "dropouts": list(self.dropouts),
                "errors": self.errors,
            }


class SimTrainer(OrtTrainer):
    """An :class:`OrtTrainer` on a :class:`SessionPool`, slowed and dropped out per its profile."""

    def __init__(
        self,
        pool: SessionPool,
        *,
        compute_factor: float,
        dropout: float,
        on_dropout: Callable[[], None],
        counters: DeviceCounters,
        rng: random.Random,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(pool.bundle, pool.sessions)
        self._pool = pool
        self._factor = compute_factor
        self._dropout = dropout
        self._on_dropout = on_dropout
        self._counters = counters
        self._rng = rng
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep

    def train(self, *args: Any, **kwargs: Any) -> TrainResult:
        with self._pool.slot():
            started = self._clock()
            result = super().train(*args, **kwargs)
            compute = self._clock() - started
        slowdown = (self._factor - 1.0) * compute
        drops = self._rng.random() < self._dropout
        self._sleep(slowdown / 2)
        if drops:
            self._counters.dropped(self._wall_clock())
            self._on_dropout()
        self._sleep(slowdown / 2)
        self._counters.add(compute_s=compute, slowdown_s=slowdown)
        return result


@dataclass
class SimDevice:
    """One simulated device and the driver's bookkeeping for it."""

    spec: SimDeviceSpec
    agent: Agent
    transport: MqttTransport
    trainer: SimTrainer
    queued: bool = False
    pending: bool = False
    run_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True, kw_only=True)
class DeviceSettings:
    """What every device of a run shares (from the worker's start message)."""

    host: str
    port: int
    topics: Topics
    seed: int
    reconnect: dict[str, Any]
    keepalive: int = 60


def build_device(
    spec: SimDeviceSpec,
    data: Dataset,
    *,
    settings: DeviceSettings,
    hub: ClientHub,
    pool: SessionPool,
    clock: SimClock,
    counters: DeviceCounters,
    on_inbound: Callable[[], None],
) -> SimDevice:
    """A device's agent, transport (on ``hub``) and trainer; nothing connects yet."""
    device_id, topics, profile = spec.device_id, settings.topics, spec.profile
    config = MqttConfig(
        host=settings.host,
        port=settings.port,
        client_id=device_id,
        keepalive=settings.keepalive,
        protocol="5",
        will=offline_will(device_id, topics),
        birth=online_birth(device_id, pool.bundle.digest, len(data), topics, device_class=profile.device_class),
        **settings.reconnect,
    )
    rng = random.Random(settings.seed * 1_000_003 + spec.index)
    transport = MqttTransport(config, hub=hub, rng=random.Random(rng.getrandbits(64)), on_inbound=on_inbound)

    def drop_out() -> None:
        try:
            transport.drop_connection(hold_s=profile.dropout_hold_s)
        except TransportError:  # the transport closed under us: the run is ending
            counters.error()

    trainer = SimTrainer(
        pool,
        compute_factor=profile.compute_factor,
        dropout=profile.dropout,
        on_dropout=drop_out,
        counters=counters,
        rng=random.Random(rng.getrandbits(64)),
    )
    battery, network, thermal = profile.battery, profile.network, profile.thermal
    memory = int(profile.memory_mb * (1 << 20))
    monitor = ScriptedMonitor(
        clock=clock.now,
        battery_percent=lambda t: battery_percent(battery, t),
        charging=lambda t: charging_at(battery, t),
        temperature_c=lambda t: temperature_at(thermal, charging_at(battery, t), t),
        network=lambda t: network_at(network, t),
        memory_available_bytes=memory // 2,
        memory_total_bytes=memory,
        disk_free_bytes=8 << 30,
    )
    agent = Agent(
        AgentConfig(device_id=device_id, device_class=profile.device_class, topics=topics, seed=rng.getrandbits(31)),
        transport,
        trainer,
        data,
        monitor=monitor,
        policy=spec.policy,
        local_now=clock.local_now,
    )
    return SimDevice(spec=spec, agent=agent, transport=transport, trainer=trainer)
