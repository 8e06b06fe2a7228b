"""A zero-setup MQTT broker inside the current process, built on amqtt.

Meant for tests, demos and single-machine simulations where installing Mosquitto is a burden;
production uses Mosquitto (see ``deploy/mosquitto``). This is the only module importing amqtt.

amqtt 0.12 facts this relies on (read in its source): ``Broker.__init__`` needs a running event
loop, so the broker is built inside its own loop on a daemon thread; it speaks MQTT 3.1.1 only;
without an auth plugin every client is refused, so ``AnonymousAuthPlugin`` is configured
explicitly; the default plugin set (event/packet loggers, ``$SYS`` publisher) is left out; with
port 0 the OS picks the port, which is read back from the listening socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from types import TracebackType
from typing import Any

from amqtt.broker import Broker

from edge_agent.errors import TransportError

__all__ = ["EmbeddedBroker"]

_log = logging.getLogger(__name__)
_NOISY_LOGGERS = ("amqtt", "transitions")
_LISTENER = "default"


class EmbeddedBroker:
    """amqtt broker on ``host:port`` running in a background thread; also a context manager.

    Anonymous clients are allowed, nothing is persisted, and it listens on ``host`` only
    (loopback by default). No I/O happens before :meth:`start`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise TransportError("embedded broker is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self._host}:{self.port}"

    def start(self) -> None:
        """Start serving; returns once the listener accepts connections, else raises TransportError."""
        if self._thread is not None:
            raise TransportError("embedded broker already started")
        _quiet_amqtt_logging()
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="fedflock-embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            self.stop()
            raise TransportError(f"embedded broker did not start within {self._start_timeout}s")
        if self._error is not None:
            error = self._error
            self._thread.join(self._stop_timeout)
            self._thread = None
            raise TransportError(
                f"embedded broker failed to start on {self._host}:{self._requested_port}: {error}"
            ) from error

    def stop(self) -> None:
        """Shut the broker down; bounded by ``stop_timeout`` so a stuck client cannot hang us."""
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None:
            return
        if loop is not None and stop_requested is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join(self._stop_timeout + 1.0)
        if thread.is_alive():
            _log.warning("embedded broker thread did not exit within %.1fs; abandoning it", self._stop_timeout)
        self._thread = None
        self._port = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            # asyncio.run also cancels the per-client tasks amqtt leaves behind after shutdown.
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); a daemon thread has nobody else to tell
            self._error = exc
        finally:
            self._loop = None
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        broker = Broker(self._config())
        await broker.start()
        try:
            self._port = _bound_port(broker)
            self._ready.set()
            await self._stop_requested.wait()
        finally:
            try:
                await asyncio.wait_for(broker.shutdown(), self._stop_timeout)
            except Exception:  # incl. timeout; we are shutting down anyway, so log and go on
                _log.warning("embedded broker did not shut down cleanly", exc_info=True)

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {_LISTENER: {"type": "tcp", "bind": _bind_address(self._host, self._requested_port)}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bound_port(broker: Broker) -> int:
    """The port the listener actually bound (differs from the config when it asked for 0).

    amqtt exposes no public accessor, so this reads its listener table; failing loudly here is
    better than handing out a wrong URL.
    """
    server = broker._servers[_LISTENER].instance  # private: amqtt has no public accessor
    sockets = getattr(server, "sockets", None)
    if not sockets:
        raise TransportError("amqtt listener has no bound socket")
    return int(sockets[0].getsockname()[1])


def _quiet_amqtt_logging() -> None:
    """amqtt logs every connection and packet at INFO; keep WARNING unless the user chose a level."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
