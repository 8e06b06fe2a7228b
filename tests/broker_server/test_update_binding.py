"""Update binding on every server path: each refusal reason, sync rounds, late updates, FedBuff, ledger."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from broker_server.async_ledger import AsyncLedger, TaskEntry, empty_buffer, expire_tasks, issue_tasks
from broker_server.fedbuff import Accepted, FedBuff, FedBuffConfig, Rejected
from broker_server.rounds import RoundState, bind_tasks, other_round
from broker_server.update_binding import IssuedTask
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ContractViolation
from edge_agent.protocol.binding import BadNonce, CrossDevice, CrossRound, Replayed, TaskBinding, WrongBase
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage

SPECS = (TensorSpec(name="w", shape=(2,), dtype="float32", role="parameter", trainable=True, aggregate=True),)
BASE = hashlib.sha256(b"round 1 weights").hexdigest()
OTHER_BASE = hashlib.sha256(b"other weights").hexdigest()
N1, N2 = "1" * 32, "2" * 32


def update(device: str = "d1", task: str = "t1", **kw: object) -> UpdateMessage:
    fields: dict[str, object] = {"round": 1, "model_version": 0, "nonce": N1, "base_digest": BASE}
    fields.update(kw)
    payload = encode_update({"w": np.full(2, 1.0, np.float32)}, CodecSpec("fp32"), rng=np.random.default_rng(0))
    return UpdateMessage(device_id=device, task_id=task, num_examples=10, payload=payload, **fields)  # type: ignore[arg-type]


def bound_round() -> RoundState:
    bindings = {"t1": TaskBinding(N1, BASE), "t2": TaskBinding(N2, BASE)}
    return RoundState(round=1, model_version=0, tasks={"t1": "d1", "t2": "d2"}, specs=SPECS, bindings=bindings)


# -- synchronous rounds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "refusal", "code", "match"),
    [
        (update(device="d2", nonce=N2), CrossDevice, "cross_device", "issued to 'd1'"),
        (update(task="t9"), CrossRound, "cross_round", "not a task of round 1"),
        (update(round=2), CrossRound, "cross_round", "round 2"),
        (update(nonce=""), BadNonce, "bad_nonce", "no nonce"),
        (update(nonce=N2), BadNonce, "bad_nonce", "another task's nonce"),
        (update(base_digest=OTHER_BASE), WrongBase, "wrong_base", "trained from weights"),
        (update(base_digest=""), WrongBase, "wrong_base", "none"),
        (update(model_version=3), WrongBase, "wrong_base", "v3"),
    ],
)
def test_a_live_round_refuses_each_unbound_update_with_its_code(
    bad: UpdateMessage, refusal: type[ContractViolation], code: str, match: str
) -> None:
    s = bound_round()
    with pytest.raises(refusal, match=match) as info:
        s.accept_update(bad)
    assert info.value.code == code and isinstance(info.value, ContractViolation)
    assert s.mean.count == 0 and not s.accepted and s.duplicates == 0


def test_a_result_for_a_finished_round_is_replayed() -> None:
    s = RoundState(round=3, model_version=0, tasks={"t1": "d1"}, specs=SPECS, bindings={"t1": TaskBinding(N1, BASE)})
    with pytest.raises(Replayed, match="round 1, which is over"):
        s.accept_update(update(round=1))
    assert other_round(1, 3).code == "replayed" and other_round(4, 3).code == "cross_round"


def test_a_qos1_duplicate_of_a_bound_update_is_idempotent_not_refused() -> None:
    s = bound_round()
    assert s.accept_update(update())
    assert not s.accept_update(update())  # the same bytes again
    assert not s.accept_update(update(attempt=2))  # a re-send after a restart
    assert s.duplicates == 2 and s.mean.count == 1


def test_a_duplicate_with_another_nonce_is_refused_not_a_duplicate() -> None:
    s = bound_round()
    assert s.accept_update(update())
    with pytest.raises(BadNonce):
        s.accept_update(update(nonce=N2))
    assert s.duplicates == 0


def test_a_task_issued_unbound_takes_its_update_without_a_nonce() -> None:
    s = RoundState(round=1, model_version=0, tasks={"t1": "d1"}, specs=SPECS)  # restored from a v1 store
    assert s.accept_update(update(nonce="", base_digest=""))


def test_check_late_routes_uncounted_tasks_and_refuses_counted_ones_as_replayed() -> None:
    closed = bound_round()
    assert closed.accept_update(update())
    assert closed.check_late(update(device="d2", task="t2", nonce=N2))  # a straggler: routed as late
    with pytest.raises(Replayed, match="counted in round 1"):
        closed.check_late(update())  # a copy of the counted update after its round closed
    with pytest.raises(BadNonce):
        closed.check_late(update(device="d2", task="t2", nonce=N1))
    with pytest.raises(CrossDevice):
        closed.check_late(update(device="d2", nonce=N1))
    error = ErrorMessage(device_id="d1", round=1, task_id="t1", code="training_error", reason="x")
    assert not closed.check_late(error)  # a repeated ERROR is only logged


def test_bind_tasks_gives_each_task_a_fresh_nonce_and_the_round_digest() -> None:
    bindings = bind_tasks({"a": "d1", "b": "d2"}, BASE)
    assert {b.base_digest for b in bindings.values()} == {BASE}
    assert len({b.nonce for b in bindings.values()}) == 2
    assert all(len(b.nonce) == 32 and int(b.nonce, 16) >= 0 for b in bindings.values())
    counter = iter(["a" * 32, "b" * 32])
    assert bind_tasks({"x": "d1"}, BASE, nonce=lambda: next(counter))["x"].nonce == "a" * 32


# -- FedBuff (async and late updates) --------------------------------------------------------------


def issued(device: str = "d1", nonce: str = N1, base: str = BASE, round_: int | None = 1) -> IssuedTask:
    return IssuedTask(device_id=device, model_version=0, round=round_, binding=TaskBinding(nonce, base))


def fedbuff(tasks: dict[str, IssuedTask], **kw: object) -> FedBuff:
    return FedBuff(FedBuffConfig(**kw), SPECS, version=0, task_of=tasks.get)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (update(device="d2"), "cross_device"),
        (update(round=7), "cross_round"),
        (update(nonce=""), "bad_nonce"),
        (update(nonce=N2), "bad_nonce"),
        (update(base_digest=OTHER_BASE), "wrong_base"),
        (update(model_version=1), "wrong_base"),
        (update(task="t9"), "unknown_task"),
    ],
)
def test_fedbuff_refuses_each_unbound_update_with_its_reason(bad: UpdateMessage, reason: str) -> None:
    buf = fedbuff({"t1": issued()})
    outcome = buf.offer(bad)
    assert isinstance(outcome, Rejected) and outcome.reason == reason
    assert buf.pending == 0 and buf.rejections() == {reason: 1}


def test_fedbuff_copy_is_a_duplicate_while_buffered_and_replayed_once_sealed() -> None:
    buf = fedbuff({"t1": issued(), "t2": issued("d2", N2)}, buffer_size=2)
    assert isinstance(buf.offer(update()), Accepted)
    dup = buf.offer(update(attempt=2))
    assert isinstance(dup, Rejected) and dup.reason == "duplicate" and dup.error_code is None
    assert isinstance(buf.offer(update(device="d2", task="t2", nonce=N2)), Accepted)  # seals v1
    assert buf.flush() is not None
    replay = buf.offer(update())
    assert isinstance(replay, Rejected) and replay.reason == "replayed" and replay.error_code == "replayed"
    assert buf.pending == 0


def test_fedbuff_task_without_round_or_binding_is_unchecked_for_them() -> None:
    buf = fedbuff({"t1": IssuedTask(device_id="d1", model_version=0)})  # a ledger written before binding
    assert isinstance(buf.offer(update(nonce="", base_digest="", round=5)), Accepted)


# -- the async task table and its ledger -----------------------------------------------------------


def test_issued_tasks_carry_fresh_nonces_and_survive_the_ledger_round_trip() -> None:
    tasks = issue_tasks(["d1", "d2"], round_=4, model_version=2, deadline=99.0, base_digest=BASE)
    assert len({t.nonce for t in tasks.values()}) == 2 and all(k.startswith("a4-") for k in tasks)
    ledger = AsyncLedger(buffer=empty_buffer(2), tasks=tasks)
    back = AsyncLedger.from_json(ledger.to_json())
    assert dict(back.tasks) == tasks
    entry = next(iter(back.tasks.values()))
    assert entry.issued() == IssuedTask(
        device_id=entry.device_id, model_version=2, round=4, binding=TaskBinding(entry.nonce, BASE)
    )


def test_a_ledger_written_before_binding_loads_with_unbound_tasks() -> None:
    data = AsyncLedger(buffer=empty_buffer(0)).to_json()
    data["tasks"] = {"a1-x": ["d1", 0, 1, 50.0, False]}
    entry = AsyncLedger.from_json(data).tasks["a1-x"]
    assert (entry.nonce, entry.base_digest, entry.device_id) == ("", "", "d1")
    data["tasks"] = {"a1-x": ["d1", 0, 1, 50.0, False, N1]}
    with pytest.raises(Exception, match="6 fields") as info:
        AsyncLedger.from_json(data)
    assert info.value.__class__.__name__ == "StorageError"


def test_expire_tasks_marks_late_ones_and_forgets_very_stale_ones() -> None:
    tasks = {
        "fresh": TaskEntry(device_id="d1", model_version=5, round=1, deadline=100.0),
        "late": TaskEntry(device_id="d2", model_version=5, round=1, deadline=10.0),
        "ancient": TaskEntry(device_id="d3", model_version=0, round=1, deadline=100.0),
    }
    assert expire_tasks(tasks, now=50.0, oldest=3, forget_below=1)
    assert set(tasks) == {"fresh", "late"} and tasks["late"].expired and not tasks["fresh"].expired
    assert not expire_tasks(tasks, now=50.0, oldest=3, forget_below=1)
