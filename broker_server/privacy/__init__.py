"""Differential privacy for fedflock (issue #7): central DP-FedAvg with an RDP accountant.

* :mod:`~broker_server.privacy.rdp` — RDP of the Poisson-subsampled Gaussian, RDP → (ε, δ);
* :mod:`~broker_server.privacy.accountant` — :class:`RdpAccountant` (budget, ``can_run``) and
  :func:`noise_multiplier_for` (calibrate ``z`` for a target ε);
* :mod:`~broker_server.privacy.central` — clipping, the noisy fixed-denominator mean, adaptive
  clipping, and :class:`CentralDP` (the round engine's hooks);
* :mod:`~broker_server.privacy.stream` — :class:`DPMean`, the round's streaming clipped sum;
* :mod:`~broker_server.privacy.config` — :class:`CentralDPConfig` (the server's ``privacy`` table).

Local DP on the device is :mod:`edge_agent.privacy`. Threat model and guarantees: docs/privacy.md.
"""

from broker_server.privacy.accountant import (
    PrivacySpent,
    RdpAccountant,
    SampledGaussian,
    epsilon_for,
    noise_multiplier_for,
)
from broker_server.privacy.central import (
    CentralDP,
    RoundRelease,
    clip_to_norm,
    dp_mean,
    next_clip_norm,
    update_noise_multiplier,
    update_norm,
)
from broker_server.privacy.config import AdaptiveClipping, CentralDPConfig
from broker_server.privacy.errors import BudgetExhausted, PrivacyError
from broker_server.privacy.rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_sampled_gaussian
from broker_server.privacy.stream import DPMean

__all__ = [
    "DEFAULT_ORDERS",
    "AdaptiveClipping",
    "BudgetExhausted",
    "CentralDP",
    "CentralDPConfig",
    "DPMean",
    "PrivacyError",
    "PrivacySpent",
    "RdpAccountant",
    "RoundRelease",
    "SampledGaussian",
    "clip_to_norm",
    "dp_mean",
    "epsilon_for",
    "epsilon_from_rdp",
    "next_clip_norm",
    "noise_multiplier_for",
    "rdp_sampled_gaussian",
    "update_noise_multiplier",
    "update_norm",
]
