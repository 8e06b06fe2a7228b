"""Expiring statements end to end (issue #7): `fedflock agent --config` with ``[ota] trusted_keys``,
``require_expiry = true`` and ``max_clock_skew_s``, over a real Mosquitto, refuses a validly signed
statement that expired hours ago and a validly signed v1 statement (no expiry) that a rogue
publisher replays — reporting why in STATUS ``install`` and fetching nothing — then installs the
release the server signs with a lifetime, through the ``StatementRefresher`` that wraps its transport.

The agent runs on the real wall clock, so the replayed statements are signed on a clock set back.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from broker_server.mosquitto_process import MosquittoProcess
from broker_server.pki.release_signer import ReleaseSigner
from broker_server.pki.statement_refresh import StatementRefresher
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.crypto.signing import SigningKey, sign_bundle
from edge_agent.protocol.messages import encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from tests.edge_agent.ota import derive_bundle
from tests.fixtures import digits_split, write_npz
from tests.integration.test_agent_config_run import POLICY, transport
from tests.integration.test_agent_ota_run import AgentProcess, wait_for_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOUR = 3600.0


def test_an_agent_refuses_expired_and_unbounded_statements_and_installs_a_fresh_one(
    mosquitto: MosquittoProcess, digits_bundle: Bundle, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    device_id, prefix = f"expiry-{run}", f"expiryrun-{run}/v1"
    devices, _ = digits_split(2)
    write_npz(tmp_path / "d0.npz", devices[0])
    key = SigningKey.generate()
    v2_dir = derive_bundle(digits_bundle.directory, tmp_path / "v2", scale=0.5)
    sign_bundle(v2_dir, key)
    v2 = Bundle.open(v2_dir).digest
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "state"\nbundle = "{digits_bundle.directory}"\n\n'
        f'[mqtt]\nurl = "{mosquitto.url}"\ntopic_prefix = "{prefix}"\n\n'
        f'[ota]\ntrusted_keys = ["{key.public_key.hex()}"]\nrequire_expiry = true\nmax_clock_skew_s = 60\n\n'
        f'[data]\nkind = "npz"\npath = "d0.npz"\n\n[agent]\nmonitor_interval_s = 1\n{POLICY}',
        encoding="utf-8",
    )
    agent = AgentProcess(config, tmp_path)
    signer = ReleaseSigner(key, lifetime_s=HOUR)
    refresher = StatementRefresher(transport(mosquitto.url, f"exp-server-{run}"), signer)
    topics = Topics(prefix)
    server = FederatedServer(refresher, digits_bundle, ServerConfig(topics=topics))
    server.publisher.sign_with(signer.sign)
    listener, rogue = transport(mosquitto.url, f"exp-listener-{run}"), transport(mosquitto.url, f"exp-rogue-{run}")
    listener.subscribe(topics.status(device_id), qos=1)
    listener.start()
    rogue.start()
    channel = topics.model_channel("current")
    try:
        server.start()  # a v2 statement (with expiry) for the device's own bundle: nothing to do
        agent.start()
        assert wait_for_status(server, listener, agent, lambda s: s.online).bundle_digest == digits_bundle.digest
        server.publisher.add(2, v2_dir)
        release = server.publisher.announcement_of(2, "current")
        assert release is not None and release.expires_at - release.issued_at == HOUR * 1000

        # the server's own statement for v2, as it was three hours ago: expired two hours ago
        stale = ReleaseSigner(key, clock=lambda: signer.now_ms() / 1000 - 3 * HOUR, lifetime_s=HOUR)
        rogue.publish(channel, encode_message(stale.sign(release)), qos=1, retain=True)
        status = wait_for_status(server, listener, agent, lambda s: bool(s.install) and s.install["ok"] is False)
        assert status.install["code"] == "statement_expired" and status.install["stage"] == "signature"
        assert "expired at" in status.install["reason"] and status.install["version"] is None

        # a correctly signed statement without expiry (from a server before v2): refused, the device requires one
        unbounded = ReleaseSigner(key).sign(release)
        rogue.publish(channel, encode_message(unbounded), qos=1, retain=True)
        status = wait_for_status(
            server, listener, agent, lambda s: bool(s.install) and s.install["code"] == "statement_without_expiry"
        )
        assert status.bundle_digest == digits_bundle.digest

        server.announce_model(2, v2_dir)
        installed = wait_for_status(server, listener, agent, lambda s: s.bundle_digest == v2)
        assert installed.install["ok"] is True and installed.install["version"] == 2, installed.install
        assert server.publisher.counters["served"] == 1  # the replayed statements were never fetched
        assert refresher.retained()[channel].version == 2  # kept fresh from now on
    finally:
        code = agent.stop(signal.SIGTERM) if agent.process is not None else None
        rogue.publish(channel, b"", qos=1, retain=True)
        rogue.close()
        listener.close()
        server.close()
    text = agent.text()
    assert code == 0, text
    assert "Traceback" not in text, text
