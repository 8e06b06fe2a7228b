"""Signed models end to end (issue #7): `fedflock agent --config` with ``[ota] trusted_keys`` over a
real Mosquitto refuses an unsigned MODEL and a tampered release statement announced by a rogue
publisher (reporting why in STATUS ``install``, fetching nothing), then installs the release the
server signed with ``[ota] signing_key``'s key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import uuid
from pathlib import Path

import pytest

from broker_server.mosquitto_process import MosquittoProcess
from broker_server.pki.release_signer import ReleaseSigner
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.crypto.signing import SigningKey, sign_bundle
from edge_agent.ota.archive import pack_bundle
from edge_agent.protocol.messages import encode_message
from edge_agent.protocol.model_messages import ModelMessage
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from tests.edge_agent.ota import derive_bundle
from tests.fixtures import digits_split, write_npz
from tests.integration.test_agent_config_run import POLICY, transport
from tests.integration.test_agent_ota_run import AgentProcess, wait_for_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_rogue_models_are_refused_and_the_signed_release_installs(
    mosquitto: MosquittoProcess, digits_bundle: Bundle, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    device_id, prefix = f"signed-{run}", f"signedrun-{run}/v1"
    topics = Topics(prefix)
    devices, _ = digits_split(2)
    write_npz(tmp_path / "d0.npz", devices[0])
    key = SigningKey.generate()
    v2_dir = derive_bundle(digits_bundle.directory, tmp_path / "v2", scale=0.5)
    sign_bundle(v2_dir, key)
    v3_dir = derive_bundle(digits_bundle.directory, tmp_path / "v3", scale=2.0)  # the rogue's, unsigned
    v2, v3 = Bundle.open(v2_dir).digest, Bundle.open(v3_dir).digest
    v3_archive = pack_bundle(v3_dir)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "state"\nbundle = "{digits_bundle.directory}"\n\n'
        f'[mqtt]\nurl = "{mosquitto.url}"\ntopic_prefix = "{prefix}"\n\n'
        f'[ota]\ntrusted_keys = ["{key.public_key.hex()}"]\n\n'
        f'[data]\nkind = "npz"\npath = "d0.npz"\n\n[agent]\nmonitor_interval_s = 1\n{POLICY}',
        encoding="utf-8",
    )
    agent = AgentProcess(config, tmp_path)
    server = FederatedServer(transport(mosquitto.url, f"sig-server-{run}"), digits_bundle, ServerConfig(topics=topics))
    server.publisher.sign_with(ReleaseSigner(key).sign)
    listener, rogue = transport(mosquitto.url, f"sig-listener-{run}"), transport(mosquitto.url, f"sig-rogue-{run}")
    listener.subscribe(topics.status(device_id), qos=1)
    listener.start()
    rogue.start()
    channel = topics.model_channel("current")
    try:
        server.start()  # a signed v1 of the device's own bundle: nothing to do
        agent.start()
        assert wait_for_status(server, listener, agent, lambda s: s.online).bundle_digest == digits_bundle.digest

        unsigned = ModelMessage(
            channel="current",
            version=3,
            bundle_digest=v3,
            archive_sha256=hashlib.sha256(v3_archive).hexdigest(),
            archive_size=len(v3_archive),
        )
        rogue.publish(channel, encode_message(unsigned), qos=1, retain=True)
        status = wait_for_status(server, listener, agent, lambda s: bool(s.install) and s.install["ok"] is False)
        assert status.install["stage"] == "signature" and "unsigned" in status.install["reason"], status.install
        assert status.bundle_digest == digits_bundle.digest

        # a real signed statement (v1 of the server's) re-pointed at the rogue's bundle
        signed_v1 = server.publisher.announcement_of(1, "current")
        assert signed_v1 is not None
        tampered = dataclasses.replace(
            signed_v1, version=3, bundle_digest=v3, archive_sha256=unsigned.archive_sha256, archive_size=len(v3_archive)
        )
        rogue.publish(channel, encode_message(tampered), qos=1, retain=True)
        status = wait_for_status(
            server, listener, agent, lambda s: bool(s.install) and "tampered" in s.install["reason"]
        )
        assert status.install["ok"] is False and status.install["version"] is None

        server.announce_model(2, v2_dir)
        installed = wait_for_status(server, listener, agent, lambda s: s.bundle_digest == v2)
        assert installed.install["ok"] is True and installed.install["version"] == 2, installed.install
        pointer = json.loads((tmp_path / "state" / "models" / "current.json").read_text())
        assert pointer["current"]["digest"] == v2 and pointer["current"]["issued_at"] > 0
        assert server.publisher.counters["served"] == 1  # the rogue's MODELs were never fetched
    finally:
        code = agent.stop(signal.SIGTERM) if agent.process is not None else None
        rogue.close()
        listener.close()
        server.close()
    text = agent.text()
    assert code == 0, text
    assert "models must be signed by a trusted key" in text and "refusing model v3" in text, text
    assert "Traceback" not in text, text
    assert not any(p.name.startswith("model-") for p in (tmp_path / "state" / "downloads").glob("*"))
