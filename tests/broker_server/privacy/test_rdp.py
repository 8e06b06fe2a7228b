"""The subsampled-Gaussian RDP and the (ε, δ) conversion against published and independent values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from broker_server.privacy import (
    DEFAULT_ORDERS,
    RdpAccountant,
    SampledGaussian,
    epsilon_from_rdp,
    noise_multiplier_for,
    rdp_sampled_gaussian,
)
from broker_server.privacy.rdp import log_a
from edge_agent.errors import ConfigError

#: Opacus ``RDPAccountant.DEFAULT_ALPHAS`` (opacus/accountants/rdp.py)
OPACUS_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def test_integer_orders_match_dp_accounting_reference() -> None:
    # google/differential-privacy, python/dp_accounting/.../rdp_privacy_accountant_test.py,
    # test_compute_rdp_poisson_sampled_gaussian: q = 0.01, z = 2.5, 50 steps.
    rdp = rdp_sampled_gaussian(0.01, 2.5, [5, 50, 100]) * 50
    np.testing.assert_allclose(rdp, [2.18075656e-03, 2.38460375e-02, 1.67416308e02], rtol=1e-6)


def test_fractional_orders_match_tf_privacy_reference_and_stay_below_dp_accountings_bound() -> None:
    # tensorflow/privacy rdp_accountant_test.py, test_compute_rdp_sequence (same mechanism):
    # [0.00065, 0.001085] at orders 1.5 and 2.5, to 1e-5. Newer dp_accounting adds the series'
    # terms in absolute value, an upper bound: 6.70579741e-04 and 1.08548710e-03.
    rdp = rdp_sampled_gaussian(0.01, 2.5, [1.5, 2.5]) * 50
    np.testing.assert_allclose(rdp, [0.00065, 0.001085], atol=1e-5)
    assert rdp[0] <= 6.70579741e-04 and rdp[1] <= 1.08548710e-03


def test_epsilon_matches_opacus_reference() -> None:
    # opacus/tests/accountants_test.py test_rdp_accountant: z = 1.5, q = 0.04, 2250 steps, δ = 1e-5
    rdp = rdp_sampled_gaussian(0.04, 1.5, OPACUS_ALPHAS) * int(90 / 0.04)
    epsilon, _ = epsilon_from_rdp(OPACUS_ALPHAS, rdp, 1e-5)
    assert epsilon == pytest.approx(7.32911117143, abs=1e-9)


def test_abadi_et_al_moments_accountant_example() -> None:
    # Abadi et al. 2016 §3.1: q = 0.01, σ = 4, δ = 1e-5, T = 10000 gives ε ≈ 1.26 with the moments
    # accountant (integer orders up to 32, conversion ε = min_λ (α(λ) + log(1/δ)) / λ) ...
    orders = list(range(2, 33))
    rdp = rdp_sampled_gaussian(0.01, 4.0, orders) * 10_000
    moments = float(np.min(rdp + math.log(1e5) / (np.array(orders) - 1.0)))
    assert moments == pytest.approx(1.26, abs=0.005)
    # ... and the improved conversion only tightens it
    assert epsilon_from_rdp(orders, rdp, 1e-5)[0] < moments


def test_conversion_of_pure_dp_curve() -> None:
    # tensorflow/privacy test_get_privacy_spent_check_target_delta and dp_accounting
    # test_compute_epsilon_delta_pure_dp: constant RDP 1.1 on orders 2..32 -> ε = 1.32783806176 at 32
    epsilon, order = epsilon_from_rdp(range(2, 33), [1.1] * 31, 1e-5)
    assert epsilon == pytest.approx(1.32783806176, abs=1e-10)
    assert order == 32


def test_unsampled_gaussian_conversion() -> None:
    # dp_accounting test_compute_epsilon_delta_gaussian: z = 4.530877117 without sampling is (1, 1e-6)
    orders = [0.001 * i for i in range(1001, 100000)]
    rdp = rdp_sampled_gaussian(1.0, 4.530877117, orders)
    assert epsilon_from_rdp(orders, rdp, 1e-6)[0] == pytest.approx(1.0, abs=1e-7)


def _log_a_by_integration(q: float, z: float, alpha: float) -> float:
    """log E_{x~N(0,z²)}[((1-q) + q exp((2x-1)/(2z²)))^α] by adaptive quadrature, in log space."""

    def log_f(x: float) -> float:
        return (
            -0.5 * (x / z) ** 2
            - math.log(z * math.sqrt(2 * math.pi))
            + alpha * np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * z * z))
        )

    grid = np.linspace(-40 * z, 40 * z + alpha, 4001)
    peak = grid[int(np.argmax([log_f(x) for x in grid]))]
    top = log_f(peak)
    value, _ = integrate.quad(
        lambda x: math.exp(log_f(x) - top), peak - 60 * z, peak + 60 * z, points=[peak], limit=500, epsrel=1e-11
    )
    return top + math.log(value)


@pytest.mark.parametrize(
    ("q", "z", "alpha"),
    [(0.01, 2.5, 1.5), (0.05, 1.0, 2.75), (0.1, 0.8, 4.3), (0.2, 1.5, 8), (0.5, 2.0, 17.5), (0.01, 1.1, 32)],
)
def test_log_a_matches_direct_numerical_integration(q: float, z: float, alpha: float) -> None:
    assert log_a(q, z, alpha) == pytest.approx(_log_a_by_integration(q, z, alpha), rel=1e-6, abs=1e-12)


def test_noise_multiplier_matches_opacus_and_always_meets_the_target() -> None:
    # opacus/tests/accountants_test.py test_get_noise_multiplier_rdp_epochs: ε = 8, δ = 1e-5,
    # q = 0.04, 90 epochs -> 1.416 (Opacus bisects σ to 0.01)
    z = noise_multiplier_for(target_epsilon=8, delta=1e-5, rounds=2250, sampling_rate=0.04, orders=OPACUS_ALPHAS)
    assert z == pytest.approx(1.416, abs=0.01)
    accountant = RdpAccountant(
        SampledGaussian(sampling_rate=0.04, noise_multiplier=z), epsilon_budget=8, delta=1e-5, orders=OPACUS_ALPHAS
    )
    assert accountant.epsilon(2250) <= 8
    less = RdpAccountant(
        SampledGaussian(sampling_rate=0.04, noise_multiplier=z * (1 - 2e-3)),
        epsilon_budget=8,
        delta=1e-5,
        orders=OPACUS_ALPHAS,
    )
    assert less.epsilon(2250) > 8  # within the tolerance of the smallest feasible z


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_calibrated_noise_spends_close_to_the_target(epsilon: float) -> None:
    z = noise_multiplier_for(target_epsilon=epsilon, delta=1e-5, rounds=30, sampling_rate=0.2)
    spent = RdpAccountant(
        SampledGaussian(sampling_rate=0.2, noise_multiplier=z), epsilon_budget=epsilon, delta=1e-5
    ).epsilon(30)
    assert epsilon * 0.99 <= spent <= epsilon


def test_unreachable_target_and_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="target_epsilon"):
        noise_multiplier_for(target_epsilon=1e-6, delta=1e-12, rounds=10**6, sampling_rate=1.0)
    with pytest.raises(ConfigError, match="delta"):
        noise_multiplier_for(target_epsilon=1, delta=0, rounds=10, sampling_rate=0.1)
    with pytest.raises(ConfigError, match="rounds"):
        noise_multiplier_for(target_epsilon=1, delta=1e-5, rounds=0, sampling_rate=0.1)
    with pytest.raises(ConfigError, match="sampling_rate"):
        noise_multiplier_for(target_epsilon=1, delta=1e-5, rounds=10, sampling_rate=1.5)


def test_edge_cases() -> None:
    assert np.all(rdp_sampled_gaussian(0.0, 1.0) == 0)
    assert np.all(np.isinf(rdp_sampled_gaussian(0.1, 0.0)))
    assert epsilon_from_rdp([2.0, 3.0], [math.inf, math.inf], 1e-5)[0] == math.inf
    with pytest.raises(ValueError):
        rdp_sampled_gaussian(0.1, 1.0, [1.0])
    with pytest.raises(ValueError):
        epsilon_from_rdp([2.0], [0.1, 0.2], 1e-5)
    assert len(DEFAULT_ORDERS) == len(set(DEFAULT_ORDERS)) and max(DEFAULT_ORDERS) == 256
