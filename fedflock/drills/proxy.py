"""A fault-injecting TCP proxy: put it between MQTT clients and the broker.

Usage::

    plan = seeded_plan(7, connections=20, trigger=b"drill/v1/devices/")
    with FaultProxy(("127.0.0.1", broker.port), plan) as proxy:
        url = proxy.url            # give this to the devices instead of the broker's
        ...
        proxy.stats()              # connections, faults fired, bytes passed

Every accepted connection gets the next fault of the plan (:mod:`fedflock.drills.plans` decides
what happens to each chunk; this module only moves bytes). Two threads per connection, one per
direction; a cut closes both sockets. Not for production traffic: a test and benchmark tool.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from edge_agent.errors import TransportError
from fedflock.drills.plans import DIRECTIONS, Fault, FaultPlan, decide

__all__ = ["FaultProxy", "ProxyStats"]

log = logging.getLogger("fedflock.drills")

_CHUNK = 65536


@dataclass
class ProxyStats:
    """Counters over the proxy's life (read with :meth:`FaultProxy.stats`)."""

    connections: int = 0
    faults_fired: int = 0
    cuts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    fired: list[str] = field(default_factory=list)


class _Link:
    """One proxied connection: two sockets, one fault, a hold shared by both directions."""

    def __init__(self, index: int, client: socket.socket, upstream: socket.socket, fault: Fault | None) -> None:
        self.index = index
        self.sockets = {"up": upstream, "down": client}  # where each direction writes
        self.sources = {"up": client, "down": upstream}
        self.fault = fault
        self.passed = dict.fromkeys(DIRECTIONS, 0)
        self.hold_until: float | None = None
        self.hold_scope: tuple[str, ...] = ()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.fired = False
        self.cut = False

    def close(self) -> None:
        self.closed.set()
        for sock in self.sockets.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """Listens on ``listen_host``:free port and forwards to ``upstream`` through ``plan``."""

    def __init__(
        self,
        upstream: tuple[str, int],
        plan: FaultPlan | None = None,
        *,
        listen_host: str = "127.0.0.1",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.upstream = upstream
        self.plan = plan if plan is not None else FaultPlan()
        self._listen_host = listen_host
        self._clock, self._sleep = clock, sleep
        self._server: socket.socket | None = None
        self._links: list[_Link] = []
        self._stats = ProxyStats()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"mqtt://{self._listen_host}:{self.port}"

    def start(self) -> None:
        try:
            self._server = socket.create_server((self._listen_host, 0))
        except OSError as exc:
            raise TransportError(f"drill proxy cannot listen on {self._listen_host}: {exc}") from exc
        self.port = int(self._server.getsockname()[1])
        threading.Thread(target=self._accept, name="drill-proxy-accept", daemon=True).start()

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                connections=self._stats.connections,
                faults_fired=self._stats.faults_fired,
                cuts=self._stats.cuts,
                bytes_up=self._stats.bytes_up,
                bytes_down=self._stats.bytes_down,
                fired=list(self._stats.fired),
            )

    def cut_all(self) -> int:
        """Cut every open connection now (a broker restart as the clients see it); how many."""
        with self._lock:
            links = [link for link in self._links if not link.closed.is_set()]
        for link in links:
            link.close()
        return len(links)

    def close(self) -> None:
        self._closed.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
        self.cut_all()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- threads -------------------------------------------------------------------------------

    def _accept(self) -> None:
        server = self._server
        assert server is not None
        while not self._closed.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the broker is down: the client sees a refused/closed connection
                continue
            with self._lock:
                index = self._stats.connections
                self._stats.connections += 1
                link = _Link(index, client, upstream, self.plan.for_connection(index))
                self._links.append(link)
            for direction in DIRECTIONS:
                threading.Thread(
                    target=self._pump, args=(link, direction), name=f"drill-proxy-{index}-{direction}", daemon=True
                ).start()

    def _pump(self, link: _Link, direction: str) -> None:
        source, sink = link.sources[direction], link.sockets[direction]
        while not link.closed.is_set():
            try:
                chunk = source.recv(_CHUNK)
            except OSError:
                break
            if not chunk:
                break
            if not self._pass(link, direction, chunk, sink):
                break
        link.close()

    def _pass(self, link: _Link, direction: str, chunk: bytes, sink: socket.socket) -> bool:
        """Apply the plan to one chunk; False when the connection is to be cut."""
        now = self._clock()
        with link.lock:
            held = link.hold_until if direction in link.hold_scope else None
            action = decide(link.fault, direction, chunk, link.passed[direction], now, held)
            if action.hold_until is not None:
                link.hold_until, link.hold_scope = action.hold_until, action.hold_scope
                timer = threading.Timer(max(action.hold_until - now, 0.0), self._cut, args=(link,))
                timer.daemon = True
                timer.start()
        if action.hold_until is not None or (action.close and held is None) or action.wait_s:
            self._fired(link)
        if action.wait_s:
            self._sleep(action.wait_s)
        if action.forward:
            try:
                sink.sendall(chunk[: action.forward])
            except OSError:
                return False
            with link.lock:
                link.passed[direction] += action.forward
            with self._lock:
                if direction == "up":
                    self._stats.bytes_up += action.forward
                else:
                    self._stats.bytes_down += action.forward
        if action.close:
            self._cut(link)
        return not action.close

    def _cut(self, link: _Link) -> None:
        """Close ``link`` because of its fault (counted once per connection)."""
        with link.lock:
            first, link.cut = not link.cut, True
        if first and not link.closed.is_set():
            with self._lock:
                self._stats.cuts += 1
        link.close()

    def _fired(self, link: _Link) -> None:
        """Count ``link``'s fault as fired (once per connection) and log it."""
        with link.lock:
            first, link.fired = not link.fired, True
        if not first or link.fault is None:
            return
        what = f"connection {link.index}: {link.fault.describe()}"
        with self._lock:
            self._stats.faults_fired += 1
            self._stats.fired.append(what)
        log.info("drill proxy: %s", what)
