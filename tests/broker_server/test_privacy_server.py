"""Central DP through the real server (in-memory transport, scripted devices, real noise).

* an update with 100x the clip norm moves the released sum by at most C: two servers draw the
  *same* real noise (same injected generator seed) over the same honest devices, one with the
  attacker and one without; the difference of their models times the fixed denominator is the
  attacker's clipped contribution, and its norm is C (to float32 rounding);
* the budget is never exceeded: the server stops exactly before the round that would pass it;
* a restart continues the budget from the store (never resets it);
* a round with fewer updates than ``min_reports`` is still released (only noise for the missing);
* combinations that would void the guarantee are refused, naming the key.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import SqliteServerStore
from broker_server.privacy import SampledGaussian, epsilon_for
from broker_server.privacy_wiring import PRIVACY_SETTING
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ConfigError
from edge_agent.protocol.binding import payload_digest
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import TaskMessage, UpdateMessage, encode_message
from edge_agent.protocol.tensors import encode_tensors
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import FakeDevice, device_delta, fake_fleet

Tensors = dict[str, np.ndarray]
HONEST = ["dp-a", "dp-b", "dp-c"]
CLIP = 1.0
M = 4  # clients_per_round: the fixed denominator
DELTA = 1e-5


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in tensors.values()))


class DPDevice(FakeDevice):
    """A scripted device whose update is :func:`device_delta` times ``scale`` (a fixed L2 norm when
    ``norm_to`` is given), claiming ``num_examples``; it echoes the TASK's binding fields."""

    def __init__(self, broker: InMemoryBroker, device_id: str, bundle: Bundle, *, norm_to: float | None = None, **kw):
        super().__init__(broker, device_id, bundle, **kw)
        self.norm_to = norm_to

    def _answer(self, task: TaskMessage) -> None:
        delta = device_delta(self.device_id, task.round, self.bundle.manifest.aggregated_tensors)
        scale = 1.0 if self.norm_to is None else self.norm_to / norm(delta)
        sent = {name: (value * scale).astype(np.float32) for name, value in delta.items()}
        self.answered.append(task.task_id)
        update = UpdateMessage(
            device_id=self.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=self.num_examples,
            metrics={},
            codec="fp32",
            payload=encode_update(sent, CodecSpec("fp32"), rng=np.random.default_rng(0)),
            attempt=self.answered.count(task.task_id),
            nonce=task.nonce,
            base_digest=task.weights_digest or payload_digest(encode_tensors(task.weights)),
        )
        self._transport.publish(self.topics.results(self.device_id), encode_message(update))


def honest(broker: InMemoryBroker, bundle: Bundle, ids: list[str] = HONEST, **kw: object) -> list[FakeDevice]:
    return [DPDevice(broker, d, bundle, **kw) for d in ids]  # type: ignore[arg-type]


def privacy(**kw: object) -> dict[str, object]:
    return {"clip_norm": CLIP, "epsilon": 50.0, "delta": DELTA, "population": 40, "noise_multiplier": 1.0, **kw}


def config(**kw: object) -> ServerConfig:
    base: dict[str, object] = {
        "rounds": 1,
        "clients_per_round": M,
        "min_clients": 3,
        "wait_for_clients_s": 10,
        "round_timeout_s": 20,
        "codecs": ("fp32",),
        "privacy": privacy(),
    }
    return ServerConfig(**{**base, **kw})  # type: ignore[arg-type]


def run(
    bundle: Bundle,
    server_config: ServerConfig,
    devices: list[FakeDevice],
    broker: InMemoryBroker,
    *,
    seed: int = 7,
    store: SqliteServerStore | None = None,
) -> FederatedServer:
    with fake_fleet(devices):
        server = FederatedServer(
            InMemoryTransport(broker, "server"),
            bundle,
            server_config,
            privacy_rng=np.random.default_rng(seed),
            store=store,
        )
        server.start()
        server.wait_for_devices(len(devices), 10)
        server.run()
        server.close()
    return server


def test_an_update_with_100x_the_clip_norm_moves_the_released_sum_by_exactly_c(bundle: Bundle) -> None:
    specs: tuple[TensorSpec, ...] = bundle.manifest.aggregated_tensors
    b1, b2 = InMemoryBroker(), InMemoryBroker()
    without = run(bundle, config(), honest(b1, bundle), b1)
    # 100x the clip norm, and a huge claimed example count: neither buys influence past C
    devices = [*honest(b2, bundle), DPDevice(b2, "dp-huge", bundle, norm_to=100 * CLIP, num_examples=10000)]
    with_huge = run(bundle, config(), devices, b2)
    assert [r.reported for r in without.results] == [3] and [r.reported for r in with_huge.results] == [4]
    # same noise, same honest updates: the model difference is the huge update's clipped share / m
    contribution = {s.name: (with_huge.weights[s.name].astype(np.float64) - without.weights[s.name]) * M for s in specs}
    assert norm(contribution) <= CLIP * (1 + 1e-4)
    assert norm(contribution) >= CLIP * (1 - 1e-4)  # it was scaled down to C, not dropped
    direction = device_delta("dp-huge", 1, specs)
    cosine = sum(float(np.vdot(contribution[n], direction[n])) for n in direction) / (norm(direction) * CLIP)
    assert cosine > 0.9999
    # and the released model is noisy: it is not the plain mean of the honest updates
    initial = bundle.initial_weights()
    honest_sum = {n: sum(device_delta(d, 1, specs)[n].astype(np.float64) for d in HONEST) for n in direction}
    noise = {n: (without.weights[n] - initial[n]) * M - honest_sum[n] for n in direction}
    assert norm(noise) > 0.5 * 1.0 * CLIP * math.sqrt(sum(v.size for v in noise.values()))
    assert with_huge.privacy is not None and with_huge.privacy["rounds_charged"] == 1


