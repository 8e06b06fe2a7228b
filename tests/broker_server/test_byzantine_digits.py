"""Issue #6's acceptance test: 20 % Byzantine devices on the real digits task.

Ten devices train a digits MLP with onnxruntime for 20 rounds through the real server
(:mod:`tests.broker_server.byzantine_fleet`); in the attacked runs two of them (20 %) send their
real update with Gaussian noise added (σ = 10), sign-flipped (×−4) or scaled ×100. For each
attack, plain FedAvg must *collapse* — end below 50 % test accuracy, at least 40 points under the
clean run (which must reach 90 %; ten classes put chance at 10 %) — while median, trimmed mean
(β = 0.2), Multi-Krum (f = 2, m = 5) and norm clipping (2.0) each end within 3 accuracy points of
the clean FedAvg run. Training and aggregation are deterministic, so the margins hold run after
run; on this split (seed 0, Dirichlet 10) the clean run ends at 95.0 %, attacked FedAvg at
9.7-18.9 %, and the worst robust result is 1.1 points under clean (clip, sign flip).
``benchmarks/robust.py`` prints the full matrix, over more seeds and a strongly non-IID split.
"""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.server_config import RoundResult
from edge_agent.data import Dataset
from edge_agent.runtime.bundle import Bundle
from tests.broker_server.byzantine_fleet import (
    ATTACKS,
    NUM_DEVICES,
    ROUNDS,
    RULES,
    TrainingCache,
    digits_task,
    export_digits_mlp,
    final_accuracy,
    run_federation,
    trainer_for,
)

#: the clean run must learn the task, or "within 3 points of it" would say nothing
CLEAN_AT_LEAST = 0.90
#: FedAvg under attack collapses: below this accuracy ...
COLLAPSED_BELOW = 0.50
#: ... and at least this far under the clean run
COLLAPSE_MARGIN = 0.40
#: a robust rule under attack ends at most this far under the clean run
ROBUST_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return export_digits_mlp(tmp_path_factory.mktemp("digits-mlp"))


@pytest.fixture(scope="module")
def task() -> tuple[list[Dataset], Dataset]:
    return digits_task()


@pytest.fixture(scope="module")
def cache(bundle: Bundle) -> TrainingCache:
    return TrainingCache(trainer_for(bundle))


@pytest.fixture(scope="module")
def clean(bundle: Bundle, task: tuple[list[Dataset], Dataset], cache: TrainingCache) -> list[RoundResult]:
    shards, test = task
    return run_federation(bundle, shards, test, cache, robust={}, attack=None)


def test_the_clean_federation_learns_digits(clean: list[RoundResult]) -> None:
    assert [(r.completed, r.reported) for r in clean] == [(True, NUM_DEVICES)] * ROUNDS
    accuracy = final_accuracy(clean)
    assert accuracy >= CLEAN_AT_LEAST, accuracy
    first = clean[0].test_accuracy
    assert first is not None and accuracy >= first + 0.1  # it kept learning after round 1


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_fedavg_collapses_and_every_robust_rule_stays_within_3_points_of_clean(
    attack: str, bundle: Bundle, task: tuple[list[Dataset], Dataset], cache: TrainingCache, clean: list[RoundResult]
) -> None:
    shards, test = task
    baseline = final_accuracy(clean)
    accuracies: dict[str, float] = {}
    for name, robust in {"fedavg": {}, **RULES}.items():
        results = run_federation(bundle, shards, test, cache, robust=robust, attack=ATTACKS[attack])
        assert all(r.reported == NUM_DEVICES for r in results), (name, [r.reported for r in results])
        accuracies[name] = final_accuracy(results)
    table = {name: round(value, 4) for name, value in accuracies.items()} | {"clean": round(baseline, 4)}
    assert accuracies["fedavg"] < COLLAPSED_BELOW, table
    assert accuracies["fedavg"] <= baseline - COLLAPSE_MARGIN, table
    for name in RULES:
        assert accuracies[name] >= baseline - ROBUST_TOLERANCE, (name, table)


def test_round_one_is_trained_once_and_shared_by_every_run(cache: TrainingCache, clean: list[RoundResult]) -> None:
    """Every run starts from the bundle's weights, so round 1's honest updates come from the cache."""
    assert cache.trained >= ROUNDS * NUM_DEVICES  # the clean run trained every device every round
    before = cache.trained, cache.reused
    shards, test = digits_task()
    run_federation(cache.trainer.bundle, shards, test, cache, robust={}, attack=None, rounds=1)
    assert (cache.trained, cache.reused) == (before[0], before[1] + NUM_DEVICES)


def test_the_attacks_change_what_is_sent() -> None:
    """Each attack does what its name says to a known update (and leaves the input alone)."""
    update = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(ATTACKS["sign_flip"].apply(update, rng)["w"], [-4.0, 8.0, -2.0])
    np.testing.assert_array_equal(ATTACKS["scale"].apply(update, rng)["w"], [100.0, -200.0, 50.0])
    noisy = ATTACKS["gaussian"].apply(update, np.random.default_rng(1))["w"]
    expected = update["w"] + 10.0 * np.random.default_rng(1).standard_normal(3)
    np.testing.assert_allclose(noisy, expected, rtol=1e-6)
    np.testing.assert_array_equal(update["w"], [1.0, -2.0, 0.5])
