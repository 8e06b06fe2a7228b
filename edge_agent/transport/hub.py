"""Many MQTT clients driven by one network thread: paho's external-loop API over one selector.

``MqttTransport`` normally gives each paho client its own network thread (``loop_start``). A
fleet simulator hosting thousands of devices in one process cannot afford a thread, a wake-up
socket pair and a reconnect sleep per device, so ``MqttTransport(config, hub=hub)`` hands its
client to a :class:`ClientHub` instead. The hub owns one ``selectors`` selector (epoll on Linux)
and one thread that

* reads and writes every client's socket when it is ready (``loop_read`` / ``loop_write``);
* runs ``loop_misc`` for keepalive and ping timeouts about once a second;
* reconnects lost clients at the time the transport's jittered backoff asked for (paho's own
  reconnect logic only runs inside ``loop_forever``/``loop_start``, which the hub does not use);
* counts connects, connect attempts and payload bytes, and keeps a log of connect times for the
  reconnect-storm drill.

paho calls the socket callbacks (``on_socket_open/close/register_write/unregister_write``) in
whatever thread triggered them: a ``publish`` from an agent's thread asks for a write from that
thread. Only the hub thread touches the selector, so such requests are queued and the hub is
woken through its own socket pair. Everything that opens or closes a socket (connect,
reconnect, release) runs on the hub thread (:meth:`ClientHub.call`).

This module does not import paho: it drives any object with paho's external-loop methods
(:class:`~edge_agent.transport.hub_stats.HubClient`); ``paho_client.py`` stays the only paho
importer.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edge_agent.errors import TransportError
from edge_agent.transport.hub_stats import HubClient, HubCounters, HubStats

__all__ = ["ClientHub", "HubClient", "HubLink", "HubStats"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(eq=False)
class HubLink:
    """One client's registration; the transport wires its methods into paho's socket callbacks."""

    hub: ClientHub
    client: HubClient
    on_connect_failed: Callable[[], None]
    sock: Any = None
    writing: bool = False
    connected: bool = False
    released: bool = False
    reconnect_at: float | None = None
    hold_until: float = 0.0
    seq: int = field(default=0)

    # paho socket callbacks: (client, userdata, sock)
    def socket_opened(self, client: Any, userdata: Any, sock: Any) -> None:
        self.hub._on_hub_thread(lambda: self.hub._open(self, sock))

    def socket_closed(self, client: Any, userdata: Any, sock: Any) -> None:
        self.hub._on_hub_thread(lambda: self.hub._closed(self, sock))

    def register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self.hub._want_write(self)

    def unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self.hub._on_hub_thread(lambda: self.hub._set_writing(self, False))

    # called by the transport
    def reconnect_later(self, delay_s: float) -> None:
        """Reconnect after ``delay_s`` (or when a :meth:`sever` hold ends); from paho's callbacks."""
        self.hub._on_hub_thread(lambda: self.hub._schedule(self, delay_s))

    def note_connected(self, connected: bool) -> None:
        self.hub._note_connected(self, connected)

    def count(self, *, bytes_in: int = 0, bytes_out: int = 0) -> None:
        self.hub.counters.payload(bytes_in, bytes_out)


