"""Example-weighted updates in the ring, and the device's session object refusing bad messages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_agent.errors import ContractViolation, MalformedMessage, SecAggInputError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import SecAggMessage, TaskMessage
from edge_agent.protocol.secagg_messages import SecAggTask
from edge_agent.secagg import RingSpec, ring_spec_for
from edge_agent.secagg.weighting import (
    count_words,
    decode_weighted,
    encode_weighted,
    session_length,
    weighted_bound,
)
from edge_agent.secagg_session import SecAggSessions


def test_the_ring_sum_of_weighted_updates_decodes_to_the_fedavg_mean_and_the_exact_count() -> None:
    rng = np.random.default_rng(1)
    spec = ring_spec_for(5, clip=0.5, quant_bits=8)
    counts = [3, 700, 41, 5000, 1]
    updates = [rng.normal(0, 0.05, 200) for _ in counts]
    unit = float(np.mean(counts))
    words = [encode_weighted(u, n, unit, spec, rng) for u, n in zip(updates, counts, strict=True)]
    assert all(w.size == session_length(200, spec) == 200 + count_words(spec) for w in words)
    ring_sum = np.sum(words, axis=0).astype(spec.dtype)  # no wrap-around: the ring holds 5 devices
    decoded = decode_weighted(ring_sum, len(counts), spec, unit)
    fedavg = sum(n * np.clip(u * n / unit, -0.5, 0.5) * unit / n for u, n in zip(updates, counts, strict=True))
    fedavg = fedavg / sum(counts)
    assert decoded.total_examples == sum(counts)
    assert np.abs(decoded.mean - fedavg).max() < weighted_bound(5, spec, unit, sum(counts))
    assert np.abs(decoded.mean - fedavg).max() > 0  # it is quantized, not copied


def test_weighting_refuses_bad_input() -> None:
    spec = RingSpec(clip=1.0, quant_bits=8, ring_bits=16)
    rng = np.random.default_rng(0)
    with pytest.raises(SecAggInputError, match="num_examples"):
        encode_weighted(np.zeros(3), 0, 1.0, spec, rng)
    with pytest.raises(SecAggInputError, match="weight_unit"):
        encode_weighted(np.zeros(3), 1, float("nan"), spec, rng)
    with pytest.raises(SecAggInputError, match="holds no update"):
        decode_weighted(np.zeros(count_words(spec), dtype=spec.dtype), 1, spec, 1.0)


def _task(session: bytes, cohort: int = 3) -> TaskMessage:
    spec = ring_spec_for(cohort, clip=0.1)
    return TaskMessage(
        device_id="dev",
        round=1,
        task_id="t1",
        model_version=0,
        bundle_digest="x",
        epochs=1,
        batch_size=1,
        lr=0.1,
        deadline_s=60,
        secagg=SecAggTask(
            session=session,
            index=1,
            cohort=cohort,
            threshold=2,
            quant_bits=8,
            ring_bits=spec.ring_bits,
            clip=0.1,
            length=session_length(6, spec),
        ),
    )


def test_the_device_session_advertises_at_once_and_refuses_unknown_or_oversize_messages() -> None:
    sent: list[SecAggMessage] = []
    specs = [TensorSpec(name="w", shape=(2, 3), dtype="float32", role="param", trainable=True, aggregate=True)]
    sessions = SecAggSessions(
        "dev",
        lambda: specs,
        publish=sent.append,
        send_large=lambda m: "done",
        rng=np.random.default_rng(0),
        wall_clock=lambda: 0.0,
    )
    session = bytes(range(16))
    sessions.start(_task(session))
    assert [m.kind_name for m in sent] == ["AdvertiseKeys"] and sessions.holds("t1")
    sessions.start(_task(session))  # a repeated TASK repeats the same keys
    assert len(sent) == 2 and sent[0].payload == sent[1].payload

    def message(payload: bytes, sess: bytes = session, task_id: str = "t1") -> SecAggMessage:
        return SecAggMessage(device_id="dev", round=1, task_id=task_id, session=sess, payload=payload)

    header = b"FFSA\x01\x03" + session
    with pytest.raises(ContractViolation, match="unknown session"):
        sessions.handle(message(b"FFSA\x01\x03" + bytes(16) + b"\x00\x00", sess=bytes(16)))
    with pytest.raises(ContractViolation, match="unknown session"):
        sessions.handle(message(header + b"\x00\x00", task_id="other"))
    with pytest.raises(ContractViolation, match="exceeds"):
        sessions.handle(message(header + bytes(10_000)))
    with pytest.raises(MalformedMessage):
        sessions.handle(message(header + b"\x05"))  # a truncated KeyList
    assert sessions.holds("t1")  # none of it ended the session
    with pytest.raises(ContractViolation, match="does not fit this model"):
        sessions.start(_wrong_length(bytes(range(1, 17))))
    sessions.purge(61.0)
    assert not sessions.active


def _wrong_length(session: bytes) -> TaskMessage:
    task = _task(session)
    assert task.secagg is not None
    return dataclasses.replace(task, task_id="t2", secagg=dataclasses.replace(task.secagg, length=3))
