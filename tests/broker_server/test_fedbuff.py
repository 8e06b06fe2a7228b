"""FedBuff: staleness weighting, acceptance rules, sealing every M updates, and no update lost or
counted twice when many threads offer at once."""

from __future__ import annotations

import random
import sys
import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_server.aggregate import weighted_mean
from broker_server.fedbuff import (
    Accepted,
    BufferResult,
    ConstantStaleness,
    FedBuff,
    FedBuffConfig,
    HingeStaleness,
    IssuedTask,
    PolynomialStaleness,
    Rejected,
)
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ConfigError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage

SPECS = (
    TensorSpec(name="w", shape=(3,), dtype="float32", role="parameter", trainable=True, aggregate=True),
    TensorSpec(name="b", shape=(2, 2), dtype="float32", role="parameter", trainable=True, aggregate=True),
)


def delta_for(device: str, task: str) -> dict[str, np.ndarray]:
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(device + "/" + task))
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=3).astype(np.float32), "b": rng.normal(size=(2, 2)).astype(np.float32)}


def update(
    device: str = "d1", task: str = "t1", *, version: int = 0, n: int = 10, codec: str = "fp32", **kw
) -> UpdateMessage:
    payload = encode_update(delta_for(device, task), CodecSpec.parse(codec), rng=np.random.default_rng(0))
    fields: dict[str, Any] = {"round": 1, "metrics": {"train_loss": 1.0}, "payload": payload, "codec": codec}
    fields.update(kw)
    return UpdateMessage(device_id=device, task_id=task, model_version=version, num_examples=n, **fields)


def buffer(**kw) -> FedBuff:
    version = kw.pop("version", 0)
    task_of = kw.pop("task_of", None)
    return FedBuff(FedBuffConfig(**kw), SPECS, version=version, task_of=task_of)


# -- staleness functions --------------------------------------------------------------------------


def test_staleness_functions() -> None:
    assert ConstantStaleness()(7) == 1.0
    sqrt = PolynomialStaleness()
    assert [sqrt(s) for s in (0, 3, 8)] == pytest.approx([1.0, 0.5, 1 / 3])
    assert PolynomialStaleness(exponent=1.0)(4) == pytest.approx(0.2)
    hinge = HingeStaleness(threshold=2, slope=0.5)
    assert [hinge(s) for s in (0, 2, 3, 6)] == pytest.approx([1.0, 1.0, 1 / 1.5, 1 / 3])


@given(st.floats(0, 4), st.integers(0, 50))
def test_polynomial_staleness_is_in_unit_interval_and_non_increasing(exponent: float, s: int) -> None:
    fn = PolynomialStaleness(exponent=exponent)
    assert 0 < fn(s + 1) <= fn(s) <= 1


def test_a_staleness_function_outside_the_unit_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match="s=0"):
        FedBuffConfig(staleness=lambda s: 2.0)
    with pytest.raises(ConfigError, match="s=3"):
        FedBuffConfig(max_staleness=3, staleness=lambda s: 1.0 if s < 3 else 0.0)
    with pytest.raises(ConfigError, match="codec names"):
        FedBuffConfig(codecs=frozenset({"topk-int8:0.1"}))


# -- acceptance rules -----------------------------------------------------------------------------


def test_weight_is_examples_times_staleness_weight() -> None:
    buf = buffer(buffer_size=10, max_staleness=5, version=3)
    outcome = buf.offer(update(version=1, n=20))
    assert isinstance(outcome, Accepted)
    assert (outcome.staleness, outcome.version, outcome.ready) == (2, 4, False)
    assert outcome.weight == pytest.approx(20 / 3**0.5)