class ClientHub:
    """One network thread for many paho clients. No I/O before :meth:`start`."""

    def __init__(
        self,
        *,
        name: str = "mqtt-hub",
        misc_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._name = name
        self._misc_interval = misc_interval_s
        self._clock = clock
        self._links: set[HubLink] = set()
        self._lock = threading.Lock()
        self._commands: deque[Callable[[], None]] = deque()
        self._pending_writes: set[HubLink] = set()
        self._timers: list[tuple[float, int, HubLink]] = []
        self._seq = itertools.count()
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        #: connects, attempts, payload bytes and the connection event log
        self.counters = HubCounters(wall_clock)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._running = True
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (release the clients first: their sockets are just closed)."""
        thread = self._thread
        if thread is None:
            return
        self._running = False
        self._wake()
        thread.join(timeout)
        self._thread = None
        for link in list(self._links):
            self._drop_socket(link)
        if self._selector is not None:
            self._selector.close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def __enter__(self) -> ClientHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API for transports -----------------------------------------------------------------

    def attach(self, client: HubClient, *, on_connect_failed: Callable[[], None]) -> HubLink:
        """Register ``client``; wire the returned link's callbacks into the client's socket callbacks."""
        if self._thread is None:
            raise TransportError(f"{self._name} is not started")
        link = HubLink(self, client, on_connect_failed)
        with self._lock:
            self._links.add(link)
        return link

    def call(self, fn: Callable[[], _T], timeout: float = 30.0) -> _T:
        """Run ``fn`` on the hub thread and return its result (its exception is raised here)."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._thread is None or not self._running:
            raise TransportError(f"{self._name} is not running")
        future: Future[_T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)

        with self._lock:
            self._commands.append(run)
        self._wake()
        return future.result(timeout)

    def connect(self, link: HubLink, connect: Callable[[], object]) -> None:
        """Run paho's ``connect`` on the hub thread (it opens the socket and queues CONNECT)."""

        def run() -> None:
            link.released = False
            self.counters.event("attempt")
            connect()

        self.call(run)

    def release(self, link: HubLink, timeout: float = 5.0) -> None:
        """Send DISCONNECT (if connected), close the socket and forget the client."""
        if self._thread is None or not self._running:
            self._drop_socket(link)
            with self._lock:
                self._links.discard(link)
            return
        self.call(lambda: self._release(link), timeout)

    def sever(self, link: HubLink, hold_s: float) -> None:
        """Cut the connection without DISCONNECT (the broker publishes the will), as a crash or a
        lost network would, and reconnect no earlier than ``hold_s`` from now."""

        def run() -> None:
            link.hold_until = self._clock() + hold_s
            sock = link.client.socket()
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the next read sees EOF: paho's "connection lost"
                except OSError as exc:
                    _log.debug("%s: shutdown of a severed socket failed: %s", self._name, exc)

        self.call(run)

    def stats(self) -> HubStats:
        with self._lock:
            links = list(self._links)
        return self.counters.snapshot(clients=len(links), connected=sum(1 for link in links if link.connected))

    # -- internals (hub thread unless noted) -------------------------------------------------

    def _wake(self) -> None:  # any thread
        # a full pipe means a wake-up is already pending; a closed one, that the hub stopped
        if self._wake_w is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    def _on_hub_thread(self, fn: Callable[[], None]) -> None:  # any thread
        if threading.current_thread() is self._thread:
            fn()
            return
        with self._lock:
            self._commands.append(fn)
        self._wake()

    def _want_write(self, link: HubLink) -> None:  # any thread
        if threading.current_thread() is self._thread:
            self._set_writing(link, True)
            return
        with self._lock:
            self._pending_writes.add(link)
        self._wake()

    def _note_connected(self, link: HubLink, connected: bool) -> None:
        link.connected = connected
        if connected:
            self.counters.event("connect")

    def _open(self, link: HubLink, sock: Any) -> None:
        assert self._selector is not None
        stale = self._selector.get_map().get(sock.fileno())
        if stale is not None:  # a socket closed behind our back reused the descriptor
            self._selector.unregister(stale.fileobj)
        link.sock, link.writing = sock, False
        self._selector.register(sock, selectors.EVENT_READ, link)

    def _closed(self, link: HubLink, sock: Any) -> None:
        if link.connected:
            self.counters.event("lost")
        link.connected = False
        if link.sock is not sock or self._selector is None:
            return
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError) as exc:  # already gone (closed descriptor)
            _log.debug("%s: unregister of a closed socket: %s", self._name, exc)
        link.sock, link.writing = None, False

    def _set_writing(self, link: HubLink, writing: bool) -> None:
        if link.sock is None or link.writing == writing or self._selector is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        try:
            self._selector.modify(link.sock, events, link)
            link.writing = writing
        except (KeyError, ValueError) as exc:
            _log.debug("%s: cannot watch a closed socket: %s", self._name, exc)

    def _schedule(self, link: HubLink, delay_s: float) -> None:
        if link.released:
            return
        now = self._clock()
        link.reconnect_at = max(now + delay_s, link.hold_until)
        heapq.heappush(self._timers, (link.reconnect_at, next(self._seq), link))

    def _release(self, link: HubLink) -> None:
        link.released, link.reconnect_at = True, None
        if link.sock is not None:
            link.client.disconnect()
            for _ in range(3):  # a tiny DISCONNECT: one write normally does it, then paho closes
                if link.client.socket() is None:
                    break
                link.client.loop_write()
        self._drop_socket(link)
        with self._lock:
            self._links.discard(link)
            self._pending_writes.discard(link)

    def _drop_socket(self, link: HubLink) -> None:
        sock = link.sock
        if sock is None:
            return
        self._closed(link, sock)
        try:
            sock.close()
        except OSError as exc:
            _log.debug("%s: closing a socket: %s", self._name, exc)

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        next_misc = self._clock() + self._misc_interval
        while self._running:
            timeout = next_misc - self._clock()
            if self._timers:
                timeout = min(timeout, self._timers[0][0] - self._clock())
            for key, mask in selector.select(max(0.0, min(timeout, 1.0))):
                self._service(key, mask)
            self._run_commands()
            self._reconnect_due()
            if self._clock() >= next_misc:
                self._misc()
                next_misc = self._clock() + self._misc_interval

    def _service(self, key: selectors.SelectorKey, mask: int) -> None:
        link = key.data
        if link is None:
            try:
                while self._wake_r is not None and self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass  # drained
            return
        self._guarded(link, lambda: self._io(link, mask))

    def _io(self, link: HubLink, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            link.client.loop_read()
        if mask & selectors.EVENT_WRITE and link.sock is not None:
            link.client.loop_write()

    def _guarded(self, link: HubLink, fn: Callable[[], object]) -> None:
        """Run one client's I/O; a failure of one client must not stop the others."""
        try:
            fn()
        except Exception:  # paho raises untyped errors from callbacks: log them, keep serving
            _log.exception("%s: client I/O failed; dropping its connection", self._name)
            sock = link.client.socket()
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, deque()
            writes, self._pending_writes = self._pending_writes, set()
        for command in commands:
            try:
                command()
            except Exception:  # a command's own errors go to its future; this is a bug in a callback
                _log.exception("%s: a queued hub command failed", self._name)
        for link in writes:
            if link.sock is not None and not link.released:
                self._guarded(link, link.client.loop_write)
                if link.client.want_write():
                    self._set_writing(link, True)

    def _reconnect_due(self) -> None:
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            when, _, link = heapq.heappop(self._timers)
            if link.released or link.reconnect_at != when:
                continue  # released or rescheduled
            link.reconnect_at = None
            self.counters.event("attempt")
            try:
                link.client.reconnect()
            except OSError as exc:
                self.counters.event("failed")
                _log.debug("%s: reconnect failed: %s", self._name, exc)
                link.on_connect_failed()

    def _misc(self) -> None:
        with self._lock:
            links = [link for link in self._links if link.sock is not None]
        for link in links:
            self._guarded(link, link.client.loop_misc)
            if link.sock is not None and not link.writing and link.client.want_write():
                self._guarded(link, link.client.loop_write)  # a write request lost in a paho race
