"""Drive many agents with a few threads instead of one ``Agent.run`` thread each.

``Agent.run`` is a loop of ``receive(timeout)`` → ``handle_payload`` or ``tick``; with thousands
of agents in a process that is thousands of threads polling. The driver keeps the same two
entry points and calls them only when there is something to do:

* a device whose transport queued a message (its ``on_inbound`` hook, on the hub thread) is
  put on the ready queue; a worker thread drains its inbox through ``agent.handle_payload``;
* every device is ticked every ``tick_s`` (spread evenly over the interval): upload retries,
  eligibility re-checks, purges, as ``Agent.run`` does when idle.

A device is driven by one thread at a time (``run_lock``); a message that arrives while it is
busy marks it ``pending`` and the busy thread goes round once more. Chunked uploads (a result
larger than the agent's ``chunk_bytes``) also work, as the agent pumps its own transport while
it waits; re-sending stalled chunks (``Agent.run``'s ``TransferLink.poll``) is not driven here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from edge_agent.errors import FedflockError
from fedflock.simulate.devices import DeviceCounters, SimDevice

__all__ = ["AgentDriver"]

log = logging.getLogger("fedflock.simulate")


class AgentDriver:
    """``threads`` worker threads and one ticker thread over ``devices``."""

    def __init__(
        self,
        *,
        threads: int,
        tick_s: float,
        counters: DeviceCounters,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threads_wanted = threads
        self._tick_s = tick_s
        self._counters = counters
        self._clock = clock
        self._devices: list[SimDevice] = []
        self._ready: queue.SimpleQueue[SimDevice | None] = queue.SimpleQueue()
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, devices: Sequence[SimDevice]) -> None:
        self._devices = list(devices)
        for number in range(self._threads_wanted):
            thread = threading.Thread(target=self._work, name=f"sim-driver-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        ticker = threading.Thread(target=self._tick_all, name="sim-ticker", daemon=True)
        ticker.start()
        self._threads.append(ticker)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for _ in range(self._threads_wanted):
            self._ready.put(None)
        deadline = self._clock() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - self._clock()))

    def schedule(self, device: SimDevice) -> None:
        """Ask for ``device`` to be driven soon (any thread; cheap)."""
        with self._state:
            if device.queued:
                return
            device.queued = True
        self._ready.put(device)

    def _tick_all(self) -> None:
        """Schedule every device once per ``tick_s``, in slices spread over the interval."""
        slice_s = 0.05
        position = 0
        while not self._stop.wait(slice_s):
            devices = self._devices
            if not devices:
                continue
            count = max(1, round(len(devices) * slice_s / self._tick_s))
            for _ in range(count):
                self.schedule(devices[position % len(devices)])
                position += 1

    def _work(self) -> None:
        while (device := self._ready.get()) is not None:
            with self._state:
                device.queued = False
                if not device.run_lock.acquire(blocking=False):
                    device.pending = True  # the thread driving it goes round once more
                    continue
            try:
                self._drive(device)
            finally:
                device.run_lock.release()

    def _drive(self, device: SimDevice) -> None:
        while not self._stop.is_set():
            with self._state:
                device.pending = False
            self._step(device)
            with self._state:
                if not device.pending:
                    return

    def _step(self, device: SimDevice) -> None:
        agent = device.agent
        try:
            handled = False
            while (inbound := device.transport.receive(timeout=0)) is not None:
                agent.handle_payload(inbound.payload)  # ticks after a TASK
                handled = True
            if not handled:
                agent.tick()
        except FedflockError as exc:  # a lost connection while publishing, say: the next tick retries
            self._counters.error()
            log.debug("%s: %s", device.spec.device_id, exc)
        except Exception:  # a bug in one simulated device must not stop the others; it is counted
            self._counters.error()
            log.exception("%s: agent step failed", device.spec.device_id)
