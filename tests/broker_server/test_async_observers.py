"""AsyncObservers (trust and participation for FedBuff versions) against real FedBuff buffers,
real Safeguards/Reputation and a real SQLite store for the reputation; hand-computed measurements.

The engine glue that calls these hooks from the running AsyncEngine is exercised by
``test_async_trust.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from broker_server.async_observers import AsyncObservers, measure_update, worst
from broker_server.fedbuff import Accepted, BufferResult, FedBuff, FedBuffConfig
from broker_server.journal import RoundJournal
from broker_server.persistence import SqliteServerStore
from broker_server.robust import Observation, Reputation, TrustConfig
from broker_server.safeguards import TRUST_SETTING, Safeguards
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage

SPECS = (
    TensorSpec(name="w", shape=(2,), dtype="float32", role="parameter", trainable=True, aggregate=True),
    TensorSpec(name="b", shape=(1,), dtype="float32", role="parameter", trainable=True, aggregate=True),
)
EXPECTED = {spec.name: spec.shape for spec in SPECS}
HONEST = ("h-0", "h-1", "h-2", "h-3")
#: quarantine after 3 outlier buffers in a row; no distance test (cosine is what flags here)
TRUST = TrustConfig(quarantine_after=3, min_round_size=100)


class RecordingCounters:
    """The participation port, recording each call (the real store's method is tested with the glue)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def count_participation(self, counter: str, device_ids: Sequence[str]) -> None:
        self.calls.append((counter, list(device_ids)))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteServerStore]:
    opened = SqliteServerStore.open(tmp_path / "server.db")
    yield opened
    opened.close()


def update(device_id: str, task_id: str, w: tuple[float, float], b: float, *, num_examples: int = 10) -> UpdateMessage:
    delta = {"w": np.array(w, np.float32), "b": np.array([b], np.float32)}
    return UpdateMessage(
        device_id=device_id,
        round=1,
        task_id=task_id,
        model_version=0,
        num_examples=num_examples,
        payload=encode_update(delta, CodecSpec("fp32"), rng=np.random.default_rng(0)),
    )


def buffer_of(updates: list[UpdateMessage]) -> BufferResult:
    """A real FedBuff buffer sealed with ``updates``."""
    fedbuff = FedBuff(FedBuffConfig(buffer_size=len(updates)), SPECS)
    for u in updates:
        assert isinstance(fedbuff.offer(u), Accepted)
    sealed = fedbuff.flush()
    assert sealed is not None
    return sealed


def test_an_update_is_measured_against_the_reference_by_hand() -> None:
    payload = update("d", "t", (3.0, 4.0), 0.0).payload
    seen = measure_update(payload, EXPECTED, {"w": np.array([3.0, 0.0]), "b": np.array([0.0])})
    # x = (3, 4, 0), r = (3, 0, 0): x·r = 9, |x| = 5, |r| = 3 -> cosine 0.6; x - r = (0, 4, 0)
    assert seen.cosine == pytest.approx(0.6) and seen.distance == pytest.approx(4.0)
    reference = {"w": np.array([3.0, 0.0]), "b": np.array([2.0])}
    zero = measure_update(update("d", "t", (0.0, 0.0), 0.0).payload, EXPECTED, reference)
    assert zero.cosine == 0.0 and zero.distance == pytest.approx(math.sqrt(13))
    reference = {"w": np.array([2.0, 0.0]), "b": np.array([0.0])}
    opposite = measure_update(update("d", "t", (-1.0, 0.0), 0.0).payload, EXPECTED, reference)
    assert opposite.cosine == pytest.approx(-1.0) and opposite.distance == pytest.approx(3.0)


