"""FedAdagrad, FedAdam and FedYogi: adaptive server optimizers (Reddi et al. 2021, Algorithm 2).

The round's mean delta Δ is a pseudo-gradient (pointing downhill: ``local − global``). Per
coordinate, with all operations element-wise::

    m ← β1·m + (1 − β1)·Δ
    v ← v + Δ²                              FedAdagrad
    v ← β2·v + (1 − β2)·Δ²                  FedAdam
    v ← v − (1 − β2)·Δ²·sign(v − Δ²)        FedYogi
    w ← w + η·m / (√v + τ)

``m`` starts at 0 and ``v`` at τ² (the paper requires ``v₋₁ ≥ τ²``; τ² is the smallest choice).
As in the paper there is no bias correction: τ bounds the first steps instead. Defaults are the
paper's: η = 10⁻², β1 = 0.9, β2 = 0.99, τ = 10⁻³. Memory: two float64 tensors per aggregated
parameter (buffers are averaged plainly and get none, see :mod:`broker_server.strategies.base`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from broker_server.strategies.base import FedAvgConfig, ServerOptimizer, check_decay, check_positive
from edge_agent.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class AdagradConfig(FedAvgConfig):
    server_lr: float = 1e-2
    #: β1, decay of the first moment (0: no server momentum)
    beta1: float = 0.9
    #: τ, the adaptivity floor: smaller is more adaptive
    tau: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_decay(self.beta1, "beta1")
        check_positive(self.tau, "tau")


@dataclass(frozen=True, kw_only=True)
class AdamConfig(AdagradConfig):
    #: β2, decay of the second moment
    beta2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        check_decay(self.beta2, "beta2")


class _Adaptive(ServerOptimizer):
    slots = ("m", "v")
    config: AdagradConfig

    def initial(self, slot: str, shape: tuple[int, ...]) -> np.ndarray:
        start = self.config.tau**2 if slot == "v" else 0.0
        return np.full(shape, start, dtype=np.float64)

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> None:
        """Update ``v`` in place from Δ²."""
        raise NotImplementedError

    def step(self, name: str, delta: np.ndarray) -> np.ndarray:
        config = self.config
        m = self.slot("m", name, delta.shape)
        v = self.slot("v", name, delta.shape)
        m *= config.beta1
        m += (1.0 - config.beta1) * delta
        self.second_moment(v, delta * delta)
        return config.server_lr * m / (np.sqrt(v) + config.tau)

    def _check_loaded(self, slots: dict[str, dict[str, np.ndarray]]) -> None:
        super()._check_loaded(slots)
        for name, v in slots["v"].items():
            if (v < 0).any():
                raise ConfigError(f"strategy state: second moment of {name!r} has negative entries")


class FedAdagrad(_Adaptive):
    name = "fedadagrad"

    def __init__(self, config: AdagradConfig | None = None) -> None:
        super().__init__(config if config is not None else AdagradConfig())

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> None:
        v += squared


class FedAdam(_Adaptive):
    name = "fedadam"
    config: AdamConfig

    def __init__(self, config: AdamConfig | None = None) -> None:
        super().__init__(config if config is not None else AdamConfig())

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> None:
        v *= self.config.beta2
        v += (1.0 - self.config.beta2) * squared


class FedYogi(_Adaptive):
    name = "fedyogi"
    config: AdamConfig

    def __init__(self, config: AdamConfig | None = None) -> None:
        super().__init__(config if config is not None else AdamConfig())

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> None:
        # the right-hand side reads the old v; Yogi moves v towards Δ² by at most (1 − β2)·Δ²
        v -= (1.0 - self.config.beta2) * squared * np.sign(v - squared)
