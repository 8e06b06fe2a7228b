"""OpsServer over a real loopback socket: every endpoint, the error paths, and its lifecycle."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from typing import Any

import pytest

from broker_server.ops.metrics import ServerMetrics
from broker_server.ops.web import OpsApp, OpsServer, json_safe, load_assets
from edge_agent.errors import ConfigError
from tests.broker_server.ops.test_prometheus import parse_exposition
from tests.broker_server.ops.test_status import round_result, sample_status


class Fake:
    """What the endpoint serves; tests swap the callables' behaviour while it runs."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = sample_status()
        self.status_error: Exception | None = None
        self.ready = True
        self.ready_error: Exception | None = None

    def status(self) -> dict[str, Any]:
        if self.status_error is not None:
            raise self.status_error
        return self.document

    def is_ready(self) -> bool:
        if self.ready_error is not None:
            raise self.ready_error
        return self.ready


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def metrics() -> ServerMetrics:
    return ServerMetrics()


@pytest.fixture
def ops(fake: Fake, metrics: ServerMetrics) -> Iterator[OpsServer]:
    server = OpsServer(port=0, metrics=metrics, status=fake.status, ready=fake.is_ready)
    server.start()
    try:
        yield server
    finally:
        server.close()


def fetch(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def test_metrics_endpoint_serves_the_live_exposition(ops: OpsServer, metrics: ServerMetrics) -> None:
    status, headers, body = fetch(ops.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert parse_exposition(body.decode())["fedflock_bytes_sent_total"].value() == 0
    metrics.bytes_sent(42)
    metrics.round_finished(round_result(1, accuracy=0.9))
    families = parse_exposition(fetch(ops.url + "/metrics")[2].decode())
    assert families["fedflock_bytes_sent_total"].value() == 42
    assert families["fedflock_rounds_total"].value(outcome="completed") == 1


def test_status_api_serves_the_callables_document_as_strict_json(ops: OpsServer, fake: Fake) -> None:
    fake.document = sample_status(rounds=[round_result(1, accuracy=math.nan), round_result(2, accuracy=0.5)])
    status, headers, body = fetch(ops.url + "/api/status?refresh=1")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    document = json.loads(body, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert [r["test_accuracy"] for r in document["rounds"]] == [None, 0.5]  # NaN became null
    assert document["devices"] == json_safe(fake.document["devices"])


def test_a_failing_status_callable_gives_500_and_the_endpoint_keeps_serving(ops: OpsServer, fake: Fake) -> None:
    fake.status_error = RuntimeError("registry is being rebuilt")
    status, headers, body = fetch(ops.url + "/api/status")
    assert status == 500 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "error": {"code": "status_unavailable", "message": "RuntimeError: registry is being rebuilt"}
    }
    fake.status_error = None
    fake.document = {"not": {"json": object()}}
    assert fetch(ops.url + "/api/status")[0] == 500  # unserializable: an error, not a broken response
    fake.document = sample_status()
    assert fetch(ops.url + "/api/status")[0] == 200
    assert fetch(ops.url + "/healthz")[0] == 200


def test_health_and_readiness_probes(ops: OpsServer, fake: Fake) -> None:
    assert fetch(ops.url + "/healthz")[::2] == (200, b"ok\n")
    assert fetch(ops.url + "/readyz")[::2] == (200, b"ready\n")
    fake.ready = False
    assert fetch(ops.url + "/readyz")[::2] == (503, b"not ready\n")
    fake.ready_error = RuntimeError("boom")
    status, _, body = fetch(ops.url + "/readyz")
    assert status == 503 and json.loads(body)["error"]["code"] == "not_ready"
    assert fetch(ops.url + "/healthz")[0] == 200  # liveness does not depend on readiness


def test_dashboard_and_its_assets_are_served_from_here(ops: OpsServer) -> None:
    status, headers, html = fetch(ops.url + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    references = re.findall(rb'(?:src|href)="([^"]*)"', html)
    assert sorted(references) == [b"static/dashboard.css", b"static/dashboard.js"]
    for path, content_type in (("/static/dashboard.js", "text/javascript"), ("/static/dashboard.css", "text/css")):
        status, headers, body = fetch(ops.url + path)
        assert status == 200 and headers["Content-Type"].startswith(content_type) and body
    js = fetch(ops.url + "/static/dashboard.js")[2].decode()
    css = fetch(ops.url + "/static/dashboard.css")[2].decode()
    # offline: nothing is loaded from elsewhere (the SVG namespace is an identifier, not a fetch)
    assert re.findall(r"https?://[^\"']+", js) == ["http://www.w3.org/2000/svg"]
    assert "http" not in css and "@import" not in css and "url(" not in css
    assert re.findall(r'fetch\("([^"]+)"', js) == ["api/status"]


@pytest.mark.parametrize("path", ["/nope", "/metrics/", "/static/../web.py", "/static/dashboard.html", "/api"])
def test_unknown_paths_are_404(ops: OpsServer, path: str) -> None:
    status, headers, body = fetch(ops.url + path)
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "not_found"


@pytest.mark.parametrize(("method", "path"), [("POST", "/metrics"), ("PUT", "/api/status"), ("DELETE", "/")])
def test_other_methods_are_405(ops: OpsServer, method: str, path: str) -> None:
    status, headers, body = fetch(ops.url + path, method=method, data=b'{"rollback": true}')
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert fetch(ops.url + "/healthz")[0] == 200


def test_head_is_get_without_a_body(ops: OpsServer) -> None:
    _, get_headers, get_body = fetch(ops.url + "/api/status")
    status, headers, body = fetch(ops.url + "/api/status", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == get_headers["Content-Length"] == str(len(get_body))


def test_a_slow_status_does_not_block_probes_or_scrapes(metrics: ServerMetrics) -> None:
    release = threading.Event()

    def slow_status() -> dict[str, Any]:
        release.wait(10)
        return {"ok": True}

    with OpsServer(metrics=metrics, status=slow_status) as ops, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(fetch, ops.url + "/api/status")
        assert fetch(ops.url + "/healthz")[0] == 200
        assert fetch(ops.url + "/metrics")[0] == 200
        assert not pending.done()
        release.set()
        assert pending.result(timeout=10)[::2] == (200, b'{"ok":true}')


def test_concurrent_requests_all_succeed(ops: OpsServer) -> None:
    paths = ["/metrics", "/api/status", "/healthz", "/"] * 10
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda p: fetch(ops.url + p)[0], paths))
    assert statuses == [200] * len(paths)


def test_lifecycle_port_zero_close_and_rebind(metrics: ServerMetrics) -> None:
    ops = OpsServer(metrics=metrics, status=dict)
    with pytest.raises(RuntimeError, match="not started"):
        _ = ops.port  # the constructor did not bind anything
    ops.start()
    port = ops.port
    assert port > 0 and ops.host == "127.0.0.1" and ops.url == f"http://127.0.0.1:{port}"
    with pytest.raises(RuntimeError, match="already started"):
        ops.start()
    with pytest.raises(ConfigError, match="cannot listen"):
        OpsServer(port=port, metrics=metrics, status=dict).start()
    ops.close()
    ops.close()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    again = OpsServer(port=port, metrics=metrics, status=dict)
    again.start()  # the port was released
    try:
        assert fetch(again.url + "/healthz")[0] == 200
    finally:
        again.close()


def test_invalid_port_is_a_config_error(metrics: ServerMetrics) -> None:
    with pytest.raises(ConfigError):
        OpsServer(port=70000, metrics=metrics, status=dict)


def test_routing_without_sockets(metrics: ServerMetrics) -> None:
    calls: list[str] = []

    def status() -> dict[str, Any]:
        calls.append("status")
        return {"x": (1, math.inf)}

    app = OpsApp(metrics=metrics, status=status, ready=lambda: True, assets=load_assets())
    response = app.handle("GET", "/api/status")
    assert (response.status, response.body) == (200, b'{"x":[1,null]}')
    assert app.handle("POST", "/api/status").status == 405
    assert calls == ["status"]  # a refused method does not run the callable
    assert app.handle("GET", "/static/dashboard.js").body.startswith(b"// fedflock dashboard")
