"""A simulator worker process: hosts many simulated devices, talks JSON lines with the coordinator.

Run as ``python -m fedflock.simulate.worker``. The coordinator writes one JSON object per line
to its stdin and reads one per line from its stdout (nothing is pickled; logs go to stderr):

* ``{"cmd": "start", ...}`` (:class:`WorkerStart` fields) → builds and connects its devices,
  answers ``{"event": "ready", "connected": n, "failed": n, "start_s": s}``;
* ``{"cmd": "stats"}`` → ``{"event": "stats", ...}``: hub counters (connected, connects,
  attempts, payload bytes), device counters (trained, dropouts, errors), RSS and CPU seconds;
* ``{"cmd": "events", "since": t}`` → ``{"event": "events", "connect": [...], "attempt": [...],
  "lost": [...]}`` wall-clock times of connection events since ``t`` (the storm drill);
* ``{"cmd": "stop"}`` → devices closed, ``{"event": "stopped", ...stats}``, exit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from edge_agent.errors import ConfigError, FedflockError
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.hub import ClientHub
from fedflock.simulate.data import fleet_data, load_saved_digits
from fedflock.simulate.devices import DeviceCounters, DeviceSettings, SessionPool, SimDevice, build_device
from fedflock.simulate.driver import AgentDriver
from fedflock.simulate.mixes import draw_fleet, load_mix
from fedflock.simulate.profiles import SimClock

log = logging.getLogger("fedflock.simulate.worker")


@dataclass(frozen=True, kw_only=True)
class WorkerStart:
    """The ``start`` message: which devices of which fleet, and where to connect."""

    worker: int
    indices: list[int]
    mix: str
    devices: int
    seed: int
    examples: list[int]
    host: str
    port: int
    topic_prefix: str
    bundle: str
    time_scale: float
    start_hour: float
    epoch: float
    tick_s: float
    threads: int
    slots: int
    reconnect: dict[str, Any]
    digits: str
    connect_threads: int = 16

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> WorkerStart:
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in message and n != "connect_threads")
        if missing:
            raise ConfigError(f"worker start message lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in message.items() if k in names})


class Worker:
    def __init__(self, start: WorkerStart) -> None:
        self.start_message = start
        self.hub = ClientHub(name=f"sim-hub-{start.worker}")
        self.counters = DeviceCounters()
        self.driver = AgentDriver(threads=start.threads, tick_s=start.tick_s, counters=self.counters)
        self.devices: list[SimDevice] = []
        self.failed = 0

    def run_start(self) -> dict[str, Any]:
        s = self.start_message
        started = time.monotonic()
        mix = load_mix(s.mix)
        fleet = draw_fleet(mix, s.devices, s.seed)
        arrays = load_saved_digits(Path(s.digits))
        data, _ = fleet_data(s.devices, mix.alpha, s.seed, (s.examples[0], s.examples[1]), arrays=arrays)
        settings = DeviceSettings(
            host=s.host, port=s.port, topics=Topics(s.topic_prefix), seed=s.seed, reconnect=s.reconnect
        )
        pool = SessionPool(Bundle.open(s.bundle), slots=s.slots)
        clock = SimClock(time_scale=s.time_scale, start_hour=s.start_hour, epoch=s.epoch)
        self.hub.start()
        for index in s.indices:
            holder: list[SimDevice] = []
            device = build_device(
                fleet[index],
                data[index],
                settings=settings,
                hub=self.hub,
                pool=pool,
                clock=clock,
                counters=self.counters,
                on_inbound=_scheduler(self.driver, holder),
            )
            holder.append(device)
            self.devices.append(device)
        with ThreadPoolExecutor(s.connect_threads) as pool_exec:
            outcomes = list(pool_exec.map(self._start_device, self.devices))
        self.failed = outcomes.count(False)
        self.driver.start([d for d, ok in zip(self.devices, outcomes, strict=True) if ok])
        return {
            "event": "ready",
            "connected": outcomes.count(True),
            "failed": self.failed,
            "start_s": time.monotonic() - started,
        }

    def _start_device(self, device: SimDevice) -> bool:
        try:
            device.agent.start()
            return True
        except FedflockError as exc:
            log.warning("%s did not start: %s", device.spec.device_id, exc)
            return False

    def stats(self) -> dict[str, Any]:
        hub = self.hub.stats()
        times = os.times()
        return {
            "event": "stats",
            "worker": self.start_message.worker,
            "devices": len(self.devices),
            "connected": hub.connected,
            "connects": hub.connects,
            "attempts": hub.attempts,
            "failed_attempts": hub.failed_attempts,
            "bytes_in": hub.bytes_in,
            "bytes_out": hub.bytes_out,
            "rss_bytes": _rss_bytes(),
            "cpu_s": times.user + times.system,
            "upload_blocked": self._upload_blocked(),
            **self.counters.as_dict(),
        }

    def _upload_blocked(self) -> dict[str, int]:
        """Reason codes of devices that could not upload right now (the server only keeps train decisions)."""
        counts: dict[str, int] = {}
        for device in self.devices:
            gate = device.agent.gate
            for code in gate.check("upload", gate.state()).codes:
                counts[code] = counts.get(code, 0) + 1
        return counts

    def events(self, since: float) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "events", "connect": [], "attempt": [], "lost": []}
        for at, kind in self.hub.counters.events_since(since):
            out[kind].append(at)
        return out

    def stop(self) -> dict[str, Any]:
        self.driver.stop()
        with ThreadPoolExecutor(self.start_message.connect_threads) as pool_exec:
            list(pool_exec.map(_close_device, self.devices))
        stats = self.stats()
        self.hub.close()
        return {**stats, "event": "stopped"}


def _scheduler(driver: AgentDriver, holder: list[SimDevice]) -> Callable[[], None]:
    """The transport's ``on_inbound`` hook: schedule the device built after its transport."""
    return lambda: driver.schedule(holder[0])


def _close_device(device: SimDevice) -> None:
    try:
        device.agent.close()
    except FedflockError as exc:
        log.debug("%s: close: %s", device.spec.device_id, exc)


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(inbox: IO[str], outbox: IO[str]) -> int:
    """Answer the coordinator's commands until ``stop`` (or end of input)."""

    def send(message: dict[str, Any]) -> None:
        outbox.write(json.dumps(message) + "\n")
        outbox.flush()

    worker: Worker | None = None
    for line in inbox:
        message = json.loads(line)
        command = message.get("cmd")
        if command == "start":
            worker = Worker(WorkerStart.from_message(message))
            send(worker.run_start())
        elif worker is None:
            send({"event": "error", "reason": f"{command!r} before start"})
        elif command == "stats":
            send(worker.stats())
        elif command == "events":
            send(worker.events(float(message.get("since", 0.0))))
        elif command == "stop":
            send(worker.stop())
            return 0
        else:
            send({"event": "error", "reason": f"unknown command {command!r}"})
    if worker is not None:  # the coordinator went away: close cleanly anyway
        worker.stop()
    return 0


def main() -> int:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout = sys.stderr  # anything printed by a library must not corrupt the JSON lines
    level = os.environ.get("FEDFLOCK_SIM_LOG", "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return serve(sys.stdin, protocol)


if __name__ == "__main__":
    sys.exit(main())
