"""Secure aggregation in the server: the [secagg] table, refused messages, a restart mid-session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import SqliteServerStore
from broker_server.secagg_config import parse_secagg
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.errors import ConfigError, MalformedMessage
from edge_agent.protocol.messages import SecAggMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.secagg import AdvertiseKeys, DeviceKeys, encode
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import FakeDevice, fake_fleet
from tests.broker_server.test_server_resume import CrashableClock, in_thread, wait_for


def config(**kw: object) -> ServerConfig:
    base: dict[str, object] = {
        "rounds": 1,
        "clients_per_round": 3,
        "min_clients": 3,
        "wait_for_clients_s": 10,
        "round_timeout_s": 60,
        "secagg": {"keys_timeout_s": 30},
    }
    return ServerConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("table", "extra", "phrase"),
    [
        ({"clip": 0}, {}, "secagg.clip"),
        ({"quant_bits": 30}, {}, "secagg.quant_bits"),
        ({"threshold": 5}, {}, "secagg.threshold (5) exceeds clients_per_round"),
        ({"threshold": 2, "threshold_fraction": 0.5}, {}, "secagg.threshold_fraction"),
        ({"keys_timeout_s": -1}, {}, "secagg.keys_timeout_s"),
        ({"bogus": 1}, {}, "secagg.bogus"),
        ({}, {"robust": {"rule": "clip", "clip": 1.0}}, "robust:"),
        ({}, {"trust": {}}, "trust:"),
        ({"threshold": 4}, {"mode": "async", "asynchronous": {"buffer_size": 3}}, "exceeds a buffer's cohort"),
        ({}, {"late_updates": "async"}, "late_updates:"),
        ({}, {"clusters": {}}, "clusters:"),
    ],
)
def test_secagg_table_errors_name_the_key(table: dict[str, object], extra: dict[str, object], phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        config(secagg=table, **extra)


def test_secagg_thresholds() -> None:
    assert parse_secagg({"enabled": False}) is None
    default = parse_secagg({})
    assert default is not None and default.threshold_for(10) == 7 and default.threshold_for(100) == 67
    fraction = parse_secagg({"threshold_fraction": 0.5})
    assert fraction is not None and fraction.threshold_for(10) == 5 and fraction.threshold_for(3) == 2


def test_a_restart_mid_session_abandons_the_round_and_keeps_the_model(mlp_bundle: Bundle, tmp_path: Path) -> None:
    broker = InMemoryBroker()
    fleet = [FakeDevice(broker, f"dev-{i}", mlp_bundle, num_examples=10 + i) for i in range(3)]
    rogue = InMemoryTransport(broker, "dev-0-rogue")
    store = SqliteServerStore.open(tmp_path / "server.db")
    try:
        with fake_fleet(fleet):
            clock = CrashableClock()
            first_transport = InMemoryTransport(broker, "server")
            first = FederatedServer(first_transport, mlp_bundle, config(), store=store, clock=clock)
            first.start()
            thread = in_thread(first.run)
            wait_for(lambda: all(len(d.tasks) == 1 for d in fleet))
            task = fleet[0].tasks[0]
            assert task.secagg is not None and task.secagg.cohort == 3 and task.codecs == ("fp32",)
            # a message for another session, and one naming another device's index: refused, counted
            rogue.start()
            topic = Topics().results("dev-0")
            keys = DeviceKeys(2 if task.secagg.index != 2 else 3, b"\x01" * 32, b"\x02" * 32)
            for session in (b"\x00" * 16, task.secagg.session):
                wrong = SecAggMessage(
                    device_id="dev-0",
                    round=1,
                    task_id=task.task_id,
                    session=session,
                    payload=encode(AdvertiseKeys(session, keys)),
                )
                rogue.publish(topic, encode_message(wrong))
            wait_for(lambda: len(first.rejections) >= 5)  # 3 plain UPDATEs + the 2 above
            reasons = " | ".join(r.reason for r in first.rejections)
            assert "unknown session" in reasons and "names index" in reasons, reasons
            assert "plain UPDATEs are refused" in reasons, reasons
            assert store.get_setting("secagg_round") == {"round": 1} and store.open_rounds() == [1]
            clock.crash.set()
            thread.join(timeout=10)
            first_transport.kill()
            assert not thread.is_alive()

            second = FederatedServer(InMemoryTransport(broker, "server-2"), mlp_bundle, config(), store=store)
            second.start()
            assert second.resumable_round == 1
            results = second.run()
            second.close()
    finally:
        rogue.close()
        store.close()
    assert [(r.round, r.completed) for r in results] == [(1, False)]
    assert "server restarted during secure-aggregation round 1" in results[0].reason
    assert second.model_version == 0
    for name, value in second.weights.items():
        np.testing.assert_array_equal(value, mlp_bundle.initial_weights()[name])
    assert len(fleet[0].tasks) == 1  # nothing re-sent to a session that no longer exists


def test_the_secagg_envelope_round_trips_and_refuses_bad_bytes() -> None:
    session = bytes(range(16))
    message = SecAggMessage(
        device_id="d",
        round=3,
        task_id="t",
        session=session,
        payload=encode(AdvertiseKeys(session, DeviceKeys(1, b"a" * 32, b"b" * 32))),
    )
    assert decode_message(encode_message(message)) == message
    envelope = encode_message(message)
    for bad, phrase in (
        (envelope.replace(b"FFSA", b"XXXX"), "not an FFSA message"),
        (envelope.replace(session.hex().encode(), b"0" * 32), "another session"),
        (envelope[:-70], "shorter than the FFSA header"),
    ):
        with pytest.raises(MalformedMessage, match=phrase):
            decode_message(bad)


def test_a_secagg_table_in_broker_toml_reaches_the_server(mlp_bundle: Bundle, tmp_path: Path) -> None:
    from broker_server.secagg_async import SecAggAsyncEngine
    from fedflock.broker_flags import resolve_settings
    from fedflock.cli import build_parser

    path = tmp_path / "broker.toml"
    path.write_text(
        f"""
[server]
bundle = "{mlp_bundle.directory}"
mode = "async"
min_clients = 3

[asynchronous]
buffer_size = 3
concurrency = 6

[secagg]
clip = 0.5
threshold = 2
"""
    )
    args = ["broker", "--config", str(path), "--secagg-option", "quant_bits=12"]
    settings = resolve_settings(build_parser().parse_args(args))
    assert settings.server.secagg == {"clip": 0.5, "threshold": 2, "quant_bits": 12}
    server = FederatedServer(InMemoryTransport(InMemoryBroker(), "server"), mlp_bundle, settings.server)
    engine = server.asynchronous
    assert isinstance(engine, SecAggAsyncEngine) and engine.cohort == 3
    assert (engine.sessions.settings.clip, engine.sessions.settings.quant_bits) == (0.5, 12)
    assert engine.sessions.settings.threshold_for(3) == 2
    with pytest.raises(ConfigError, match=r"secagg\.quant_bits"):
        resolve_settings(build_parser().parse_args([*args[:3], "--secagg-option", "quant_bits=40"]))
