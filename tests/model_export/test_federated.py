"""FedProx, trainable masks, personal tensors and micro-batch accumulation, on one MLP bundle."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.codecs import decode_update
from edge_agent.data import Dataset
from edge_agent.errors import ContractViolation
from edge_agent.protocol.messages import TaskMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from model_export import export_bundle
from model_export.federated import FederatedSpec
from model_export.optimizers import OptimizerSpec

MU, LR, MOMENTUM, WD = 0.5, 0.1, 0.9, 0.01


class PersonalHeadMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 12), nn.Tanh())
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(3)
    return PersonalHeadMLP()


@pytest.fixture(scope="module")
def bundle(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = export_bundle(
        model,
        input_shape=(5,),
        num_classes=3,
        out_dir=tmp_path_factory.mktemp("fed"),
        optimizer=OptimizerSpec(kind="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WD),
        federated=FederatedSpec(fedprox_mu=MU, trainable_masks=True, personal=("head.*",)),
        micro_batch=4,
    )
    return Bundle.open(out)


def _data(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.standard_normal((n, 5), dtype=np.float32), rng.integers(0, 3, n, dtype=np.int64))


def _train(bundle: Bundle, weights: dict, data: Dataset, *, micro_batch: int = 0, **kw: object):  # type: ignore[no-untyped-def]
    trainer = OrtTrainer.open(bundle, micro_batch=micro_batch)
    return trainer.train(
        weights, data.x, data.y, epochs=1, batch_size=len(data), lr=LR, rng=np.random.default_rng(0), **kw
    )  # type: ignore[arg-type]


def test_manifest_marks_personal_and_federated_inputs(bundle: Bundle) -> None:
    manifest = bundle.manifest
    personal = {t.name for t in manifest.personal_tensors}
    assert personal == {"head.weight", "head.bias"}
    assert all(not t.aggregate for t in manifest.tensors if t.name in personal)
    assert {t.name for t in manifest.aggregated_tensors} == {"body.0.weight", "body.0.bias"}
    train = manifest.graphs["train_step"]
    assert set(train.global_inputs) == {"body.0.weight", "body.0.bias"}  # no FedProx on personal tensors
    assert set(train.mask_inputs) == {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}
    assert {h.name: h.default for h in manifest.hyperparameters}["fedprox_mu"] == (MU,)
    assert manifest.micro_batch == 4 and {"accumulate", "apply"} <= set(manifest.graphs)


def test_fedprox_matches_direct_torch(bundle: Bundle, model: nn.Module) -> None:
    data = _data(12, 1)
    start = bundle.initial_weights()
    rng = np.random.default_rng(5)
    global_weights = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in start.items()}
    result = _train(bundle, start, data, global_weights=global_weights, hyperparameters={"fedprox_mu": MU})

    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    logits = reference(torch.from_numpy(data.x))
    prox = sum(
        ((p - torch.from_numpy(global_weights[n])) ** 2).sum()
        for n, p in reference.named_parameters()
        if n.startswith("body.")
    )
    (F.cross_entropy(logits, torch.from_numpy(data.y)) + MU / 2 * prox).backward()
    optimizer.step()
    for name, param in reference.named_parameters():
        np.testing.assert_allclose(result.weights[name], param.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    without = _train(bundle, start, data, global_weights=global_weights, hyperparameters={"fedprox_mu": 0.0})
    assert not np.allclose(without.weights["body.0.weight"], result.weights["body.0.weight"])


def test_frozen_tensor_and_its_optimizer_state_stay_unchanged(bundle: Bundle) -> None:
    from edge_agent.runtime.feeds import GraphRunner, mask_values, resolve_hyperparameters

    manifest = bundle.manifest
    runner = GraphRunner(bundle.session("train_step"), manifest.graphs["train_step"])
    state = bundle.initial_weights() | bundle.zero_optimizer_state()
    state["body.0.weight.momentum"] = np.full_like(state["body.0.weight.momentum"], 0.25)
    data = _data(8, 2)
    fixed = {
        "x": data.x,
        "y": data.y,
        "lr": np.array(LR, np.float32),
        "step": np.array(1, np.float32),
        "seed": np.array(0, np.int64),
    }
    _, new, _ = runner.run(
        fixed,
        tensors=state,
        hyper=resolve_hyperparameters(manifest, None),
        globals_={n: state[n] for n in manifest.graphs["train_step"].global_inputs},
        masks=mask_values(manifest, ["body.0.weight"]),
    )
    np.testing.assert_array_equal(new["body.0.weight"], state["body.0.weight"])
    np.testing.assert_array_equal(new["body.0.weight.momentum"], state["body.0.weight.momentum"])
    assert not np.allclose(new["body.0.bias"], state["body.0.bias"])
    assert not np.allclose(new["head.weight.momentum"], 0.0)
    with pytest.raises(ContractViolation, match="cannot freeze"):
        mask_values(manifest, ["nope.weight"])


def test_micro_batches_equal_one_large_batch(bundle: Bundle) -> None:
    data = _data(16, 4)  # B = 16 = 4 micro-batches of m = 4
    start = bundle.initial_weights()
    frozen = ["body.0.bias"]
    whole = _train(bundle, start, data, micro_batch=0, frozen=frozen)
    micro = _train(bundle, start, data, micro_batch=4, frozen=frozen)
    assert micro.loss == pytest.approx(whole.loss, rel=1e-5)
    for name, value in whole.weights.items():
        np.testing.assert_allclose(micro.weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(micro.weights["body.0.bias"], start["body.0.bias"])


def test_personal_tensors_stay_on_the_device_across_tasks(bundle: Bundle, tmp_path: Path) -> None:
    broker = InMemoryBroker()
    agent = Agent(
        AgentConfig(device_id="dev-1", state_dir=tmp_path / "state"),
        InMemoryTransport(broker, "dev-1"),
        OrtTrainer.open(bundle),
        _data(20, 6),
    )
    server = FederatedServer(
        InMemoryTransport(broker, "server"),
        bundle,
        ServerConfig(rounds=2, clients_per_round=1, min_clients=1, wait_for_clients_s=5, round_timeout_s=20, lr=LR),
    )
    spy = InMemoryTransport(broker, "spy")
    spy.start()
    spy.subscribe(Topics().tasks("dev-1"), qos=1)
    spy.subscribe(Topics().results("dev-1"), qos=1)
    stop = threading.Event()
    agent.start()
    thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    server.start()
    personal_after: list[dict[str, np.ndarray]] = []
    try:
        for number in (1, 2):
            assert server.run_round(number).completed
            personal_after.append(agent.personal.load())
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()
        agent.close()
    messages = []
    while (inbound := spy.receive(timeout=0.1)) is not None:
        messages.append(decode_message(inbound.payload))
    tasks = [m for m in messages if isinstance(m, TaskMessage)]
    updates = [m for m in messages if isinstance(m, UpdateMessage)]
    assert len(tasks) == 2 and len(updates) == 2
    for message in tasks:
        assert set(message.weights) == {"body.0.weight", "body.0.bias"}
    for message in updates:
        delta = decode_update(message.payload, {t.name: t.shape for t in bundle.manifest.aggregated_tensors})
        assert set(delta) == {"body.0.weight", "body.0.bias"}
    initial = bundle.initial_weights()
    first, second = personal_after
    assert not np.allclose(first["head.weight"], initial["head.weight"])
    assert not np.allclose(second["head.weight"], first["head.weight"])  # task 2 continued from task 1
    stored = Agent(
        AgentConfig(device_id="dev-1", state_dir=tmp_path / "state"),
        InMemoryTransport(InMemoryBroker(), "dev-1"),
        OrtTrainer.open(bundle),
        _data(4, 0),
    )
    np.testing.assert_array_equal(stored.personal.load()["head.weight"], second["head.weight"])
    np.testing.assert_array_equal(server.weights["head.weight"], initial["head.weight"])  # never aggregated


def test_task_hyperparameters_round_trip_and_are_strict() -> None:
    task = TaskMessage(
        device_id="d",
        round=1,
        task_id="t",
        model_version=0,
        bundle_digest="x",
        epochs=1,
        batch_size=4,
        lr=0.1,
        deadline_s=5.0,
        hyperparameters={"fedprox_mu": 0.01, "class_weights": (1.0, 5.0)},
        frozen=("body.0.weight",),
    )
    assert decode_message(encode_message(task)) == task
    from edge_agent.errors import MalformedMessage

    for bad in ({"hyperparameters": {"a": "x"}}, {"hyperparameters": {"a": [True]}}, {"frozen": "w"}):
        raw = encode_message(task).replace(b'"frozen":["body.0.weight"]', b'"frozen":["body.0.weight"]')
        import json
        import struct

        header_len = struct.unpack_from("<I", raw, 8)[0]
        header = json.loads(raw[12 : 12 + header_len]) | bad
        body = json.dumps(header).encode()
        with pytest.raises(MalformedMessage):
            decode_message(raw[:8] + struct.pack("<I", len(body)) + body + raw[12 + header_len :])