def budget_for(rounds: int, z: float = 1.0, q: float = M / 40) -> tuple[float, float]:
    """A budget strictly between the ε of ``rounds`` rounds and of one more; and the former."""
    mechanism = SampledGaussian(sampling_rate=q, noise_multiplier=z)
    spent, more = epsilon_for(mechanism, rounds, DELTA), epsilon_for(mechanism, rounds + 1, DELTA)
    return (spent + more) / 2, spent


def test_the_server_stops_exactly_before_the_round_that_would_exceed_the_budget(bundle: Bundle) -> None:
    budget, three = budget_for(3)
    broker = InMemoryBroker()
    devices = honest(broker, bundle)
    server = run(bundle, config(rounds=10, privacy=privacy(epsilon=budget)), devices, broker)
    assert [(r.round, r.completed) for r in server.results] == [(1, True), (2, True), (3, True), (4, False)]
    assert "privacy budget spent" in server.results[-1].reason and server.stopped == server.results[-1].reason
    assert server.results[-1].selected == 0
    assert all(task.round <= 3 for device in devices for task in device.tasks)  # no TASK for round 4
    assert server.privacy is not None
    assert server.privacy["epsilon_spent"] == pytest.approx(three, rel=1e-9) and three <= budget
    assert server.privacy["exhausted"] and server.privacy["rounds_remaining"] == 0
    assert server.model_version == 3


def test_a_restart_continues_the_budget_from_the_store(bundle: Bundle, tmp_path: Path) -> None:
    budget, three = budget_for(3)
    store = SqliteServerStore.open(tmp_path / "server.db")
    try:
        broker = InMemoryBroker()
        first = run(
            bundle,
            config(rounds=2, privacy=privacy(epsilon=budget)),
            honest(broker, bundle),
            broker,
            store=store,
        )
        assert [r.completed for r in first.results] == [True, True] and not first.stopped
        assert store.get_setting(PRIVACY_SETTING)["accountant"]["rounds"][0][2] == 2
        broker = InMemoryBroker()
        second = run(
            bundle,
            config(rounds=10, privacy=privacy(epsilon=budget)),
            honest(broker, bundle),
            broker,
            seed=8,
            store=store,
        )
    finally:
        store.close()
    # one more round fits (round 3), then the budget stops it: the first run's 2 rounds still count
    assert [(r.round, r.completed) for r in second.results] == [(3, True), (4, False)]
    assert second.privacy is not None and second.privacy["rounds_charged"] == 3
    assert second.privacy["epsilon_spent"] == pytest.approx(three, rel=1e-9) and three <= budget


def test_a_round_with_fewer_updates_than_min_reports_is_still_released(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    devices = honest(broker, bundle, HONEST[:2]) + honest(broker, bundle, ["dp-deaf"], deaf=True)
    server = run(bundle, config(min_reports=3, round_timeout_s=1.0), devices, broker)
    (result,) = server.results
    assert result.completed and result.reported == 2 and server.model_version == 1
    assert server.privacy is not None and server.privacy["rounds_charged"] == 1


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"mode": "async"}, "mode"),
        ({"late_updates": "async"}, "late_updates"),
        ({"robust": {"rule": "clip", "clip": 1.0}}, "robust"),
        ({"trust": {}}, "trust"),
        ({"over_selection": 1.5}, "over_selection"),
        ({"privacy": privacy(clients_per_round=5)}, "privacy.clients_per_round"),
        ({"privacy": privacy(epsilon=-1)}, "privacy.epsilon"),
        ({"privacy": privacy(population=2)}, "privacy.population"),
        ({"privacy": {**privacy(), "noise": 1}}, "privacy.noise"),
    ],
)
def test_settings_that_void_the_guarantee_are_refused_naming_the_key(settings: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config(**settings)
    assert key in str(raised.value)


def test_privacy_clients_per_round_defaults_to_the_servers() -> None:
    parsed = config().privacy_config()
    assert parsed is not None and parsed.clients_per_round == M and parsed.sampling_rate == M / 40
    assert config(privacy=None).privacy_config() is None
