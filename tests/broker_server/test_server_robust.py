"""Robust aggregation and tiered trust through the real server, over the in-memory transport.

The fleet: 7 honest devices whose updates share a direction ``g`` plus a per-device (non-IID)
offset of varying size and per-round noise, and 3 attackers sending their honest update
sign-flipped and scaled by 50. Updates do not depend on the model, so each round's honest mean
and each rule's guarantee can be checked against numbers computed here independently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import SqliteServerStore
from broker_server.robust import Flattener, clip_update
from broker_server.robust_config import RobustSettings
from broker_server.safeguards import TRUST_SETTING
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ConfigError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import TaskMessage, UpdateMessage, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.base import InboundMessage
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import FakeDevice, device_delta, fake_fleet

Tensors = dict[str, np.ndarray]
HONEST = [f"honest-{i}" for i in range(7)]
ATTACKERS = [f"mal-{i}" for i in range(3)]
#: how non-IID each honest device is: the size of its fixed offset relative to the shared direction
SKEW = dict(zip(HONEST, (0.3, 0.45, 0.6, 0.75, 0.9, 1.05, 1.2), strict=True))


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def shared_direction(specs: tuple[TensorSpec, ...]) -> Tensors:
    rng = np.random.default_rng(1234)
    return {s.name: (0.05 * rng.standard_normal(s.shape)).astype(np.float32) for s in specs}


def honest_delta(device_id: str, round_: int, specs: tuple[TensorSpec, ...]) -> Tensors:
    """``g + skew × offset(device) + 0.2 × noise(device, round)``."""
    g, offset, noise = (
        shared_direction(specs),
        device_delta(device_id, 0, specs),
        device_delta(device_id, round_, specs),
    )
    skew = SKEW.get(device_id, 0.6)
    return {name: (g[name] + skew * offset[name] + 0.2 * noise[name]).astype(np.float32) for name in g}


def attack_delta(device_id: str, round_: int, specs: tuple[TensorSpec, ...]) -> Tensors:
    return {name: (-50.0 * value).astype(np.float32) for name, value in honest_delta(device_id, round_, specs).items()}


class ScriptedDevice(FakeDevice):
    """A :class:`FakeDevice` whose update is ``behaviour(device_id, round, specs)``."""

    def __init__(self, broker: InMemoryBroker, device_id: str, bundle: Bundle, behaviour: Callable, **kw) -> None:
        super().__init__(broker, device_id, bundle, **kw)
        self.behaviour = behaviour

    def _answer(self, task: TaskMessage) -> None:
        delta = self.behaviour(self.device_id, task.round, self.bundle.manifest.aggregated_tensors)
        self.answered.append(task.task_id)
        update = UpdateMessage(
            device_id=self.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=self.num_examples,
            metrics={"train_loss": 1.0},
            codec="fp32",
            payload=encode_update(delta, CodecSpec("fp32"), rng=np.random.default_rng(0)),
            attempt=self.answered.count(task.task_id),
            nonce=task.nonce,  # update binding: echo the TASK's nonce and payload digest
            base_digest=task.weights_digest,
        )
        self._transport.publish(self.topics.results(self.device_id), encode_message(update))


def fleet(broker: InMemoryBroker, bundle: Bundle, *, attackers: bool = True) -> list[ScriptedDevice]:
    out = [ScriptedDevice(broker, d, bundle, honest_delta) for d in HONEST]
    if attackers:
        out += [ScriptedDevice(broker, d, bundle, attack_delta) for d in ATTACKERS]
    return out


def config(**kw: object) -> ServerConfig:
    base: dict[str, object] = {
        "rounds": 1,
        "clients_per_round": 10,
        "min_clients": 10,
        "wait_for_clients_s": 10,
        "round_timeout_s": 20,
        "codecs": ("fp32",),
    }
    return ServerConfig(**{**base, **kw})  # type: ignore[arg-type]


def run(
    bundle: Bundle, server_config: ServerConfig, broker: InMemoryBroker, devices: list[ScriptedDevice]
) -> FederatedServer:
    with fake_fleet(devices):  # type: ignore[arg-type]
        server = FederatedServer(InMemoryTransport(broker, "server"), bundle, server_config)
        server.start()
        server.wait_for_devices(len(devices), 10)  # every device online before round 1, whatever min_clients
        server.run()
        server.close()
    return server


def flat(tensors: Tensors, flattener: Flattener) -> np.ndarray:
    return flattener.flatten(tensors).astype(np.float64)


def round_one(bundle: Bundle, server: FederatedServer, flattener: Flattener) -> np.ndarray:
    """The delta the server applied in round 1 (FedAvg with server_lr 1: new weights - initial)."""
    initial = bundle.initial_weights()
    return flat({n: server.weights[n] - initial[n] for n in flattener.names}, flattener)


# -- robust rules against a 30 % attack ----------------------------------------------------------


def test_median_trimmed_mean_and_krum_stay_near_the_honest_mean_where_fedavg_does_not(bundle: Bundle) -> None:
    specs = bundle.manifest.aggregated_tensors
    flattener = Flattener.from_specs(specs)
    honest = np.stack([flat(honest_delta(d, 1, specs), flattener) for d in HONEST])
    mean = honest.mean(axis=0)
    # every coordinate of median / trimmed mean (k >= 3 attackers trimmed) lies within the honest
    # values' range, and Krum picks one honest row, so each is within this of the honest mean
    bound = float(np.linalg.norm(np.abs(honest - mean).max(axis=0)))
    errors = {}
    for name, robust in [
        ("fedavg", {}),
        ("median", {"rule": "median"}),
        ("trimmed_mean", {"rule": "trimmed_mean", "beta": 0.3}),
        ("krum", {"rule": "krum", "f": 3}),
    ]:
        broker = InMemoryBroker()
        server = run(bundle, config(robust=robust), broker, fleet(broker, bundle))
        assert [(r.completed, r.reported) for r in server.results] == [(True, 10)], server.results
        errors[name] = float(np.linalg.norm(round_one(bundle, server, flattener) - mean))
    assert errors["fedavg"] > 10 * bound, errors
    for name in ("median", "trimmed_mean", "krum"):
        assert errors[name] <= bound + 1e-5, (name, errors, bound)
    assert errors["krum"] <= float(np.linalg.norm(honest - mean, axis=1).max()) + 1e-5


def test_clipping_bounds_what_the_attackers_add(bundle: Bundle) -> None:
    specs = bundle.manifest.aggregated_tensors
    flattener = Flattener.from_specs(specs)
    honest = [honest_delta(d, 1, specs) for d in HONEST]
    clip = 1.1 * max(float(np.linalg.norm(flat(u, flattener))) for u in honest)  # honest updates untouched
    broker = InMemoryBroker()
    server = run(bundle, config(robust={"rule": "clip", "clip": clip}), broker, fleet(broker, bundle))
    applied = round_one(bundle, server, flattener)
    honest_sum = sum(flat(u, flattener) for u in honest)
    # equal example counts: the attackers add at most 3 × clip / 10
    assert np.linalg.norm(10 * applied - honest_sum) <= 3 * clip * (1 + 1e-5)
    expected = honest_sum + sum(flat(clip_update(attack_delta(d, 1, specs), clip)[0], flattener) for d in ATTACKERS)
    np.testing.assert_allclose(applied, expected / 10, atol=1e-6)
    broker = InMemoryBroker()
    plain = run(bundle, config(), broker, fleet(broker, bundle))
    assert np.linalg.norm(10 * round_one(bundle, plain, flattener) - honest_sum) > 30 * clip


# -- the buffer cap ------------------------------------------------------------------------------


def test_a_small_buffer_caps_the_tasks_a_round_sends(bundle: Bundle) -> None:
    d = Flattener.from_specs(bundle.manifest.aggregated_tensors).size
    row = 4 * d + 8  # float32 row plus its weight
    robust = {"rule": "median", "max_buffer_mb": (6.5 * row) / 2**20}
    assert RobustSettings.parse(robust).buffer.max_rows(d) == 6  # type: ignore[union-attr]
    broker = InMemoryBroker()
    devices = fleet(broker, bundle, attackers=False)
    server = run(bundle, config(rounds=2, clients_per_round=7, min_clients=7, robust=robust), broker, devices)
    assert [(r.completed, r.selected, r.reported) for r in server.results] == [(True, 6, 6), (True, 6, 6)]
    for round_ in (1, 2):
        assert sum(1 for dev in devices for t in dev.tasks if t.round == round_) == 6


def test_a_buffer_too_small_for_the_rule_is_refused_before_connecting(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    d = Flattener.from_specs(bundle.manifest.aggregated_tensors).size
    robust = {"rule": "krum", "f": 3, "max_buffer_mb": 6.5 * (4 * d + 8) / 2**20}  # 6 rows, Krum f=3 needs 9
    server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config(robust=robust))
    with pytest.raises(ConfigError, match=r"max_buffer_mb=.* holds 6 updates .* krum f=3 m=1 needs at least 9"):
        server.start()
    assert broker.connected_clients() == []


def test_a_round_with_fewer_devices_than_the_rule_needs_is_skipped_with_the_reason(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    devices = fleet(broker, bundle, attackers=False)  # 7 online, Krum f=3 needs 9
    server = run(bundle, config(min_clients=7, robust={"rule": "krum", "f": 3}), broker, devices)
    assert [(r.completed, r.selected) for r in server.results] == [(False, 0)]
    assert server.results[0].reason == "only 7 devices selectable, krum f=3 m=1 needs 9 updates per round"
    assert all(dev.tasks == [] for dev in devices) and server.model_version == 0


# -- tiered trust --------------------------------------------------------------------------------


def tasks_by_round(devices: list[ScriptedDevice]) -> dict[str, list[int]]:
    return {dev.device_id: [t.round for t in dev.tasks] for dev in devices}


def test_attackers_are_quarantined_after_three_rounds_and_stay_out_across_a_restart(
    bundle: Bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = InMemoryBroker()
    devices = fleet(broker, bundle)
    settings = {"robust": {"rule": "median"}, "trust": {}}
    store = SqliteServerStore.open(tmp_path / "server.db")
    try:
        with fake_fleet(devices), caplog.at_level(logging.INFO, logger="fedflock.server"):  # type: ignore[arg-type]
            first = FederatedServer(InMemoryTransport(broker, "a"), bundle, config(rounds=3, **settings), store=store)
            first.start()
            first.run()
            first.close()
            # a new process on the same store: the reputation comes back with it
            second = FederatedServer(
                InMemoryTransport(broker, "b"), bundle, config(rounds=5, min_clients=7, **settings), store=store
            )
            second.start()
            assert second.reputation is not None and second.reputation.quarantined == tuple(ATTACKERS)
            results = second.run()
            # a result from a quarantined device is refused with the quarantine's reason
            replay = UpdateMessage(
                device_id="mal-0",
                round=5,
                task_id="r5-forged",
                model_version=4,
                num_examples=10,
                payload=encode_update(
                    attack_delta("mal-0", 5, bundle.manifest.aggregated_tensors),
                    CodecSpec("fp32"),
                    rng=np.random.default_rng(0),
                ),
            )
            second.handle(InboundMessage(Topics().results("mal-0"), encode_message(replay)))
            second.close()
        stored = store.get_setting(TRUST_SETTING)
    finally:
        store.close()
    assert [r.completed for r in first.results] == [True] * 3
    assert [(r.round, r.completed, r.selected) for r in results] == [(4, True, 7), (5, True, 7)]
    events = [(e.device_id, e.round, e.action) for e in first.trust_events]
    assert events == [(d, r, "outlier") for r in (1, 2) for d in ATTACKERS] + [(d, 3, "quarantine") for d in ATTACKERS]
    for event in list(first.trust_events)[-3:]:
        assert event.reason.startswith("quarantined: ") and "3 rounds in a row" in event.reason, event.reason
        assert f"{event.device_id} quarantine after round 3" in caplog.text
    assert list(second.trust_events) == []  # the honest non-IID devices were never even flagged
    assert not any(second.reputation.is_quarantined(d) for d in HONEST)
    assert all(second.reputation.multiplier(d) > 0.5 for d in HONEST)
    # not selected after their quarantine, by either server
    rounds = tasks_by_round(devices)
    assert all(rounds[d] == [1, 2, 3] for d in ATTACKERS) and all(rounds[d] == [1, 2, 3, 4, 5] for d in HONEST)
    assert "round 4: not selecting mal-0 (quarantined: " in caplog.text
    rejection = second.rejections[-1]
    assert (rejection.device_id, rejection.code) == ("mal-0", "quarantined")
    assert rejection.reason == first.trust_events[-3].reason
    assert stored["devices"]["mal-0"]["quarantined_at"] == 3 and stored["last_round"] == 5


def test_streaming_trust_with_clipping_quarantines_attackers_against_the_previous_aggregate(bundle: Bundle) -> None:
    specs = bundle.manifest.aggregated_tensors
    flattener = Flattener.from_specs(specs)
    clip = 1.1 * max(float(np.linalg.norm(flat(honest_delta(d, 1, specs), flattener))) for d in HONEST)
    broker = InMemoryBroker()
    devices = fleet(broker, bundle)
    server = run(
        bundle, config(rounds=5, min_clients=7, robust={"rule": "clip", "clip": clip}, trust={}), broker, devices
    )
    assert [r.completed for r in server.results] == [True] * 5
    # round 1 has no previous aggregate to compare with: flagged in rounds 2, 3 and 4
    events = [(e.device_id, e.round, e.action) for e in server.trust_events]
    assert events == [(d, r, "outlier") for r in (2, 3) for d in ATTACKERS] + [(d, 4, "quarantine") for d in ATTACKERS]
    assert all(tasks_by_round(devices)[d] == [1, 2, 3, 4] for d in ATTACKERS)
    assert server.results[-1].selected == 7
