"""Local DP on the device: clip + Gaussian noise before encoding, and the stated per-device (ε, δ)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from edge_agent.codecs import CodecSpec, decode_update, encode_update
from edge_agent.errors import ConfigError, ContractViolation
from edge_agent.privacy import (
    LocalDP,
    LocalDPConfig,
    clip_update,
    gaussian_delta,
    gaussian_epsilon,
    local_epsilon,
)


def norm(tensors: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in tensors.values()))


@settings(max_examples=50, deadline=None)
@given(scale=st.floats(1e-3, 1e4), clip=st.floats(1e-3, 1e3), seed=st.integers(0, 2**32 - 1))
def test_clipped_update_norm_is_at_most_c(scale: float, clip: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    update = {"w": rng.normal(size=(7, 3)).astype(np.float32) * scale, "b": rng.normal(size=3) * scale}
    clipped = clip_update(update, clip)
    assert norm(clipped) <= clip
    if norm(update) <= clip:
        np.testing.assert_array_equal(clipped["w"], update["w"].astype(np.float64))


def test_privatize_adds_noise_of_scale_z_c_and_keeps_shapes() -> None:
    dp = LocalDP(LocalDPConfig(clip_norm=0.5, noise_multiplier=3.0), rng=np.random.default_rng(0))
    update = {"w": np.zeros((400, 250), np.float32), "b": np.full(4, 100.0, np.float32)}
    out = dp.privatize(update)
    assert {n: v.shape for n, v in out.items()} == {"w": (400, 250), "b": (4,)}
    assert all(v.dtype == np.float32 for v in out.values())
    noise = out["w"].astype(np.float64).ravel()  # w's clipped value is 0: what is left is noise
    assert noise.std() == pytest.approx(1.5, rel=0.01) and noise.mean() == pytest.approx(0.0, abs=0.01)
    # the 200-norm "b" was clipped to 0.5 before the noise: its mean stays near 0.25 per coordinate
    assert abs(float(out["b"].mean()) - 0.25) < 4 * 1.5 / 2


def test_privatized_update_goes_through_the_codec() -> None:
    dp = LocalDP(LocalDPConfig(clip_norm=1.0, noise_multiplier=1.0), rng=np.random.default_rng(1))
    out = dp.privatize({"w": np.ones((3, 3), np.float32)})
    payload = encode_update(out, CodecSpec("fp32"), rng=np.random.default_rng(0))
    np.testing.assert_array_equal(decode_update(payload, {"w": (3, 3)})["w"], out["w"])


def test_non_finite_update_is_refused() -> None:
    dp = LocalDP(LocalDPConfig(clip_norm=1.0, noise_multiplier=1.0), rng=np.random.default_rng(2))
    with pytest.raises(ContractViolation, match="'w'"):
        dp.privatize({"w": np.array([1.0, np.inf], np.float32)})


def _hockey_stick(mu: float, epsilon: float) -> float:
    """δ(ε) = ∫ max(0, p(x) − e^ε q(x)) dx for p = N(μ, 1), q = N(0, 1), by quadrature."""

    def f(x: float) -> float:
        return max(0.0, stats.norm.pdf(x, loc=mu) - math.exp(epsilon) * stats.norm.pdf(x))

    crossing = epsilon / mu + mu / 2  # p > e^ε q exactly right of this point
    value, _ = integrate.quad(f, crossing, crossing + 40, epsabs=1e-15, epsrel=1e-10, limit=200)
    return float(value)


@pytest.mark.parametrize(("mu", "epsilon"), [(0.5, 0.3), (1.0, 1.0), (2.0, 3.0), (0.2, 0.9)])
def test_gaussian_delta_matches_the_privacy_profile_integral(mu: float, epsilon: float) -> None:
    assert gaussian_delta(mu, epsilon) == pytest.approx(_hockey_stick(mu, epsilon), rel=1e-6, abs=1e-15)


def test_epsilon_inverts_delta_and_is_tighter_than_the_classical_bound() -> None:
    mu = 1 / 4.530877117  # z = 4.53 for sensitivity 1: RDP conversion gives exactly (1, 1e-6)
    eps = gaussian_epsilon(mu, 1e-6)
    assert gaussian_delta(mu, eps) <= 1e-6 < gaussian_delta(mu, eps - 1e-6)
    assert eps < 1.0  # the exact analytic Gaussian beats the RDP conversion
    # classical Dwork-Roth: z = sqrt(2 ln(1.25/δ)) / ε is enough for ε < 1
    classical = math.sqrt(2 * math.log(1.25 / 1e-6)) * mu
    assert eps < classical


def test_local_epsilon_uses_sensitivity_2c_and_composes_as_sqrt_rounds() -> None:
    assert local_epsilon(4.0, 1e-5) == pytest.approx(gaussian_epsilon(0.5, 1e-5))
    assert local_epsilon(4.0, 1e-5, rounds=16) == pytest.approx(gaussian_epsilon(2.0, 1e-5))
    values = [local_epsilon(z, 1e-5) for z in (1.0, 2.0, 5.0, 10.0)]
    assert values == sorted(values, reverse=True)
    dp = LocalDP(LocalDPConfig(clip_norm=1.0, noise_multiplier=10.0, delta=1e-5), rng=np.random.default_rng(0))
    assert dp.epsilon() < dp.epsilon(rounds=10) == pytest.approx(local_epsilon(10.0, 1e-5, 10))


def test_config_errors_name_the_key() -> None:
    assert LocalDPConfig.parse({"clip_norm": 1, "noise_multiplier": 2}).delta == 1e-5
    cases: list[tuple[dict[str, object], str]] = [
        ({"noise_multiplier": 2}, "clip_norm"),
        ({"clip_norm": 1, "noise_multiplier": 0}, "noise_multiplier"),
        ({"clip_norm": 1, "noise_multiplier": 2, "delta": 2}, "delta"),
        ({"clip_norm": "1", "noise_multiplier": 2}, "clip_norm"),
        ({"clip_norm": 1, "noise_multiplier": 2, "eps": 1}, "eps"),
    ]
    for table, key in cases:
        with pytest.raises(ConfigError, match=rf"privacy\.{key}"):
            LocalDPConfig.parse(table)
