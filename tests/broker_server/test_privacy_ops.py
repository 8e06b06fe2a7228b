"""Central DP on the operations endpoints: the ε gauges on /metrics and ``privacy`` in /api/status."""

from __future__ import annotations

from broker_server.ops import ServerMetrics, build_status
from broker_server.privacy import CentralDPConfig
from broker_server.privacy_wiring import CentralPrivacy
from broker_server.server_config import ServerConfig
from edge_agent.protocol.manifest import TensorSpec

SPECS = (TensorSpec(name="w", shape=(3,), dtype="float32", role="parameter", trainable=True, aggregate=True),)


def test_dp_gauges_appear_once_privacy_is_observed() -> None:
    metrics = ServerMetrics()
    assert "fedflock_dp_epsilon" not in metrics.render()
    metrics.privacy_observed(1.25, 3.0)
    text = metrics.render()
    assert "fedflock_dp_epsilon_spent 1.25" in text and "fedflock_dp_epsilon_budget 3" in text


def test_status_carries_the_privacy_view() -> None:
    config = CentralDPConfig(clip_norm=1.0, epsilon=3.0, delta=1e-5, clients_per_round=2, population=10, rounds=5)
    privacy = CentralPrivacy(config, SPECS)
    view = privacy.view()
    assert view["epsilon_spent"] == 0.0 and view["epsilon_budget"] == 3.0 and view["rounds_remaining"] == 5
    status = build_status(
        config=ServerConfig(),
        strategy="fedavg",
        model_version=0,
        bundle_digest="d",
        devices=[],
        rounds=[],
        now=0.0,
        privacy=view,
    )
    assert status["privacy"] == view
    assert (
        build_status(
            config=ServerConfig(), strategy="fedavg", model_version=0, bundle_digest="d", devices=[], rounds=[], now=0.0
        )["privacy"]
        is None
    )
