"""`fedflock broker --ops-port`: a real broker process serves its metrics, status and probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from broker_server.mosquitto_process import free_port

REPO = Path(__file__).resolve().parents[2]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


@pytest.mark.timeout(120)
def test_broker_serves_metrics_status_and_probes(mosquitto, digits_bundle, tmp_path) -> None:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "fedflock",
        "broker",
        "--bundle",
        str(digits_bundle.directory),
        "--mqtt-url",
        mosquitto.url,
        "--topic-prefix",
        "opsbroker/v1",
        "--rounds",
        "1",
        "--min-clients",
        "1",
        "--wait-for-clients",
        "60",
        "--out",
        str(tmp_path / "server"),
        "--ops-port",
        str(port),
    ]
    broker = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ready = 0
        while time.monotonic() < deadline and ready != 200:
            assert broker.poll() is None, broker.stdout.read() if broker.stdout else ""
            try:
                ready, _ = get(f"{base}/readyz")
            except OSError:
                ready = 0
            time.sleep(0.2)
        assert ready == 200
        code, metrics = get(f"{base}/metrics")
        assert code == 200
        assert "fedflock_model_version 0" in metrics, metrics
        # the server subscribed and announced its bundle: bytes went out through the metered transport
        sent = [line for line in metrics.splitlines() if line.startswith("fedflock_bytes_sent_total ")]
        assert sent and float(sent[0].split()[1]) > 0, metrics
        code, body = get(f"{base}/api/status")
        assert code == 200
        status = json.loads(body)
        assert status["model_version"] == 0 and status["server"]["bundle_digest"] == digits_bundle.digest, status
        assert get(f"{base}/healthz")[0] == 200
        assert get(f"{base}/no-such-page")[0] == 404
        code, page = get(f"{base}/")
        assert code == 200 and "<html" in page.lower()
    finally:
        broker.kill()
        broker.wait(timeout=20)


def _wait_for_ready(base: str, want: int, broker: subprocess.Popen[str], timeout_s: float = 60) -> int:
    deadline, code = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and code != want:
        assert broker.poll() is None, broker.stdout.read() if broker.stdout else ""
        try:
            code, _ = get(f"{base}/readyz")
        except OSError:
            code = 0
        time.sleep(0.2)
    return code


@pytest.mark.timeout(120)
def test_readyz_follows_the_broker_link(digits_bundle, tmp_path) -> None:
    from broker_server.mosquitto_process import MosquittoProcess

    mqtt = MosquittoProcess(tmp_path / "mosquitto")
    mqtt.start()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "fedflock", "broker", "--bundle", str(digits_bundle.directory)]
    cmd += ["--mqtt-url", mqtt.url, "--topic-prefix", "readyz/v1", "--rounds", "1", "--min-clients", "1"]
    cmd += ["--wait-for-clients", "90", "--out", str(tmp_path / "server"), "--ops-port", str(port)]
    broker = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert _wait_for_ready(base, 200, broker) == 200
        mqtt.kill()  # the broker goes away: not ready while the transport reconnects
        assert _wait_for_ready(base, 503, broker, timeout_s=30) == 503
        assert get(f"{base}/healthz")[0] == 200  # alive all the same
        mqtt.start()  # same port: the transport comes back by itself
        assert _wait_for_ready(base, 200, broker, timeout_s=60) == 200
    finally:
        broker.kill()
        broker.wait(timeout=20)
        mqtt.stop()