def test_stale_future_and_duplicate_updates_are_refused_and_change_nothing() -> None:
    buf = buffer(buffer_size=10, max_staleness=2, version=5)
    assert isinstance(buf.offer(update("d1", "t1", version=5)), Accepted)
    stale = buf.offer(update("d2", "t2", version=2))
    assert isinstance(stale, Rejected) and stale.reason == "stale" and "staleness 3 > max 2" in stale.detail
    future = buf.offer(update("d3", "t3", version=6))
    assert isinstance(future, Rejected) and future.reason == "future_version"
    dup = buf.offer(update("d1", "t1", version=5, attempt=2))
    assert isinstance(dup, Rejected) and dup.reason == "duplicate"
    # the same task id from another device is another key
    assert isinstance(buf.offer(update("d4", "t1", version=4)), Accepted)
    assert buf.pending == 2
    assert buf.rejections() == {"stale": 1, "future_version": 1, "duplicate": 1}


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (update(codec="int8"), "contract_violation"),  # not offered
        (update(n=0), "contract_violation"),
        (update(n=10**9), "contract_violation"),
        (
            update(
                payload=encode_update({"w": np.zeros(4, np.float32)}, CodecSpec("fp32"), rng=np.random.default_rng(0))
            ),
            "contract_violation",
        ),
        (update(payload=update().payload[:-3]), "malformed_message"),
        (update(codec="fp16"), "contract_violation"),  # says fp16, payload is fp32
    ],
)
def test_invalid_updates_are_refused_with_an_error_code_and_change_nothing(bad: UpdateMessage, code: str) -> None:
    buf = buffer(buffer_size=2, codecs=frozenset({"fp32", "fp16"}))
    if bad.codec == "fp16":
        bad = UpdateMessage(**{**bad.__dict__, "payload": update().payload})
    outcome = buf.offer(bad)
    assert isinstance(outcome, Rejected) and outcome.reason == "invalid" and outcome.error_code == code
    # the refused key is not remembered, and the buffer is untouched
    assert isinstance(buf.offer(update()), Accepted) and buf.pending == 1


def test_with_a_task_table_only_issued_tasks_at_their_version_are_accepted() -> None:
    tasks = {"t1": IssuedTask(device_id="d1", model_version=0), "t2": IssuedTask(device_id="d2", model_version=1)}
    buf = buffer(task_of=tasks.get, version=1)
    assert isinstance(buf.offer(update("d1", "t1", version=0)), Accepted)
    for bad, reason in (
        (update("d2", "t1", version=0), "cross_device"),
        (update("d1", "t9", version=0), "unknown_task"),
        (update("d2", "t2", version=0), "wrong_base"),  # not the version the task was issued with
    ):
        outcome = buf.offer(bad)
        assert isinstance(outcome, Rejected) and outcome.reason == reason, bad
        assert outcome.error_code == (reason if reason != "unknown_task" else "contract_violation")


# -- sealing and versions -------------------------------------------------------------------------


def test_every_m_updates_seal_the_next_version_with_the_weighted_mean() -> None:
    buf = buffer(buffer_size=3, max_staleness=4, version=2)
    offered = [
        update("d1", "t1", version=2, n=10),
        update("d2", "t2", version=1, n=30),
        update("d3", "t3", version=0, n=5),
    ]
    outcomes = [buf.offer(u) for u in offered]
    assert [o.ready for o in outcomes if isinstance(o, Accepted)] == [False, False, True]
    result = buf.flush()
    assert result is not None and buf.flush() is None
    assert (result.version, result.base_version, buf.version) == (3, 2, 3)
    weights = [10.0, 30 / 2**0.5, 5 / 3**0.5]
    assert [c.weight for c in result.contributors] == pytest.approx(weights)
    expected = weighted_mean((delta_for(u.device_id, u.task_id), w) for u, w in zip(offered, weights, strict=True))
    for name in expected:
        np.testing.assert_allclose(result.mean_delta[name], expected[name], rtol=1e-6)
    assert result.num_examples == 45 and result.train_metrics == {"train_loss": pytest.approx(1.0)}
    # the next update's staleness counts the version the seal produced
    nxt = buf.offer(update("d4", "t4", version=2))
    assert isinstance(nxt, Accepted) and nxt.staleness == 1 and nxt.version == 4


def test_partial_flush_seals_a_non_empty_buffer_only_on_request() -> None:
    buf = buffer(buffer_size=5)
    assert buf.flush(partial=True) is None
    buf.offer(update())
    assert buf.flush() is None
    result = buf.flush(partial=True)
    assert result is not None and result.version == 1 and len(result.contributors) == 1 and buf.pending == 0


def test_a_newer_caller_version_is_adopted_and_an_older_one_ignored() -> None:
    buf = buffer(buffer_size=1, max_staleness=3)
    first = buf.offer(update("d1", "t1", version=0), current_version=0)  # seals v1
    assert isinstance(first, Accepted) and first.ready
    # the caller has not applied v1 yet and still says 0: staleness counts from v1
    late = buf.offer(update("d2", "t2", version=0), current_version=0)
    assert isinstance(late, Accepted) and late.staleness == 1 and late.version == 2
    jumped = buf.offer(update("d3", "t3", version=7), current_version=9)
    assert isinstance(jumped, Accepted) and jumped.staleness == 2 and jumped.version == 10
    versions = [r.version for r in iter(buf.flush, None)]
    assert versions == [1, 2, 10]


