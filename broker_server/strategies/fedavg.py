"""FedAvg, FedProx and FedAvgM: the mean delta, optionally with a proximal term or server momentum.

* **FedAvg** (McMahan et al. 2017): ``w ← w + η·Δ``; with ``η = 1`` exactly
  :func:`broker_server.aggregate.apply_delta`.
* **FedProx** (Li et al. 2020): FedAvg on the server; every TASK carries ``fedprox_mu`` = μ, the
  weight of the proximal term ``μ/2·‖w − w_global‖²`` the bundle's train step adds on the device
  (bundles exported with ``FederatedSpec(fedprox_mu=...)``, :mod:`model_export.federated`).
* **FedAvgM** (Hsu et al. 2019): server momentum ``v ← β·v + Δ``, ``w ← w + η·v``; ``β = 0`` is
  FedAvg. One float64 buffer per aggregated parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from broker_server.strategies.base import FedAvgConfig, ServerOptimizer, TaskSettings, check_decay, number
from edge_agent.errors import ConfigError

#: the FedProx graph input; must equal ``model_export.federated.MU_NAME`` (broker_server does not
#: import model_export, which needs torch; a test keeps the two in step)
FEDPROX_MU = "fedprox_mu"


class FedAvg(ServerOptimizer):
    name = "fedavg"

    def __init__(self, config: FedAvgConfig | None = None) -> None:
        super().__init__(config if config is not None else FedAvgConfig())

    def step(self, name: str, delta: np.ndarray) -> np.ndarray:
        return self.config.server_lr * delta


@dataclass(frozen=True, kw_only=True)
class FedProxConfig(FedAvgConfig):
    #: μ, weight of the proximal term on the devices (0 trains exactly like FedAvg)
    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not number(self.mu, "mu") >= 0:
            raise ConfigError(f"mu must be >= 0, got {self.mu!r}")


class FedProx(FedAvg):
    name = "fedprox"
    config: FedProxConfig

    def __init__(self, config: FedProxConfig | None = None) -> None:
        super().__init__(config if config is not None else FedProxConfig())

    def configure_task(self, round: int) -> TaskSettings:
        base = super().configure_task(round)
        return TaskSettings(hyperparameters={FEDPROX_MU: float(self.config.mu)}, lr=base.lr, epochs=base.epochs)


@dataclass(frozen=True, kw_only=True)
class FedAvgMConfig(FedAvgConfig):
    #: β, the server momentum (Hsu et al. use 0.9 with η = 1)
    momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_decay(self.momentum, "momentum")


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    slots = ("momentum",)
    config: FedAvgMConfig

    def __init__(self, config: FedAvgMConfig | None = None) -> None:
        super().__init__(config if config is not None else FedAvgMConfig())

    def step(self, name: str, delta: np.ndarray) -> np.ndarray:
        velocity = self.slot("momentum", name, delta.shape)
        velocity *= self.config.momentum
        velocity += delta
        return self.config.server_lr * velocity
