"""Acceptance rules of one round: at most once, only the issued device, only the model's shapes."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.rounds import RoundState
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ContractViolation, ProtocolError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage

SPECS = (TensorSpec(name="w", shape=(2,), dtype="float32", role="parameter", trainable=True, aggregate=True),)


def update(device: str = "d1", task: str = "t1", n: int = 10, value: float = 1.0, **kw) -> UpdateMessage:
    fields = {"round": 1, "model_version": 0, "metrics": {"train_loss": value}}
    fields.update(kw)
    payload = encode_update({"w": np.full(2, value, np.float32)}, CodecSpec("fp32"), rng=np.random.default_rng(0))
    return UpdateMessage(device_id=device, task_id=task, num_examples=n, payload=payload, **fields)


def state() -> RoundState:
    return RoundState(round=1, model_version=0, tasks={"t1": "d1", "t2": "d2"}, specs=SPECS)


def test_duplicate_update_is_counted_once() -> None:
    s = state()
    assert s.accept_update(update())
    assert not s.accept_update(update(value=100.0))
    assert s.duplicates == 1 and s.mean.count == 1
    np.testing.assert_allclose(s.mean.result()["w"], [1.0, 1.0])


def test_round_finishes_when_every_task_reported_or_failed() -> None:
    s = state()
    s.accept_update(update())
    assert not s.finished
    s.record_error(ErrorMessage(device_id="d2", round=1, task_id="t2", code="training_error", reason="x"))
    assert s.finished and s.failed == {"t2": "training_error: x"}


def test_metrics_are_example_weighted() -> None:
    s = state()
    s.accept_update(update(n=10, value=1.0))
    s.accept_update(update(device="d2", task="t2", n=30, value=5.0))
    assert s.mean_metrics()["train_loss"] == pytest.approx(4.0)
    assert s.num_examples == 40


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (update(task="nope"), "not a task of round 1"),
        (update(device="d2"), "issued to 'd1'"),
        (update(round=2), "round 2"),
        (update(model_version=5), "v5"),
        (update(n=10**9), "num_examples"),
    ],
)
def test_unacceptable_updates_are_rejected_and_change_nothing(bad: UpdateMessage, match: str) -> None:
    s = state()
    with pytest.raises(ContractViolation, match=match):
        s.accept_update(bad)
    assert s.mean.count == 0 and not s.accepted


def _encoded(delta: dict, codec: str = "fp32") -> bytes:
    return encode_update(delta, CodecSpec.parse(codec), rng=np.random.default_rng(0))


@pytest.mark.parametrize(
    "payload",
    [
        _encoded({"w": np.zeros(3, np.float32)}),  # wrong shape
        _encoded({"x": np.zeros(2, np.float32)}),  # wrong name
        _encoded({}),  # missing tensor
        _encoded({"w": np.zeros(2, np.float32), "x": np.zeros(1, np.float32)}),  # extra tensor
        _encoded({"w": np.ones(2, np.float32)})[:-3],  # truncated
        b"FFCU" + bytes(20),  # garbage body
    ],
)
def test_bad_payloads_are_rejected_and_change_nothing(payload: bytes) -> None:
    s = state()
    assert s.accept_update(update(device="d2", task="t2", n=5, value=2.0))
    with pytest.raises(ProtocolError):
        s.accept_update(UpdateMessage(**{**vars(update()), "payload": payload}))
    assert s.mean.count == 1 and s.accepted == {"t2"}
    np.testing.assert_allclose(s.mean.result()["w"], [2.0, 2.0])
    assert s.accept_update(update())  # the device can still deliver a good update for the task


def test_codec_must_be_offered_and_match_the_payload() -> None:
    s = RoundState(round=1, model_version=0, tasks={"t1": "d1"}, specs=SPECS, codecs=frozenset({"int8"}))
    with pytest.raises(ContractViolation, match="not offered"):
        s.accept_update(update())  # fp32 was not offered
    lying = UpdateMessage(**{**vars(update()), "codec": "int8"})  # header says int8, payload is fp32
    with pytest.raises(ContractViolation, match="payload"):
        s.accept_update(lying)
    good = UpdateMessage(
        **{**vars(update()), "codec": "int8", "payload": _encoded({"w": np.ones(2, np.float32)}, "int8")}
    )
    assert s.accept_update(good)
    np.testing.assert_allclose(s.mean.result()["w"], [1.0, 1.0])


def test_registry_leaves_out_devices_that_reported_they_cannot_train() -> None:
    from broker_server.registry import DeviceRegistry
    from edge_agent.protocol.messages import StatusMessage

    def status(device_id: str, eligibility: dict[str, object]) -> StatusMessage:
        return StatusMessage(
            device_id=device_id, online=True, bundle_digest="b" * 64, num_examples=5, eligibility=eligibility
        )

    registry = DeviceRegistry()
    low = {"eligible": False, "phase": "train", "reasons": [{"code": "battery_low", "text": "battery 23% < 60%"}]}
    metered = {"eligible": False, "phase": "upload", "reasons": [{"code": "network_metered", "text": "metered"}]}
    registry.observe(status("a", {}), 0.0)
    registry.observe(status("b", low), 0.0)
    registry.observe(status("c", metered), 0.0)
    registry.observe(status("d", {"eligible": True, "phase": "train", "reasons": []}), 0.0)
    assert registry.eligible("b" * 64) == ["a", "c", "d"]
    record = registry.get("b")
    assert record is not None and record.declines and record.eligibility["reasons"][0]["code"] == "battery_low"
    registry.observe(status("b", {"eligible": True, "phase": "train", "reasons": []}), 1.0)  # charger plugged in
    assert registry.eligible("b" * 64) == ["a", "b", "c", "d"]


def test_the_device_class_an_agent_announces_reaches_the_registry() -> None:
    from broker_server.registry import DeviceRegistry
    from edge_agent.presence import online_birth
    from edge_agent.protocol.messages import StatusMessage, decode_message

    birth = decode_message(online_birth("cam-1", "b" * 64, 7, device_class="camera").payload)
    assert isinstance(birth, StatusMessage)
    registry = DeviceRegistry()
    registry.observe(birth, 0.0)
    record = registry.get("cam-1")
    assert record is not None and record.device_class == "camera"
