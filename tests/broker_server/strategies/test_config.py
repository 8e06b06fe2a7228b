"""Strategies from names and config tables; FedProx's μ in the TASK; bundle compatibility checks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.strategies import (
    FEDPROX_MU,
    STRATEGIES,
    AdamConfig,
    ClusterConfig,
    FedAdam,
    FedAvg,
    FedProx,
    FedProxConfig,
    FedYogi,
    TaskSettings,
    check_task_settings,
    make_strategy,
    parse_cluster_config,
    parse_strategy,
    plain_tensor_names,
)
from edge_agent.errors import ConfigError
from edge_agent.protocol.manifest import GraphSpec, HyperParamSpec, InputSpec, Manifest, TensorSpec


def manifest(*, hyper: tuple[str, ...] = ()) -> Manifest:
    def tensor(name: str, role: str, *, aggregate: bool = True, personal: bool = False) -> TensorSpec:
        return TensorSpec(
            name=name, shape=(2,), dtype="float32", role=role, trainable=role == "parameter",
            aggregate=aggregate, personal=personal,
        )  # fmt: skip

    graph = GraphSpec(file="g.onnx", inputs={}, outputs={})
    return Manifest(
        format_version=2, name="tiny", created_by="test", opset=17,
        input=InputSpec(name="x", shape=(None, 2), dtype="float32"),
        label=InputSpec(name="y", shape=(None,), dtype="int64"),
        num_classes=2, loss={}, optimizer={},
        tensors=(
            tensor("fc.w", "parameter"),
            tensor("bn.running_mean", "buffer"),
            tensor("bn.batches", "buffer", aggregate=False),
            tensor("head.w", "parameter", aggregate=False, personal=True),
            tensor("fc.w.momentum", "optimizer_state", aggregate=False),
        ),
        graphs={"train_step": graph, "inference": graph}, weights_file="w.fft", files={},
        hyperparameters=tuple(HyperParamSpec(name=h, shape=(), dtype="float32", default=(0.0,)) for h in hyper),
    )  # fmt: skip


def test_fedprox_sends_mu_in_every_task() -> None:
    strategy = FedProx(FedProxConfig(mu=0.1))
    for number in (1, 2, 50):
        settings = strategy.configure_task(number)
        assert settings.hyperparameters == {"fedprox_mu": 0.1}
        assert settings.lr is None and settings.epochs is None


def test_fedprox_mu_name_matches_the_exported_graph_input(monkeypatch: pytest.MonkeyPatch) -> None:
    # load model_export/federated.py alone: the model_export package imports torch
    path = Path(__file__).parents[3] / "model_export" / "federated.py"
    spec = importlib.util.spec_from_file_location("_federated_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.MU_NAME == FEDPROX_MU


def test_fedprox_server_update_is_fedavg() -> None:
    weights, delta = {"w": np.ones(3, np.float32)}, {"w": np.array([0.5, -1.0, 2.0], np.float32)}
    got = make_strategy("fedprox", mu=1.0, server_lr=0.5).apply(weights, delta, round=1)
    want = make_strategy("fedavg", server_lr=0.5).apply(weights, delta, round=1)
    np.testing.assert_array_equal(got["w"], want["w"])


def test_other_strategies_send_no_hyperparameters_but_may_override_lr_and_epochs() -> None:
    assert FedAvg().configure_task(1) == TaskSettings()
    settings = make_strategy("fedyogi", client_lr=0.03, local_epochs=5).configure_task(3)
    assert settings == TaskSettings(lr=0.03, epochs=5)
    assert make_strategy("fedprox", mu=0.0, local_epochs=2).configure_task(1) == TaskSettings(
        hyperparameters={"fedprox_mu": 0.0}, epochs=2
    )


def test_make_strategy_builds_each_named_strategy_with_its_params() -> None:
    assert sorted(STRATEGIES) == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox", "fedyogi"]
    adam = make_strategy("FedAdam", server_lr=0.1, beta2=0.9)
    assert isinstance(adam, FedAdam) and adam.config == AdamConfig(server_lr=0.1, beta2=0.9)
    yogi = parse_strategy({"name": "fedyogi", "tau": 1e-4})
    assert isinstance(yogi, FedYogi) and yogi.config.tau == 1e-4
    assert isinstance(parse_strategy(None), FedAvg) and isinstance(parse_strategy({}), FedAvg)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"name": "fedsgd"}, r"unknown name 'fedsgd'; known: fedavg, fedprox"),
        ({"eta": 0.1}, r"strategy.name"),
        ({"name": 3}, r"strategy.name"),
        ({"name": "fedprox", "mu": -0.1}, r"'fedprox': mu must be >= 0"),
        ({"name": "fedprox", "mu": float("nan")}, r"mu must be a finite number"),
        ({"name": "fedadam", "eta": 0.01}, r"unknown key 'eta'; valid keys: server_lr, client_lr"),
        ({"name": "fedadagrad", "beta2": 0.9}, r"'fedadagrad': unknown key 'beta2'"),
        ({"name": "fedadam", "beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"name": "fedyogi", "beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
        ({"name": "fedadam", "tau": 0}, r"tau must be > 0"),
        ({"name": "fedavgm", "momentum": True}, r"momentum must be a finite number, got True"),
        ({"name": "fedavg", "server_lr": "1"}, r"server_lr must be a finite number"),
        ({"name": "fedavg", "server_lr": 0}, r"server_lr must be > 0"),
        ({"name": "fedavg", "client_lr": -1}, r"client_lr must be > 0"),
        ({"name": "fedavg", "local_epochs": 1.5}, r"local_epochs must be an integer >= 1"),
    ],
)
def test_config_mistakes_name_the_key(table: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_strategy(table)


def test_a_strategy_table_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="must be a table"):
        parse_strategy("fedavg")  # type: ignore[arg-type]


def test_bundle_without_the_fedprox_input_is_refused_up_front() -> None:
    fedprox = make_strategy("fedprox").configure_task(1)
    with pytest.raises(ConfigError, match=r"\['fedprox_mu'\].*FederatedSpec"):
        check_task_settings(fedprox, manifest())
    check_task_settings(fedprox, manifest(hyper=("fedprox_mu",)))
    check_task_settings(make_strategy("fedadam").configure_task(1), manifest())


def test_plain_names_are_the_aggregated_buffers() -> None:
    assert plain_tensor_names(manifest()) == {"bn.running_mean"}


def test_cluster_table() -> None:
    assert parse_cluster_config(None) is None
    assert parse_cluster_config({"max_devices": 32}) == ClusterConfig(max_devices=32)
    with pytest.raises(ConfigError, match=r"clusters: threshold must be in \[-1, 1\]"):
        parse_cluster_config({"threshold": 2})
    with pytest.raises(ConfigError, match=r"clusters: unknown key 'k'"):
        parse_cluster_config({"k": 2})
    with pytest.raises(ConfigError, match=r"clusters: max_clusters must be an integer >= 1"):
        parse_cluster_config({"max_clusters": 0})
