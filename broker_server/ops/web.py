"""The operations HTTP endpoint: Prometheus metrics, a JSON status API, probes and the dashboard.

:class:`OpsServer` serves, from a stdlib ``ThreadingHTTPServer`` on a daemon thread:

==================  ==================================================================================
``GET /metrics``    :meth:`ServerMetrics.render`, ``text/plain; version=0.0.4``
``GET /api/status`` the ``status`` callable's document as JSON (:mod:`broker_server.ops.status`)
``GET /healthz``    liveness: 200 while the endpoint serves
``GET /readyz``     readiness: 200 if the ``ready`` callable says so, else 503 (also if it raises)
``GET /``           the dashboard (``/static/dashboard.js`` and ``.css``, all served from here)
==================  ==================================================================================

``HEAD`` is answered like ``GET`` without a body (HTTP requires it of general-purpose servers,
and ``curl -I`` uses it). An unknown path is 404 (any method); another method on a known path is
405 with ``Allow: GET, HEAD``. Errors are JSON ``{"error": {"code": ..., "message": ...}}``. A
``status`` callable that raises gives a 500 and is logged; the endpoint keeps serving.

The ``status`` and ``ready`` callables run on the HTTP threads, concurrently with the server's
loop: they must read state safely (copies, or a snapshot the loop publishes). Non-finite floats in
the status document become ``null`` (browsers' ``JSON.parse`` rejects ``NaN``).

Routing (:class:`OpsApp`) is pure and testable without sockets; :class:`OpsServer` only adds the
listening socket and the thread, in :meth:`OpsServer.start` (the constructor does no I/O).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from broker_server.ops.metrics import ServerMetrics
from broker_server.ops.prometheus import CONTENT_TYPE as METRICS_CONTENT_TYPE
from edge_agent.errors import ConfigError

__all__ = ["ASSETS", "OpsApp", "OpsServer", "Response", "json_safe", "load_assets"]

log = logging.getLogger("fedflock.ops")

#: URL path -> (file under broker_server/ops/static, content type)
ASSETS: Mapping[str, tuple[str, str]] = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_ALLOW = "GET, HEAD"
_COMMON_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    # everything the dashboard needs comes from this origin: it works offline and cannot be
    # made to load or run anything else (device-reported text included)
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
)
#: seconds between checks for close(): how long close() may wait for the serving thread
_POLL_S = 0.05
#: a request body we discard (405) is read up to this size so the client sees our answer
_MAX_DISCARD = 64 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None, tuples as lists and mapping keys as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _json(status: int, document: Any, *headers: tuple[str, str]) -> Response:
    body = json.dumps(json_safe(document), allow_nan=False, separators=(",", ":")).encode()
    return Response(status, _JSON, body, (("Cache-Control", "no-store"), *headers))


def _error(status: int, code: str, message: str, *headers: tuple[str, str]) -> Response:
    return _json(status, {"error": {"code": code, "message": message}}, *headers)


def load_assets() -> dict[str, bytes]:
    """The dashboard's files (package data), by file name; ConfigError if they are not installed."""
    folder = resources.files("broker_server.ops").joinpath("static")
    try:
        return {name: folder.joinpath(name).read_bytes() for name, _ in ASSETS.values()}
    except OSError as exc:
        raise ConfigError(
            f"the dashboard's files are missing ({exc}); broker_server/ops/static/* must be installed as package data"
        ) from exc


class OpsApp:
    """Maps ``(method, target)`` to a :class:`Response`; no sockets, no threads."""

    def __init__(
        self,
        *,
        metrics: ServerMetrics,
        status: Callable[[], Mapping[str, Any]],
        ready: Callable[[], bool],
        assets: Mapping[str, bytes],
    ) -> None:
        self._metrics = metrics
        self._status = status
        self._ready = ready
        self._assets = assets
        self._routes: dict[str, Callable[[], Response]] = {
            "/metrics": self._get_metrics,
            "/api/status": self._get_status,
            "/healthz": lambda: Response(200, _TEXT, b"ok\n", (("Cache-Control", "no-store"),)),
            "/readyz": self._get_ready,
        }
        for path, (name, content_type) in ASSETS.items():
            self._routes[path] = self._asset(name, content_type)

    def handle(self, method: str, target: str) -> Response:
        path = urlsplit(target).path
        route = self._routes.get(path)
        if route is None:
            return _error(404, "not_found", f"no such path: {path[:200]}")
        if method not in ("GET", "HEAD"):
            return _error(405, "method_not_allowed", f"{method} is not allowed here", ("Allow", _ALLOW))
        try:
            return route()
        except Exception as exc:  # an ops page must never take the endpoint down
            log.exception("GET %s failed", path)
            return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    def _get_metrics(self) -> Response:
        return Response(200, METRICS_CONTENT_TYPE, self._metrics.render().encode(), (("Cache-Control", "no-store"),))

    def _get_status(self) -> Response:
        try:
            document = self._status()
            return _json(200, document)
        except Exception as exc:
            log.exception("the status callable failed")
            return _error(500, "status_unavailable", f"{type(exc).__name__}: {exc}")

    def _get_ready(self) -> Response:
        try:
            ready = bool(self._ready())
        except Exception as exc:
            log.exception("the readiness callable failed")
            return _error(503, "not_ready", f"{type(exc).__name__}: {exc}")
        if ready:
            return Response(200, _TEXT, b"ready\n", (("Cache-Control", "no-store"),))
        return Response(503, _TEXT, b"not ready\n", (("Cache-Control", "no-store"),))

    def _asset(self, name: str, content_type: str) -> Callable[[], Response]:
        return lambda: Response(200, content_type, self._assets[name], (("Cache-Control", "no-cache"),))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # the default backlog of 5 drops connections when a scrape, probes and browsers coincide
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: OpsApp) -> None:
        self.app = app
        super().__init__(address, _Handler)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fedflock-ops"
    sys_version = ""
    #: seconds a connection may sit idle (a slow client must not hold a thread forever)
    timeout = 10

    def _respond(self) -> None:
        if self.command not in ("GET", "HEAD"):
            self._discard_body()
        response = self.server.app.handle(self.command, self.path)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in (*_COMMON_HEADERS, *response.headers):
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= _MAX_DISCARD:
            self.rfile.read(length)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = _respond

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class OpsServer:
    """The ops endpoint on ``host:port`` (loopback by default; port 0 picks a free one)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        metrics: ServerMetrics,
        status: Callable[[], Mapping[str, Any]],
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {port}")
        self.host = host
        self._requested_port = port
        self._metrics = metrics
        self._status = status
        self._ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one chosen, when 0 was asked for); only once started."""
        if self._server is None:
            raise RuntimeError("OpsServer is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Load the dashboard, bind, and serve on a daemon thread; ConfigError if it cannot listen."""
        if self._server is not None:
            raise RuntimeError("OpsServer is already started")
        app = OpsApp(metrics=self._metrics, status=self._status, ready=self._ready, assets=load_assets())
        server_class = _Server6 if ":" in self.host else _Server
        try:
            server = server_class((self.host, self._requested_port), app)
        except OSError as exc:
            raise ConfigError(f"the ops endpoint cannot listen on {self.host}:{self._requested_port}: {exc}") from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(_POLL_S,), name="fedflock-ops-http", daemon=True
        )
        self._thread.start()
        log.info("ops endpoint on %s (metrics, status, dashboard)", self.url)

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> OpsServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