def test_a_device_with_two_updates_in_a_buffer_is_observed_by_its_worse_one() -> None:
    merged = worst(Observation(distance=1.0, cosine=0.9), Observation(distance=0.5, cosine=-0.2))
    assert (merged.distance, merged.cosine) == (1.0, -0.2)
    observers = AsyncObservers(
        Safeguards(None, TRUST, SPECS), SPECS, journal=RoundJournal(None, wall_clock=float), counters=None
    )
    observers.reference = {"w": np.array([1.0, 0.0], np.float32), "b": np.array([0.0], np.float32)}
    updates = [
        update("h-0", "t1", (1.0, 0.0), 0.0),
        update("h-0", "t2", (-1.0, 0.0), 0.0),
        update("h-1", "t3", (2, 0), 0),
    ]
    for u in updates:
        observers.accepted(u)
    decisions = observers.sealed(5, buffer_of(updates))
    # h-0's worse update points away from the reference: one outlier round (of 3) for it only
    assert [(d.device_id, d.action, d.round) for d in decisions] == [("h-0", "outlier", 5)]


def test_participation_is_counted_per_event_and_not_without_a_store() -> None:
    counters = RecordingCounters()
    observers = AsyncObservers(
        Safeguards(None, None, SPECS), SPECS, journal=RoundJournal(None, wall_clock=float), counters=counters
    )
    observers.issued(["a", "b", "a"])
    observers.accepted(update("a", "t1", (1.0, 0.0), 0.0))
    observers.failed("b")
    observers.issued([])
    assert counters.calls == [("selected", ["a", "b", "a"]), ("accepted", ["a"]), ("failed", ["b"])]
    assert observers.sealed(1, buffer_of([update("a", "t1", (1.0, 0.0), 0.0)])) == []  # no trust: nothing observed
    assert observers.reference is None
    quiet = AsyncObservers(
        Safeguards(None, None, SPECS), SPECS, journal=RoundJournal(None, wall_clock=float), counters=None
    )
    quiet.issued(["a"])  # no store: nothing to count, nothing raised


def honest_and_attacker(number: int) -> list[UpdateMessage]:
    """Honest devices push along +w (with a little spread); the attacker sends -4x their direction."""
    updates = [update(d, f"{d}-{number}", (1.0 + 0.1 * i, 0.1 * number), 0.05) for i, d in enumerate(HONEST)]
    return [*updates, update("evil", f"evil-{number}", (-4.0, -0.4 * number), -0.2)]


def test_buffers_update_the_reputation_quarantine_the_attacker_and_store_it(store: SqliteServerStore) -> None:
    safeguards = Safeguards(None, TRUST, SPECS)
    journal = RoundJournal(store, wall_clock=float)
    observers = AsyncObservers(safeguards, SPECS, journal=journal, counters=None)
    actions: list[tuple[str, str, int]] = []
    for number in range(1, 5):  # buffer = round number, as the engine numbers them
        updates = honest_and_attacker(number)
        for u in updates:
            observers.accepted(u)
        decisions = observers.sealed(number, buffer_of(updates))
        actions += [(d.device_id, d.action, d.round) for d in decisions]
    # buffer 1 had no reference (nothing observed). From buffer 2 on the reference is the last
    # buffer's mean, w = ((1.0 + 1.1 + 1.2 + 1.3 - 4) / 5, ...) = (0.12, ...): along +w, so the
    # attacker's cosine is negative (an outlier three buffers in a row: quarantined) and the honest
    # devices' positive
    assert actions == [("evil", "outlier", 2), ("evil", "outlier", 3), ("evil", "quarantine", 4)]
    assert safeguards.reputation is not None and safeguards.reputation.quarantined == ("evil",)
    assert safeguards.excluded(["evil", "h-0"]) == {"evil": safeguards.reputation.status("evil").reason}
    stored = Reputation.from_state(store.get_setting(TRUST_SETTING), TRUST)
    assert stored.quarantined == ("evil",) and stored.last_round == 4
    assert stored.status("h-0").score > TRUST.initial_score  # three clean observations raised it
    # a buffer number the reputation holds already (e.g. replayed after a crash) is not observed twice
    updates = honest_and_attacker(4)
    for u in updates:
        observers.accepted(u)
    assert observers.sealed(4, buffer_of(updates)) == []
