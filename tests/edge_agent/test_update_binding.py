"""Update binding on the device side: TASK/UPDATE fields on the wire, and re-sends after a restart."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import MalformedMessage
from edge_agent.protocol.binding import (
    TaskBinding,
    binding_refusal,
    new_nonce,
    payload_digest,
)
from edge_agent.protocol.messages import TaskMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.tensors import encode_tensors
from edge_agent.store import DeviceStore
from edge_agent.uploads import Uploader

NONCE, BASE = "ab" * 16, "cd" * 32


def task(**kw: object) -> TaskMessage:
    fields: dict[str, object] = {
        "device_id": "d1",
        "round": 2,
        "task_id": "r2-x",
        "model_version": 1,
        "bundle_digest": "e" * 64,
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.1,
        "deadline_s": 30.0,
        "weights": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
    }
    fields.update(kw)
    return TaskMessage(**fields)  # type: ignore[arg-type]


def update(**kw: object) -> UpdateMessage:
    fields: dict[str, object] = {"device_id": "d1", "round": 2, "task_id": "r2-x", "model_version": 1}
    fields |= {"num_examples": 5, "nonce": NONCE, "base_digest": BASE, "payload": b"FFCU..."}
    fields.update(kw)
    return UpdateMessage(**fields)  # type: ignore[arg-type]


def test_task_nonce_round_trips_and_the_decoder_digests_the_payload_as_received() -> None:
    envelope = encode_message(task(nonce=NONCE))
    decoded = decode_message(envelope)
    assert isinstance(decoded, TaskMessage) and decoded.nonce == NONCE
    payload = encode_tensors(task().weights)
    assert envelope.endswith(payload)
    assert decoded.weights_digest == hashlib.sha256(payload).hexdigest() == payload_digest(payload)
    other = decode_message(encode_message(task(weights={"w": np.ones((2, 3), np.float32)})))
    assert isinstance(other, TaskMessage) and other.weights_digest != decoded.weights_digest


def test_a_task_or_update_without_binding_fields_decodes_as_unbound_and_encodes_without_them() -> None:
    plain = decode_message(encode_message(task()))
    assert isinstance(plain, TaskMessage) and plain.nonce == ""
    envelope = encode_message(update(nonce="", base_digest=""))
    assert b'"nonce"' not in envelope and b'"base_digest"' not in envelope
    back = decode_message(envelope)
    assert isinstance(back, UpdateMessage) and (back.nonce, back.base_digest) == ("", "")


def test_update_binding_fields_round_trip() -> None:
    back = decode_message(encode_message(update()))
    assert isinstance(back, UpdateMessage) and (back.nonce, back.base_digest) == (NONCE, BASE)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (update(nonce="AB" * 16), "'nonce' is not 32 lower-case hex"),
        (update(nonce="ab" * 15), "'nonce' is not 32 lower-case hex"),
        (update(base_digest="cd" * 31), "'base_digest' is not 64 lower-case hex"),
        (task(nonce="xyz"), "TASK field 'nonce'"),
    ],
)
def test_malformed_binding_fields_are_refused_naming_the_field(message: object, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode_message(encode_message(message))  # type: ignore[arg-type]


def test_new_nonces_are_fresh_hex() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100 and all(len(n) == 32 and n == n.lower() for n in nonces)


def test_binding_refusal_order_and_codes() -> None:
    bound = TaskBinding(NONCE, BASE)
    ok = {"device_id": "d1", "nonce": NONCE, "base_digest": BASE, "owner": "d1", "task_id": "t"}
    assert binding_refusal(**ok, binding=bound) is None
    cases = [({"owner": "d2"}, "cross_device"), ({"nonce": ""}, "bad_nonce"), ({"nonce": "0" * 32}, "bad_nonce")]
    cases += [({"base_digest": "0" * 64}, "wrong_base")]
    for change, code in cases:
        refusal = binding_refusal(**{**ok, **change}, binding=bound)  # type: ignore[arg-type]
        assert refusal is not None and refusal.code == code
    assert binding_refusal(**{**ok, "nonce": ""}, binding=TaskBinding()) is None  # issued unbound


def test_a_stored_result_resent_after_a_restart_keeps_its_nonce_and_base_digest(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    store = DeviceStore.open(path, clock=lambda: 100.0)
    store.put_result("r2-x", 2, encode_message(update()), 1000.0)
    store.close()
    sent: list[bytes] = []
    reopened = DeviceStore.open(path, clock=lambda: 200.0)  # the agent restarted
    uploader = Uploader(
        reopened, lambda envelope, _r, _t: sent.append(envelope) or "done", clock=lambda: 200.0, rng=random.Random(0)
    )
    item = uploader.next_item(200.0)
    assert item is not None and uploader.send(item)
    reopened.close()
    again = decode_message(sent[0])
    assert isinstance(again, UpdateMessage)
    assert (again.nonce, again.base_digest, again.attempt) == (NONCE, BASE, 1)
