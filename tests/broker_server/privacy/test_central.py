"""Central DP: clipping bounds every contribution, noise has scale z·C, adaptive clipping, the hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from broker_server.privacy import (
    AdaptiveClipping,
    BudgetExhausted,
    CentralDP,
    CentralDPConfig,
    DPMean,
    PrivacyError,
    clip_to_norm,
    dp_mean,
    next_clip_norm,
    update_noise_multiplier,
    update_norm,
)
from broker_server.rounds import RoundState
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ConfigError, ContractViolation
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage

SHAPES = {"w": (6, 5), "b": (5,)}
SPECS = tuple(
    TensorSpec(name=n, shape=s, dtype="float32", role="parameter", trainable=True, aggregate=True)
    for n, s in SHAPES.items()
)
ORDERS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0)


def config(**overrides: object) -> CentralDPConfig:
    values: dict[str, object] = dict(
        clip_norm=1.0, epsilon=8.0, delta=1e-5, clients_per_round=10, population=100, noise_multiplier=1.0
    )
    values.update(overrides)
    return CentralDPConfig(**values)  # type: ignore[arg-type]


def random_update(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {n: (rng.normal(size=s) * scale).astype(np.float32) for n, s in SHAPES.items()}


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    w=arrays(np.float32, SHAPES["w"], elements=finite),
    b=arrays(np.float32, SHAPES["b"], elements=finite),
    clip=st.floats(1e-3, 1e3),
)
def test_an_update_with_100x_the_clip_norm_contributes_at_most_c(w: np.ndarray, b: np.ndarray, clip: float) -> None:
    update = {"w": w, "b": b}
    norm = update_norm(update)
    if norm > 0:  # scale it to 100x the clip norm (or leave an all-zero update as it is)
        update = {n: (v.astype(np.float64) * (100 * clip / norm)) for n, v in update.items()}
    dp = CentralDP(config(clip_norm=clip), rng=np.random.default_rng(0), orders=ORDERS)
    mean = DPMean(dp, SPECS)
    honest = {n: np.full(s, 0.01, np.float32) for n, s in SHAPES.items()}
    mean.add(honest, 1.0)
    without = mean.sums()
    mean.add(update, 1e9)  # a huge claimed example count changes nothing: weight 1
    contribution = {n: mean.sums()[n] - without[n] for n in SHAPES}
    assert update_norm(contribution) <= clip
    clipped, _ = dp.clip(update)
    assert update_norm(clipped) <= clip


def test_small_updates_pass_unchanged_and_large_ones_keep_their_direction() -> None:
    rng = np.random.default_rng(1)
    small = random_update(rng, 0.01)
    clipped, norm, was_clipped = clip_to_norm(small, 10.0)
    assert not was_clipped and norm == pytest.approx(update_norm(small))
    for n in SHAPES:
        np.testing.assert_array_equal(clipped[n], small[n].astype(np.float64))
    big = random_update(rng, 100.0)
    clipped, norm, was_clipped = clip_to_norm(big, 2.0)
    assert was_clipped and norm > 2.0
    assert update_norm(clipped) == pytest.approx(2.0, rel=1e-8) and update_norm(clipped) <= 2.0
    np.testing.assert_allclose(clipped["w"] * norm / 2.0, big["w"], rtol=1e-6)


def test_non_finite_update_is_rejected_and_not_counted() -> None:
    dp = CentralDP(config(), rng=np.random.default_rng(0), orders=ORDERS)
    mean = DPMean(dp, SPECS)
    bad = random_update(np.random.default_rng(2), 1.0)
    bad["b"][1] = np.nan
    with pytest.raises(ContractViolation, match="'b'"):
        mean.add(bad, 1.0)
    assert mean.count == 0 and all(not v.any() for v in mean.sums().values())
    mean.release()  # the tally is still consistent (0 updates)


def test_noise_scale_is_z_times_c_on_the_sum() -> None:
    dp = CentralDP(config(clip_norm=0.5, noise_multiplier=2.0), rng=np.random.default_rng(3), orders=ORDERS)
    sums = {"big": np.zeros(200_000)}
    delta = dp.finalize(sums, 0)
    noise_on_sum = delta["big"].astype(np.float64) * 10  # fixed denominator m = 10
    assert noise_on_sum.mean() == pytest.approx(0.0, abs=0.01)
    assert noise_on_sum.std() == pytest.approx(2.0 * 0.5, rel=0.01)
    assert dp.last_release is not None and dp.last_release.noise_stddev == pytest.approx(1.0)


def test_mean_uses_the_fixed_denominator() -> None:
    sums = {"a": np.array([3.0, -6.0])}
    out = dp_mean(sums, stddev=0.0, denominator=10.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(out["a"], [0.3, -0.6], rtol=1e-6)
    assert out["a"].dtype == np.float32


def test_adaptive_noise_split_composes_to_the_accounted_multiplier() -> None:
    z, sigma_b = 1.2, 0.75
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update > z
    assert (z_update**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    with pytest.raises(ValueError):
        update_noise_multiplier(2.0, 0.9)
    with pytest.raises(ConfigError, match=r"privacy\.adaptive\.count_stddev"):
        CentralDP(config(adaptive=AdaptiveClipping(count_stddev=0.4)), rng=np.random.default_rng(0), orders=ORDERS)


def test_geometric_clip_update_direction() -> None:
    assert next_clip_norm(1.0, 0.9, target_quantile=0.5, learning_rate=0.2) < 1.0  # too few clipped: shrink
    assert next_clip_norm(1.0, 0.1, target_quantile=0.5, learning_rate=0.2) > 1.0
    assert next_clip_norm(1.0, 0.5, target_quantile=0.5, learning_rate=0.2) == 1.0


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_adaptive_clip_converges_to_the_target_quantile(quantile: float) -> None:
    rng = np.random.default_rng(4)
    m = 100
    cfg = config(
        clip_norm=0.05,  # far below the norms: it must grow ~40x
        clients_per_round=m,
        population=10_000,
        epsilon=1e6,
        noise_multiplier=0.5,
        adaptive=AdaptiveClipping(target_quantile=quantile, learning_rate=0.2),
    )
    dp = CentralDP(cfg, rng=np.random.default_rng(5), orders=ORDERS)
    clips = []
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=m)  # synthetic update norms, median 1
        for norm in norms:
            dp.clip({"u": np.array([norm, 0.0])})
        dp.finalize({"u": np.zeros(2)}, m)
        clips.append(dp.clip_norm)
    truth = math.exp(0.5 * _normal_quantile(quantile))
    assert np.mean(clips[-100:]) == pytest.approx(truth, rel=0.08)


def _normal_quantile(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


def test_budget_stops_training_and_nothing_is_released_past_it() -> None:
    cfg = config(noise_multiplier=None, rounds=5, epsilon=2.0, clients_per_round=10, population=50)
    dp = CentralDP(cfg, rng=np.random.default_rng(6), orders=ORDERS)
    released = 0
    while not dp.budget_exhausted():
        dp.finalize({"u": np.zeros(3)}, 0)
        released += 1
    assert released == 5  # calibrated for 5 rounds: the budget lasts exactly that long
    assert dp.spent().epsilon <= 2.0
    with pytest.raises(BudgetExhausted):
        dp.finalize({"u": np.zeros(3)}, 0)
    assert dp.spent().rounds == 5 and dp.last_release is not None and dp.last_release.spent.rounds == 5


def test_finalize_checks_the_count_and_the_round_tally_survives_a_snapshot() -> None:
    dp = CentralDP(config(), rng=np.random.default_rng(7), orders=ORDERS)
    dp.clip({"u": np.array([5.0])})
    dp.clip({"u": np.array([0.1])})
    with pytest.raises(PrivacyError, match="count 3"):
        dp.finalize({"u": np.zeros(1)}, 3)
    copy = CentralDP(config(), rng=np.random.default_rng(7), orders=ORDERS)
    copy.restore(dp.snapshot())
    copy.finalize({"u": np.zeros(1)}, 2)
    assert copy.last_release is not None and copy.last_release.clipped == 1 and copy.spent().rounds == 1
    dp.discard_round()
    assert dp.spent().rounds == 0
    dp.finalize({"u": np.zeros(1)}, 0)
    with pytest.raises(ValueError):
        copy.restore({"clip_norm": -1, "updates": 0, "clipped": 0, "accountant": {"rounds": []}})


def encoded(device: str, task: str, tensors: dict[str, np.ndarray], examples: int) -> UpdateMessage:
    payload = encode_update(tensors, CodecSpec("fp32"), rng=np.random.default_rng(0))
    return UpdateMessage(
        device_id=device, round=1, task_id=task, model_version=0, num_examples=examples, payload=payload, metrics={}
    )


def test_dp_mean_is_a_drop_in_for_the_rounds_streaming_mean() -> None:
    dp = CentralDP(
        config(clip_norm=1.0, noise_multiplier=1e-3, epsilon=1e15), rng=np.random.default_rng(8), orders=ORDERS
    )
    mean = DPMean(dp, SPECS)
    state = RoundState(round=1, model_version=0, tasks={"t1": "d1", "t2": "d2"}, specs=SPECS, mean=mean)
    rng = np.random.default_rng(9)
    big, small = random_update(rng, 50.0), random_update(rng, 0.001)
    assert state.accept_update(encoded("d1", "t1", big, 10_000))
    assert state.accept_update(encoded("d2", "t2", small, 1))
    with pytest.raises(PrivacyError, match="release"):
        mean.result()  # no exact mean ever leaves
    delta = mean.release()
    expected = {n: (clip_to_norm(big, 1.0)[0][n] + small[n]) / 10 for n in SHAPES}
    for n in SHAPES:
        np.testing.assert_allclose(delta[n], expected[n], atol=1e-3 * 3 * 5 / 10)
        np.testing.assert_array_equal(mean.result()[n], delta[n])
    with pytest.raises(PrivacyError):
        mean.release()


def test_config_errors_name_the_key() -> None:
    base: dict[str, object] = {
        "clip_norm": 1.0,
        "epsilon": 3,
        "delta": 1e-5,
        "clients_per_round": 10,
        "population": 50,
        "rounds": 20,
    }
    parsed = CentralDPConfig.parse({**base, "adaptive": {"target_quantile": 0.7}})
    assert parsed.sampling_rate == 0.2 and parsed.adaptive == AdaptiveClipping(target_quantile=0.7)
    cases: list[tuple[dict[str, object], str]] = [
        ({**base, "clip_norm": 0}, "privacy.clip_norm"),
        ({**base, "delta": 1.5}, "privacy.delta"),
        ({**base, "population": 5}, "privacy.population"),
        ({**base, "clients_per_round": 2.5}, "privacy.clients_per_round"),
        ({**base, "rounds": None}, "privacy.noise_multiplier or privacy.rounds"),
        ({**base, "sigma": 1}, "privacy.sigma"),
        ({**base, "adaptive": {"target_quantile": 0.0}}, "privacy.adaptive.target_quantile"),
        ({**base, "adaptive": {"lr": 0.1}}, "privacy.adaptive.lr"),
        ({k: v for k, v in base.items() if k != "epsilon"}, "privacy.epsilon"),
        ({**base, "epsilon": True}, "privacy.epsilon"),
    ]
    for table, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            CentralDPConfig.parse(table)
