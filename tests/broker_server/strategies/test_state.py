"""Strategy state survives a restart: save after k rounds, load into a fresh object, continue identically."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest

from broker_server.strategies import StrategyState, make_strategy
from edge_agent.errors import ConfigError
from edge_agent.protocol.tensors import decode_tensors, encode_tensors

ALL = ["fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi"]
PLAIN = frozenset({"bn.mean"})


def rounds(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "conv.w": rng.normal(size=(2, 3)).astype(np.float32),
            "fc.b": rng.normal(size=()).astype(np.float32),
            "bn.mean": rng.normal(size=(3,)).astype(np.float32),
        }
        for _ in range(count)
    ]


def initial() -> dict[str, np.ndarray]:
    return {
        "conv.w": np.ones((2, 3), np.float32),
        "fc.b": np.array(0.5, np.float32),
        "bn.mean": np.zeros(3, np.float32),
        "head": np.ones(2, np.float32),
    }


def persist(state: StrategyState) -> StrategyState:
    """What a server would do: tensor-set bytes + JSON text, then back."""
    return StrategyState(tensors=decode_tensors(encode_tensors(state.tensors)), meta=json.loads(json.dumps(state.meta)))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_resumed_strategy_continues_exactly_like_an_uninterrupted_one(name: str, k: int) -> None:
    deltas = rounds(seed=7, count=k + 3)
    params = {"server_lr": 0.5} if name in ("fedavg", "fedprox", "fedavgm") else {"server_lr": 0.1, "tau": 0.01}

    uninterrupted = make_strategy(name, **params)
    weights = initial()
    for number, delta in enumerate(deltas, start=1):
        weights = uninterrupted.apply(weights, delta, round=number, plain=PLAIN)

    first = make_strategy(name, **params)
    resumed_weights = initial()
    for number, delta in enumerate(deltas[:k], start=1):
        resumed_weights = first.apply(resumed_weights, delta, round=number, plain=PLAIN)
    saved = persist(first.state())
    first.apply(resumed_weights, deltas[0], round=99)  # the old object moving on must not touch the saved state

    second = make_strategy(name, **params)
    second.load_state(saved)
    assert second.state().meta == saved.meta
    for number, delta in enumerate(deltas[k:], start=k + 1):
        resumed_weights = second.apply(resumed_weights, delta, round=number, plain=PLAIN)

    for tensor in weights:
        np.testing.assert_array_equal(resumed_weights[tensor], weights[tensor])
    assert second.state().meta == uninterrupted.state().meta
    assert second.state().meta["steps"] == k + 3 and second.state().meta["last_round"] == k + 3


def test_state_lists_the_slots_per_tensor_and_the_config() -> None:
    strategy = make_strategy("fedadam", server_lr=0.1)
    strategy.apply(initial(), rounds(1, 1)[0], round=4, plain=PLAIN)
    state = strategy.state()
    assert sorted(state.tensors) == ["m/conv.w", "m/fc.b", "v/conv.w", "v/fc.b"]
    assert all(value.dtype == np.float64 for value in state.tensors.values())
    assert state.meta["strategy"] == "fedadam" and state.meta["last_round"] == 4
    assert state.meta["config"]["server_lr"] == 0.1 and state.meta["config"]["beta2"] == 0.99
    json.dumps(state.meta)


def test_state_may_be_loaded_under_a_new_learning_rate() -> None:
    # moments do not depend on η, so an operator may retune it across a restart
    old = make_strategy("fedyogi", server_lr=0.1)
    old.apply(initial(), rounds(2, 1)[0], round=1)
    new = make_strategy("fedyogi", server_lr=0.05)
    new.load_state(old.state())
    assert new.state().meta["config"]["server_lr"] == 0.05
    np.testing.assert_array_equal(new.state().tensors["v/conv.w"], old.state().tensors["v/conv.w"])


def _state(name: str = "fedadam") -> StrategyState:
    strategy = make_strategy(name)
    strategy.apply(initial(), rounds(3, 1)[0], round=1)
    return strategy.state()


@pytest.mark.parametrize(
    ("target", "edit", "match"),
    [
        ("fedyogi", lambda s: s, "for 'fedadam'"),
        ("fedadam", lambda s: StrategyState(tensors=s.tensors, meta={**s.meta, "format": 9}), "format 9"),
        ("fedadam", lambda s: StrategyState(tensors=s.tensors, meta={**s.meta, "steps": -1}), "steps"),
        ("fedadam", lambda s: StrategyState(tensors=s.tensors, meta={**s.meta, "last_round": "x"}), "last_round"),
        (
            "fedadam",
            lambda s: StrategyState(tensors={**s.tensors, "momentum/w": np.zeros(1)}, meta=s.meta),
            "momentum/w",
        ),
        ("fedadam", lambda s: StrategyState(tensors={**s.tensors, "v/fc.b": np.array(np.nan)}, meta=s.meta), "finite"),
        ("fedadam", lambda s: StrategyState(tensors={**s.tensors, "v/fc.b": np.array(-1.0)}, meta=s.meta), "negative"),
        (
            "fedadam",
            lambda s: StrategyState(tensors={k: v for k, v in s.tensors.items() if k != "v/fc.b"}, meta=s.meta),
            "same tensors",
        ),
    ],
)
def test_bad_state_is_refused_and_leaves_the_strategy_unchanged(
    target: str, edit: Callable[[StrategyState], StrategyState], match: str
) -> None:
    strategy = make_strategy(target)
    with pytest.raises(ConfigError, match=match):
        strategy.load_state(edit(_state()))
    assert strategy.state().meta["steps"] == 0 and strategy.state().tensors == {}


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_state_and_load_state_copy_the_tensors(name: str) -> None:
    strategy = make_strategy(name)
    delta = rounds(4, 1)[0]
    strategy.apply(initial(), delta, round=1)
    saved = strategy.state()
    snapshot = {key: value.copy() for key, value in saved.tensors.items()}
    strategy.apply(initial(), delta, round=2)  # in-place slot updates must not reach the exported state
    other = make_strategy(name)
    other.load_state(saved)
    other.apply(initial(), delta, round=2)  # nor reach the state it was loaded from
    for key, value in snapshot.items():
        np.testing.assert_array_equal(saved.tensors[key], value)
