"""FedBuff with secure aggregation in the server, over the in-memory transport: devices run the
agent's real SecAggSessions with scripted updates (fake_fleet.device_delta), so every version can
be checked against a hand-computed example-weighted mean."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from broker_server.async_ledger import ASYNC_SETTING, AsyncLedger
from broker_server.persistence import SqliteServerStore
from broker_server.secagg_async import SecAggAsyncEngine
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ConfigError
from edge_agent.presence import offline_will
from edge_agent.protocol.messages import (
    SecAggMessage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
    decode_message,
    encode_message,
)
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.secagg import ring_spec_for
from edge_agent.secagg.weighting import weighted_bound
from edge_agent.secagg_session import SecAggSessions
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import device_delta
from tests.broker_server.test_server_resume import CrashableClock, in_thread, wait_for

TOPICS = Topics()
SECAGG = {"clip": 1.0, "quant_bits": 16, "keys_timeout_s": 5, "shares_timeout_s": 5, "unmask_timeout_s": 5}
ABORT, UNMASK_REQUEST = 9, 7


class SecAggDevice:
    """A device that answers secagg TASKs at once with ``device_delta(id, round)``, through the
    agent's own :class:`SecAggSessions`; it withholds its masked input in ``withhold`` rounds."""

    def __init__(self, broker: InMemoryBroker, device_id: str, bundle: Bundle, *, num_examples: int) -> None:
        self.device_id, self.bundle, self.num_examples = device_id, bundle, num_examples
        self.transport = InMemoryTransport(broker, device_id, will=offline_will(device_id, TOPICS))
        specs = bundle.manifest.aggregated_tensors
        self.sessions = SecAggSessions(
            device_id,
            lambda: specs,
            publish=self._publish,
            send_large=self._send_large,
            rng=np.random.default_rng(len(device_id)),
            wall_clock=time.time,
        )
        self.tasks: list[TaskMessage] = []
        #: (round, FFSA type) of every SECAGG message received
        self.secagg: list[tuple[int, int]] = []
        self.withhold: set[int] = set()
        self.deaf = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SecAggDevice:
        self.transport.start()
        self.transport.subscribe(TOPICS.tasks(self.device_id))
        status = StatusMessage(
            device_id=self.device_id, online=True, bundle_digest=self.bundle.digest, num_examples=self.num_examples
        )
        self.transport.publish(TOPICS.status(self.device_id), encode_message(status), retain=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.transport.close()

    def _publish(self, message: SecAggMessage) -> None:
        self.transport.publish(TOPICS.results(self.device_id), encode_message(message))

    def _send_large(self, message: SecAggMessage) -> str:
        if message.round in self.withhold:
            return "failed: withheld"
        self._publish(message)
        return "done"

    def _run(self) -> None:
        while not self._stop.is_set():
            inbound = self.transport.receive(timeout=0.02)
            if inbound is None or self.deaf.is_set():
                continue
            message = decode_message(inbound.payload)
            if isinstance(message, SecAggMessage):
                self.secagg.append((message.round, message.kind))
                self.sessions.handle(message)
            elif isinstance(message, TaskMessage):
                self.tasks.append(message)
                self.sessions.start(message)
                self.sessions.trained(self._update(message))

    def _update(self, task: TaskMessage) -> UpdateMessage:
        delta = device_delta(self.device_id, task.round, self.bundle.manifest.aggregated_tensors)
        return UpdateMessage(
            device_id=self.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=self.num_examples,
            codec="fp32",
            payload=encode_update(delta, CodecSpec("fp32"), rng=np.random.default_rng(0)),
        )


def config(**kw: object) -> ServerConfig:
    base: dict[str, object] = {
        "mode": "async",
        "asynchronous": {"buffer_size": 3, "concurrency": 3, "versions": 1, "task_timeout_s": 20},
        "min_clients": 3,
        "wait_for_clients_s": 10,
        "secagg": SECAGG,
    }
    return ServerConfig(**{**base, **kw})  # type: ignore[arg-type]


def fleet(broker: InMemoryBroker, bundle: Bundle, count: int) -> list[SecAggDevice]:
    return [SecAggDevice(broker, f"dev-{i}", bundle, num_examples=10 + i).start() for i in range(count)]


def cohort(devices: list[SecAggDevice], round_: int) -> list[SecAggDevice]:
    return [d for d in devices if any(t.round == round_ for t in d.tasks)]


def check_mean(moved: dict[str, np.ndarray], members: list[SecAggDevice], round_: int, bundle: Bundle) -> None:
    """``moved`` is the example-weighted mean of ``members``' round ``round_`` deltas within the bound."""
    specs = bundle.manifest.aggregated_tensors
    total = sum(d.num_examples for d in members)
    unit = total / len(members)  # every member reported its count: W is their mean
    bound = weighted_bound(len(members), ring_spec_for(len(members), clip=1.0, quant_bits=16), unit, total)
    assert moved
    for name, value in moved.items():
        deltas = [device_delta(d.device_id, round_, specs)[name].astype(np.float64) for d in members]
        expected = sum(d.num_examples * x for d, x in zip(members, deltas, strict=True)) / total
        assert float(np.abs(value - expected).max()) < bound + 1e-6, name


def test_two_buffers_open_at_once_seal_in_turn_and_the_second_is_rebased(mlp_bundle: Bundle) -> None:
    broker = InMemoryBroker()
    devices = fleet(broker, mlp_bundle, 6)
    cfg = config(min_clients=6, asynchronous={"buffer_size": 3, "concurrency": 6, "versions": 2})
    server = FederatedServer(InMemoryTransport(broker, "server"), mlp_bundle, cfg)
    try:
        assert isinstance(server.asynchronous, SecAggAsyncEngine) and server.asynchronous.cohort == 3
        server.start()
        w0 = {k: np.array(v, dtype=np.float64) for k, v in server.weights.items()}
        results = server.run()
    finally:
        server.close()
        for d in devices:
            d.stop()
    sealed = [r for r in results if r.completed]
    assert [(r.selected, r.reported) for r in sealed] == [(3, 3)] * 2, results
    # a buffer opened on v1 by the first cohort's freed devices is aborted once v2 exists
    assert all("made its 2 versions" in r.reason for r in results if not r.completed), results
    assert sorted(r.round for r in sealed) == [1, 2] and server.model_version == 2
    assert {t.model_version for d in devices for t in d.tasks if t.round in (1, 2)} == {0}  # both on v0
    plain = {t.name for t in mlp_bundle.manifest.aggregated_tensors if t.role == "buffer"}
    first, second = sealed[0].round, sealed[1].round
    moved = {k: np.asarray(v, dtype=np.float64) - w0[k] for k, v in server.weights.items()}
    both = {k: v for k, v in moved.items() if k not in plain}
    # parameters: both buffers' means added up; buffers (BatchNorm statistics): the second cohort's own
    # statistics, rebased from v0 (its base) rather than added to v1's
    singles = {k: v for k, v in moved.items() if k in plain}
    assert plain and both
    check_mean(singles, cohort(devices, second), second, mlp_bundle)
    specs = mlp_bundle.manifest.aggregated_tensors
    for name in both:
        parts = []
        for r in (first, second):
            members = cohort(devices, r)
            total = sum(d.num_examples for d in members)
            parts.append(sum(d.num_examples * device_delta(d.device_id, r, specs)[name] for d in members) / total)
        assert float(np.abs(both[name] - parts[0] - parts[1]).max()) < 1e-3, name
    assert {r.code for r in server.rejections} <= {"contract_violation"}, list(server.rejections)


def test_an_aborted_buffer_keeps_the_model_and_its_devices_join_the_next(mlp_bundle: Bundle) -> None:
    broker = InMemoryBroker()
    devices = fleet(broker, mlp_bundle, 3)
    devices[0].withhold.add(1)  # buffer 1: dev-0 never sends its masked input; t = 3 of 3
    cfg = config(asynchronous={"buffer_size": 3, "concurrency": 3, "versions": 1, "task_timeout_s": 2})
    server = FederatedServer(InMemoryTransport(broker, "server"), mlp_bundle, cfg)
    try:
        server.start()
        w0 = {k: np.array(v, dtype=np.float64) for k, v in server.weights.items()}
        results = server.run()
    finally:
        server.close()
        for d in devices:
            d.stop()
    assert [(r.round, r.completed) for r in results] == [(1, False), (2, True)], results
    assert "only 2 devices sent masked inputs" in results[0].reason, results[0].reason
    assert server.model_version == 1 and cohort(devices, 2) == devices  # all three re-tasked
    for d in devices:  # buffer 1: an Abort to every member, no unmasking request
        assert (1, ABORT) in d.secagg and (1, UNMASK_REQUEST) not in d.secagg, d.secagg
    moved = {k: np.asarray(v, dtype=np.float64) - w0[k] for k, v in server.weights.items()}
    check_mean(moved, devices, 2, mlp_bundle)


def test_a_restart_abandons_the_open_buffers_and_the_ledger_counts_nothing_of_them(
    mlp_bundle: Bundle, tmp_path: Path
) -> None:
    broker = InMemoryBroker()
    devices = fleet(broker, mlp_bundle, 3)
    for d in devices:
        d.deaf.set()  # buffer 1's keys never come: the server is killed mid-session
    rogue = InMemoryTransport(broker, "dev-0-rogue")
    store = SqliteServerStore.open(tmp_path / "server.db")
    try:
        clock = CrashableClock()
        first_transport = InMemoryTransport(broker, "server")
        first = FederatedServer(first_transport, mlp_bundle, config(), store=store, clock=clock)
        first.start()
        thread = in_thread(first.run)
        wait_for(lambda: store.get_setting("secagg_buffers") == {"rounds": [1]})
        assert store.open_rounds() == [1] and all(len(d.tasks) == 0 for d in devices)  # deaf: nothing seen
        rogue.start()  # a plain UPDATE is refused while secure aggregation is on
        plain = UpdateMessage(
            device_id="dev-0", round=1, task_id="x", model_version=0, num_examples=5, codec="fp32", payload=b""
        )
        rogue.publish(TOPICS.results("dev-0"), encode_message(plain))
        wait_for(lambda: any("plain UPDATEs are refused" in r.reason for r in first.rejections))
        clock.crash.set()
        thread.join(timeout=10)
        first_transport.kill()
        assert not thread.is_alive()
        ledger = AsyncLedger.from_json(store.get_setting(ASYNC_SETTING))
        assert ledger.buffer.contributors == () and {t.round for t in ledger.tasks.values()} == {1}

        for d in devices:
            d.deaf.clear()
        second = FederatedServer(InMemoryTransport(broker, "server-2"), mlp_bundle, config(), store=store)
        second.start()
        ledger = AsyncLedger.from_json(store.get_setting(ASYNC_SETTING))
        assert ledger.tasks == {} and ledger.buffer.contributors == ()
        results = second.run()
        second.close()
        version = store.get_model_version(1, weights=False)
    finally:
        rogue.close()
        store.close()
        for d in devices:
            d.stop()
    assert [(r.round, r.completed) for r in results] == [(1, False), (2, True)], results
    assert "server restarted during secure-aggregation buffer 1" in results[0].reason
    assert second.model_version == 1 and version is not None and version.round == 2
    assert version.metrics["secagg"]["survivors"] and version.metrics["secagg"]["staleness"] == 0


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        ({"secagg": {"threshold": 4}}, r"secagg.threshold \(4\) exceeds a buffer's cohort \(3 devices\)"),
        ({"asynchronous": {"buffer_size": 3, "concurrency": 2}}, r"asynchronous.concurrency \(2\)"),
        ({"asynchronous": {"buffer_size": 1}}, "asynchronous.buffer_size"),
        ({"trust": {}}, "trust:"),
    ],
)
def test_async_secagg_settings_errors_name_the_key(extra: dict[str, object], phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        config(**extra)


def test_over_selection_sizes_the_cohort() -> None:
    cfg = config(over_selection=1.5, asynchronous={"buffer_size": 4, "concurrency": 6})
    assert cfg.secagg_settings() is not None
    with pytest.raises(ConfigError, match=r"below a buffer's cohort \(6 devices\)"):
        config(over_selection=1.5, asynchronous={"buffer_size": 4, "concurrency": 5})
