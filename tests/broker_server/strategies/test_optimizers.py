"""Server update rules against hand-computed two-round examples (Prepare / Execute / Assert).

Shared example: weights ``w0 = [1, -1]``, mean deltas ``Δ1 = [0.25, 1]`` then ``Δ2 = [-0.5, 1]``
(all exact in float32), so every intermediate value below can be checked on paper.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from broker_server.aggregate import apply_delta
from broker_server.strategies import (
    AdagradConfig,
    AdamConfig,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgConfig,
    FedAvgM,
    FedAvgMConfig,
    FedProx,
    FedYogi,
    Strategy,
    make_strategy,
)

W0 = {"w": np.array([1.0, -1.0], dtype=np.float32)}
DELTAS = [{"w": np.array([0.25, 1.0], dtype=np.float32)}, {"w": np.array([-0.5, 1.0], dtype=np.float32)}]
# η = 1, β1 = 0.5, β2 = 0.75, τ = 0.5, so v starts at τ² = 0.25
ADAGRAD = AdagradConfig(server_lr=1.0, beta1=0.5, tau=0.5)
ADAM = AdamConfig(server_lr=1.0, beta1=0.5, tau=0.5, beta2=0.75)


def run(strategy: Strategy, deltas: list[dict[str, np.ndarray]] = DELTAS) -> list[dict[str, np.ndarray]]:
    weights, history = W0, []
    for number, delta in enumerate(deltas, start=1):
        weights = strategy.apply(weights, delta, round=number)
        history.append(weights)
    return history


def test_fedavg_scales_the_mean_delta_by_the_server_lr() -> None:
    # η = 2: w1 = [1 + 0.5, -1 + 2] = [1.5, 1]; w2 = [1.5 - 1, 1 + 2] = [0.5, 3]
    w1, w2 = run(FedAvg(FedAvgConfig(server_lr=2.0)))
    np.testing.assert_array_equal(w1["w"], [1.5, 1.0])
    np.testing.assert_array_equal(w2["w"], [0.5, 3.0])
    assert w2["w"].dtype == np.float32


def test_fedavgm_accumulates_server_momentum() -> None:
    # β = 0.5, η = 2. v1 = Δ1 = [0.25, 1]          -> w1 = w0 + 2 v1 = [1.5, 1]
    #                 v2 = 0.5 v1 + Δ2 = [-0.375, 1.5] -> w2 = w1 + 2 v2 = [0.75, 4]
    strategy = FedAvgM(FedAvgMConfig(server_lr=2.0, momentum=0.5))
    w1, w2 = run(strategy)
    np.testing.assert_array_equal(w1["w"], [1.5, 1.0])
    np.testing.assert_array_equal(w2["w"], [0.75, 4.0])
    np.testing.assert_array_equal(strategy.state().tensors["momentum/w"], [-0.375, 1.5])


def test_fedadagrad_two_rounds() -> None:
    # m1 = 0.5 Δ1 = [0.125, 0.5];       v1 = 0.25 + Δ1² = [0.3125, 1.25]
    # w1 = w0 + m1 / (√v1 + 0.5) = [1 + 0.125/1.0590170, -1 + 0.5/1.6180340] = [1.1180340, -0.6909830]
    # m2 = 0.5 m1 + 0.5 Δ2 = [-0.1875, 0.75]; v2 = v1 + Δ2² = [0.5625, 2.25], √v2 = [0.75, 1.5]
    # w2 = w1 + [-0.1875/1.25, 0.75/2] = w1 + [-0.15, 0.375] = [0.9680340, -0.3159830]
    strategy = FedAdagrad(ADAGRAD)
    w1, w2 = run(strategy)
    np.testing.assert_allclose(w1["w"], [1.1180340, -0.6909830], atol=1e-6)
    np.testing.assert_allclose(w2["w"], [0.9680340, -0.3159830], atol=1e-6)
    state = strategy.state().tensors
    np.testing.assert_array_equal(state["m/w"], [-0.1875, 0.75])
    np.testing.assert_array_equal(state["v/w"], [0.5625, 2.25])


def test_fedadam_two_rounds() -> None:
    # v1 = 0.75·0.25 + 0.25 Δ1² = [0.203125, 0.4375]; √v1 = [0.4506939, 0.6614378]
    # w1 = w0 + [0.125/0.9506939, 0.5/1.1614378] = w0 + [0.1314829, 0.4305009] = [1.1314829, -0.5694991]
    # v2 = 0.75 v1 + 0.25 Δ2² = [0.21484375, 0.578125]; √v2 = [0.4635124, 0.7603453]
    # w2 = w1 + [-0.1875/0.9635124, 0.75/1.2603453] = w1 + [-0.1946005, 0.5950750] = [0.9368824, 0.0255759]
    strategy = FedAdam(ADAM)
    w1, w2 = run(strategy)
    np.testing.assert_allclose(w1["w"], [1.1314829, -0.5694991], atol=1e-6)
    np.testing.assert_allclose(w2["w"], [0.9368824, 0.0255759], atol=1e-6)
    np.testing.assert_array_equal(strategy.state().tensors["v/w"], [0.21484375, 0.578125])


def test_fedyogi_two_rounds_moves_v_towards_the_squared_delta() -> None:
    # round 1: Δ1² = [0.0625, 1]; v0 = 0.25 > 0.0625 (sign +1), 0.25 < 1 (sign -1)
    #   v1 = [0.25 - 0.25·0.0625, 0.25 + 0.25·1] = [0.234375, 0.5]
    #   w1 = w0 + [0.125/(0.4841229 + 0.5), 0.5/(0.7071068 + 0.5)] = [1.1270167, -0.5857864]
    # round 2: Δ2² = [0.25, 1] both above v1 (sign -1): v2 = v1 + 0.25 Δ2² = [0.296875, 0.75]
    #   w2 = w1 + [-0.1875/1.0448624, 0.75/1.3660254] = w1 + [-0.1794495, 0.5490381] = [0.9475672, -0.0367483]
    strategy = FedYogi(ADAM)
    w1, w2 = run(strategy)
    np.testing.assert_allclose(w1["w"], [1.1270167, -0.5857864], atol=1e-6)
    np.testing.assert_allclose(w2["w"], [0.9475672, -0.0367483], atol=1e-6)
    np.testing.assert_array_equal(strategy.state().tensors["v/w"], [0.296875, 0.75])


def test_adaptive_defaults_are_the_papers() -> None:
    config = AdamConfig()
    assert (config.server_lr, config.beta1, config.beta2, config.tau) == (1e-2, 0.9, 0.99, 1e-3)
    assert FedAvgConfig().server_lr == 1.0 and FedAvgMConfig().momentum == 0.9


finite32 = hnp.arrays(
    np.float32,
    st.integers(1, 6),
    elements=st.floats(-(2.0**100), 2.0**100, width=32),
)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), w=finite32)
def test_fedavg_with_unit_lr_is_exactly_apply_delta(data: st.DataObject, w: np.ndarray) -> None:
    delta = data.draw(hnp.arrays(np.float32, w.shape, elements=st.floats(-(2.0**100), 2.0**100, width=32)))
    weights, mean = {"w": w, "b": np.array([3.0], np.float32)}, {"w": delta}
    got = FedAvg().apply(weights, mean, round=1)
    want = apply_delta(weights, mean)
    np.testing.assert_array_equal(got["w"], want["w"])
    np.testing.assert_array_equal(got["b"], [3.0])


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(0.01, 10),
    deltas=st.lists(hnp.arrays(np.float32, 4, elements=st.floats(-100, 100, width=32)), min_size=1, max_size=5),
)
def test_fedavgm_without_momentum_is_fedavg(lr: float, deltas: list[np.ndarray]) -> None:
    momentum = FedAvgM(FedAvgMConfig(server_lr=lr, momentum=0.0))
    plain = FedAvg(FedAvgConfig(server_lr=lr))
    a = b = {"w": np.zeros(4, np.float32)}
    for number, delta in enumerate(deltas, start=1):
        a = momentum.apply(a, {"w": delta}, round=number)
        b = plain.apply(b, {"w": delta}, round=number)
        np.testing.assert_array_equal(a["w"], b["w"])


ALL = ["fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi"]


@pytest.mark.parametrize("name", ALL)
def test_buffers_are_averaged_plainly_and_get_no_optimizer_state(name: str) -> None:
    strategy = make_strategy(name, server_lr=0.3)
    weights = {"w": np.ones(2, np.float32), "bn.var": np.full(2, 2.0, np.float32)}
    for number in (1, 2, 3):
        delta = {"w": np.full(2, 0.5, np.float32), "bn.var": np.array([-0.5, 0.25], np.float32)}
        before = weights["bn.var"].copy()
        weights = strategy.apply(weights, delta, round=number, plain={"bn.var"})
        # the new buffer is exactly the devices' mean: w + Δ, whatever η, momentum or moments
        np.testing.assert_array_equal(weights["bn.var"], before + delta["bn.var"])
    assert not any(key.endswith("/bn.var") for key in strategy.state().tensors)
    assert not np.array_equal(weights["w"], np.ones(2, np.float32))


@pytest.mark.parametrize("name", ALL)
def test_only_tensors_in_the_delta_change(name: str) -> None:
    # personal tensors are never uploaded, so never in the mean delta: they must pass through untouched
    strategy = make_strategy(name)
    weights = {"w": np.ones(3, np.float32), "head.personal": np.arange(3, dtype=np.float32)}
    out = strategy.apply(weights, {"w": np.full(3, 0.1, np.float32)}, round=1)
    np.testing.assert_array_equal(out["head.personal"], [0.0, 1.0, 2.0])
    assert out["head.personal"] is not weights["head.personal"]  # a copy, like apply_delta
    assert set(strategy.state().tensors) <= {f"{slot}/w" for slot in ("m", "v", "momentum")}
    np.testing.assert_array_equal(weights["w"], np.ones(3))  # the input is not modified


@pytest.mark.parametrize("name", ALL)
def test_a_refused_apply_changes_no_state(name: str) -> None:
    strategy = make_strategy(name)
    weights = {"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)}
    strategy.apply(weights, {"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}, round=1)
    before = strategy.state()
    with pytest.raises(ValueError, match="'b'"):
        strategy.apply(weights, {"a": np.ones(2, np.float32), "b": np.ones(4, np.float32)}, round=2)
    with pytest.raises(ValueError, match="'c'"):
        strategy.apply(weights, {"a": np.ones(2, np.float32), "c": np.ones(3, np.float32)}, round=2)
    after = strategy.state()
    assert after.meta == before.meta
    assert after.tensors.keys() == before.tensors.keys()
    for key, value in before.tensors.items():
        np.testing.assert_array_equal(after.tensors[key], value)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_a_model_whose_shapes_changed_is_refused(name: str) -> None:
    strategy = make_strategy(name)
    strategy.apply({"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float32)}, round=1)
    with pytest.raises(ValueError, match="model changed"):
        strategy.apply({"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)}, round=2)


def test_every_strategy_satisfies_the_protocol() -> None:
    for name in ALL:
        strategy = make_strategy(name)
        assert isinstance(strategy, Strategy) and strategy.name == name
    assert isinstance(FedProx(), FedAvg)  # the server side of FedProx is FedAvg