def test_with_a_task_table_keys_outside_the_staleness_window_are_forgotten_yet_stay_refused() -> None:
    tasks = {"t1": IssuedTask(device_id="d1", model_version=0), "t2": IssuedTask(device_id="d2", model_version=1)}
    buf = buffer(buffer_size=1, max_staleness=1, task_of=tasks.get)
    buf.offer(update("d1", "t1", version=0))  # -> v1
    buf.offer(update("d2", "t2", version=1))  # -> v2: d1/t1 (issued at v0) forgotten
    assert buf._seen.keys() == {("d2", "t2")}
    for replay in (update("d1", "t1", version=0), update("d1", "t1", version=2)):
        outcome = buf.offer(replay)
        assert isinstance(outcome, Rejected) and outcome.reason in ("stale", "wrong_base")


def test_without_a_task_table_keys_are_remembered_up_to_capacity() -> None:
    buf = buffer(buffer_size=1, max_staleness=1, max_remembered_keys=2)
    for i in range(3):
        assert isinstance(buf.offer(update(f"d{i}", f"t{i}", version=i)), Accepted)
    assert list(buf._seen) == [("d1", "t1"), ("d2", "t2")]
    # a replay under a fresher version is still caught while remembered (its buffer was sealed)
    replay = buf.offer(update("d1", "t1", version=3))
    assert isinstance(replay, Rejected) and replay.reason == "replayed"


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrent_offers_lose_nothing_and_count_nothing_twice() -> None:
    threads, per_thread, devices = 8, 200, 120
    buf = buffer(buffer_size=7, max_staleness=6, staleness=HingeStaleness(threshold=1, slope=0.5))
    # a shared pool of updates: each thread offers random picks, so many keys arrive several times
    rng = random.Random(6)
    pool = [update(f"d{rng.randrange(devices)}", f"t{i}", n=rng.randint(1, 50)) for i in range(900)]
    accepted: list[tuple[tuple[str, str], Accepted]] = []
    results: list[BufferResult] = []
    barrier = threading.Barrier(threads)

    def worker(seed: int) -> None:
        local = random.Random(seed)
        barrier.wait()
        for _ in range(per_thread):
            base = pool[local.randrange(len(pool))]
            # based on a recent version: some stale, most fresh
            version = max(0, buf.version - local.randint(0, 8))
            u = UpdateMessage(**{**base.__dict__, "model_version": version, "attempt": local.randint(1, 3)})
            outcome = buf.offer(u)
            if isinstance(outcome, Accepted):
                accepted.append(((u.device_id, u.task_id), outcome))
                if outcome.ready and (flushed := buf.flush()) is not None:
                    results.append(flushed)

    pool_threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so unsynchronised code would interleave
    try:
        for t in pool_threads:
            t.start()
        for t in pool_threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    results.extend(iter(lambda: buf.flush(partial=True), None))

    keys = [key for key, _ in accepted]
    assert len(keys) == len(set(keys)) > 300, "each key accepted once"
    contributed = Counter((c.device_id, c.task_id) for r in results for c in r.contributors)
    assert set(contributed) == set(keys) and max(contributed.values()) == 1, "each accepted update in one flush"
    assert sorted(r.version for r in results) == list(range(1, len(results) + 1)), "versions made once each"
    results.sort(key=lambda r: r.version)
    assert all(len(r.contributors) == 7 for r in results[:-1]) and 1 <= len(results[-1].contributors) <= 7
    assert sum(r.total_weight for r in results) == pytest.approx(sum(a.weight for _, a in accepted))
    rejected = buf.rejections()
    assert rejected["duplicate"] > 0 and rejected.get("stale", 0) > 0
    assert sum(rejected.values()) + len(accepted) == threads * per_thread

    for result in results:  # every flushed mean equals a sequential recomputation from its contributors
        expected = weighted_mean((delta_for(c.device_id, c.task_id), c.weight) for c in result.contributors)
        for name in expected:
            np.testing.assert_allclose(result.mean_delta[name], expected[name], rtol=1e-5, atol=1e-6)
        for c in result.contributors:
            assert c.weight == pytest.approx(c.num_examples * HingeStaleness(threshold=1, slope=0.5)(c.staleness))
            assert c.staleness == result.base_version - c.model_version
