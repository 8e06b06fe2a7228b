"""`fedflock agent --config` as a process installs a bundle announced over a real Mosquitto, and
keeps it across a SIGKILL and restart.

The in-process variants (chunking, the download gate, corrupt archives, rollback) are in
tests/edge_agent/test_agent_ota.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from broker_server.mosquitto_process import MosquittoProcess
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.protocol.messages import StatusMessage, decode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.mqtt import MqttTransport
from tests.edge_agent.ota import derive_bundle
from tests.fixtures import digits_split, write_npz
from tests.integration.test_agent_config_run import ENV, POLICY, retained_status, transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class AgentProcess:
    """``fedflock agent --config`` in ``cwd``; every start appends to one log file."""

    def __init__(self, config: Path, cwd: Path) -> None:
        self.config, self.cwd, self.log = config, cwd, cwd / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        self._out = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedflock", "agent", "--config", str(self.config)],
            cwd=self.cwd,
            env=ENV,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def stop(self, sig: int) -> int:
        assert self.process is not None and self._out is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for_status(
    server: FederatedServer, listener: MqttTransport, agent: AgentProcess, wanted: Callable[[StatusMessage], bool]
) -> StatusMessage:
    """Pump the server (it serves FETCHes) until the listener sees a STATUS that is ``wanted``
    (the agent process, if started, must stay alive meanwhile)."""
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        server.serve(0.1)
        while (inbound := listener.receive(timeout=0)) is not None:
            status = decode_message(inbound.payload)
            if isinstance(status, StatusMessage) and wanted(status):
                return status
        assert agent.process is None or agent.process.poll() is None, agent.text()
    raise AssertionError(f"no such STATUS within 45 s; agent log:\n{agent.text()}")


def test_the_agent_installs_an_announced_bundle_and_keeps_it_after_a_restart(
    mosquitto: MosquittoProcess, digits_bundle: Bundle, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    device_id, prefix = f"ota-{run}", f"otarun-{run}/v1"
    topics = Topics(prefix)
    devices, _ = digits_split(2)
    write_npz(tmp_path / "d0.npz", devices[0])
    v2_dir = derive_bundle(digits_bundle.directory, tmp_path / "v2", scale=0.5)
    v2 = Bundle.open(v2_dir).digest
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "state"\nbundle = "{digits_bundle.directory}"\n\n'
        f'[mqtt]\nurl = "{mosquitto.url}"\ntopic_prefix = "{prefix}"\n\n'
        f'[data]\nkind = "npz"\npath = "d0.npz"\n\n[agent]\nmonitor_interval_s = 1\n{POLICY}',
        encoding="utf-8",
    )
    agent = AgentProcess(config, tmp_path)
    server = FederatedServer(transport(mosquitto.url, f"ota-server-{run}"), digits_bundle, ServerConfig(topics=topics))
    listener = transport(mosquitto.url, f"ota-listener-{run}")
    listener.subscribe(topics.status(device_id), qos=1)
    listener.start()
    try:
        server.start()  # announces its own bundle as v1: the device's v0, same digest, so nothing to do
        agent.start()
        first = wait_for_status(server, listener, agent, lambda s: s.online)
        assert first.bundle_digest == digits_bundle.digest
        server.announce_model(2, v2_dir)

        installed = wait_for_status(server, listener, agent, lambda s: s.bundle_digest == v2)
        assert installed.online and installed.install["ok"] is True, installed.install
        assert installed.install["version"] == 2 and installed.install["previous_version"] == 0
        retained = retained_status(mosquitto.url, topics.status(device_id), f"ota-probe-{run}")
        assert retained.bundle_digest == v2 and retained.install["ok"] is True
        pointer = json.loads((tmp_path / "state" / "models" / "current.json").read_text())
        assert (pointer["current"]["version"], pointer["current"]["digest"]) == (2, v2)
        assert pointer["previous"]["version"] == 0
        assert server.publisher.counters["served"] == 1

        assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        agent.process = None
        offline = wait_for_status(server, listener, agent, lambda s: not s.online)
        assert offline.device_id == device_id  # the broker published the will

        agent.start()
        back = wait_for_status(server, listener, agent, lambda s: s.online)
        assert back.bundle_digest == v2, agent.text()
        server.serve(2.0)  # time for a (wrong) FETCH of the retained v2 announcement to show
        assert server.publisher.counters["served"] == 1
        assert list(server.rejections) == []
        retained = retained_status(mosquitto.url, topics.status(device_id), f"ota-probe2-{run}")
        assert retained.online and retained.bundle_digest == v2
    finally:
        code = agent.stop(signal.SIGTERM) if agent.process is not None else None
        listener.close()
        server.close()
    text = agent.text()
    assert code == 0, text
    assert text.count(f"installed {digits_bundle.directory} as model version 0") == 1, text
    assert "running model v2" in text and "ignoring model v2: version 2" in text, text
    assert "Traceback" not in text, text
