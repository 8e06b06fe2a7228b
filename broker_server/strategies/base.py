"""The :class:`Strategy` protocol, its value types and the shared server-update skeleton.

A strategy sees a round through two hooks and keeps whatever state it needs between them:

* :meth:`Strategy.configure_task` — what goes into every TASK of a round (graph-input
  hyper-parameters such as ``fedprox_mu``, optional client ``lr``/``epochs`` overrides);
* :meth:`Strategy.apply` — the new global weights from the current ones and the round's
  example-weighted mean delta (``mean(local − global)``), which the server already folds in
  O(model) memory (:class:`broker_server.aggregate.WeightedMean`). Every strategy here needs only
  that mean, so the FedAvg family keeps streaming: its extra memory is its own state, a fixed
  number of float64 copies of the aggregated tensors (0 for FedAvg/FedProx, 1 for FedAvgM,
  2 for FedAdam/FedYogi/FedAdagrad).

:meth:`Strategy.state` / :meth:`Strategy.load_state` export and restore that state (tensors plus a
JSON-able dict) so a restarted server continues bit-for-bit where it stopped.

**Buffers are averaged plainly.** Tensors the caller names in ``plain`` (BatchNorm running
mean/var: :func:`plain_tensor_names`) become exactly the mean of the devices' values, ``w + Δ``,
whatever the strategy. They are statistics of activations, not parameters descended by a
gradient: a server learning rate, momentum or Adam's per-coordinate normalisation would turn the
average of the devices' estimates into a value no device measured (momentum can overshoot a
variance below zero), and the moments would be wasted memory.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from broker_server.aggregate import Tensors
from edge_agent.errors import ConfigError
from edge_agent.protocol.manifest import ROLE_PARAMETER, Manifest

#: ``meta["format"]`` of :class:`StrategyState`
STATE_FORMAT = 1
HyperValue = float | tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class TaskSettings:
    """What a strategy puts into a round's TASKs; ``None`` keeps the server's own value."""

    #: graph-input hyper-parameters (manifest ``hyperparameters``), e.g. ``{"fedprox_mu": 0.01}``
    hyperparameters: Mapping[str, HyperValue] = field(default_factory=dict)
    lr: float | None = None
    epochs: int | None = None


@dataclass(frozen=True, kw_only=True)
class StrategyState:
    """Everything a strategy needs to resume: float64 tensors ``"<slot>/<tensor>"`` and JSON meta.

    Store ``tensors`` with :func:`edge_agent.protocol.tensors.write_tensor_file` (float64 is
    supported) and ``meta`` with :func:`json.dumps`.
    """

    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]


@runtime_checkable
class Strategy(Protocol):
    """How a round's TASKs are configured and how its mean delta becomes the next global model."""

    name: ClassVar[str]

    def configure_task(self, round: int) -> TaskSettings:
        """Settings for every TASK of round ``round`` (1-based)."""
        ...

    def apply(
        self,
        weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
        *,
        round: int,
        plain: Collection[str] = frozenset(),
    ) -> Tensors:
        """New global weights; only tensors in ``mean_delta`` change, ``plain`` ones to ``w + Δ``."""
        ...

    def state(self) -> StrategyState: ...

    def load_state(self, state: StrategyState) -> None: ...


def plain_tensor_names(manifest: Manifest) -> frozenset[str]:
    """Aggregated tensors that are not parameters (buffers): averaged, never optimised."""
    return frozenset(t.name for t in manifest.aggregated_tensors if t.role != ROLE_PARAMETER)


def check_task_settings(settings: TaskSettings, manifest: Manifest) -> None:
    """Raise :class:`ConfigError` if the strategy would send hyper-parameters the bundle lacks.

    Devices refuse a TASK naming an unknown hyper-parameter, so every task of the run would fail;
    call this once at start-up with ``strategy.configure_task(1)``.
    """
    known = {h.name for h in manifest.hyperparameters}
    unknown = sorted(set(settings.hyperparameters) - known)
    if unknown:
        raise ConfigError(
            f"the strategy sends hyper-parameters {unknown}, but bundle {manifest.name!r} takes only "
            f"{sorted(known)} (export FedProx bundles with FederatedSpec(fedprox_mu=...))"
        )


# -- config validation -----------------------------------------------------------------------------


def number(value: object, key: str) -> float:
    """``value`` as a finite float; JSON booleans and strings are refused, naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def check_positive(value: object, key: str) -> None:
    if not number(value, key) > 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def check_decay(value: object, key: str) -> None:
    if not 0 <= number(value, key) < 1:
        raise ConfigError(f"{key} must be in [0, 1), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class FedAvgConfig:
    """Server learning rate and optional client overrides shared by every strategy."""

    #: η in ``w ← w + η·step``
    server_lr: float = 1.0
    #: client learning rate sent in TASKs (``None``: the server's ``lr``)
    client_lr: float | None = None
    #: local epochs sent in TASKs (``None``: the server's ``local_epochs``)
    local_epochs: int | None = None

    def __post_init__(self) -> None:
        check_positive(self.server_lr, "server_lr")
        if self.client_lr is not None:
            check_positive(self.client_lr, "client_lr")
        if self.local_epochs is not None and (
            isinstance(self.local_epochs, bool) or not isinstance(self.local_epochs, int) or self.local_epochs < 1
        ):
            raise ConfigError(f"local_epochs must be an integer >= 1, got {self.local_epochs!r}")


# -- shared implementation -------------------------------------------------------------------------


class ServerOptimizer:
    """Skeleton for strategies of the form ``w ← w + step(Δ)`` with per-tensor float64 slots.

    Subclasses set :attr:`slots` (state tensor kinds, e.g. ``("m", "v")``), :meth:`initial`
    (a slot's value before the first step) and :meth:`step`, which may update the slots in place.
    """

    name: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: FedAvgConfig) -> None:
        self.config = config
        self._slots: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in self.slots}
        self.steps = 0
        self.last_round: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, steps={self.steps})"

    def configure_task(self, round: int) -> TaskSettings:
        return TaskSettings(lr=self.config.client_lr, epochs=self.config.local_epochs)

    def initial(self, slot: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float64)

    def step(self, name: str, delta: np.ndarray) -> np.ndarray:
        """The float64 change of tensor ``name`` for mean delta ``delta`` (float64)."""
        raise NotImplementedError

    def slot(self, slot: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
        values = self._slots[slot]
        if name not in values:
            values[name] = self.initial(slot, shape)
        return values[name]

    def apply(
        self,
        weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
        *,
        round: int,
        plain: Collection[str] = frozenset(),
    ) -> Tensors:
        # everything is checked before any slot changes, so a refused call leaves the state as it was
        for name, delta in mean_delta.items():
            if name not in weights:
                raise ValueError(f"mean delta has tensor {name!r}, which the weights do not")
            shape = np.shape(weights[name])
            if np.shape(delta) != shape:
                raise ValueError(f"tensor {name!r}: delta shape {np.shape(delta)} != weights {shape}")
            for slot, values in self._slots.items():
                if name in values and values[name].shape != shape:
                    raise ValueError(
                        f"tensor {name!r} has shape {shape}, its {slot!r} state {values[name].shape}: the model "
                        "changed, start a fresh strategy"
                    )
        out = {name: np.array(value) for name, value in weights.items()}
        for name, delta in mean_delta.items():
            d = np.asarray(delta, dtype=np.float64)
            change = d if name in plain else self.step(name, d)
            # float64 then one rounding: for float32 weights and η = 1 this is exactly w + Δ in float32
            out[name] = (out[name].astype(np.float64) + change).astype(out[name].dtype)
        self.steps += 1
        self.last_round = round
        return out

    def state(self) -> StrategyState:
        tensors = {
            f"{slot}/{name}": value.copy() for slot, values in self._slots.items() for name, value in values.items()
        }
        meta = {
            "format": STATE_FORMAT,
            "strategy": self.name,
            "steps": self.steps,
            "last_round": self.last_round,
            "config": asdict(self.config),
        }
        return StrategyState(tensors=tensors, meta=meta)

    def load_state(self, state: StrategyState) -> None:
        """Restore :meth:`state` output; the config may differ (e.g. a new η), the strategy may not."""
        meta = state.meta
        if meta.get("format") != STATE_FORMAT:
            raise ConfigError(f"strategy state format {meta.get('format')!r} is not {STATE_FORMAT}")
        if meta.get("strategy") != self.name:
            raise ConfigError(f"strategy state is for {meta.get('strategy')!r}, this strategy is {self.name!r}")
        steps, last_round = meta.get("steps"), meta.get("last_round")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"strategy state: steps must be an integer >= 0, got {steps!r}")
        if last_round is not None and (isinstance(last_round, bool) or not isinstance(last_round, int)):
            raise ConfigError(f"strategy state: last_round must be an integer or null, got {last_round!r}")
        slots: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in self.slots}
        for key, value in state.tensors.items():
            slot, sep, name = key.partition("/")
            if not sep or slot not in slots or not name:
                raise ConfigError(f"strategy state: unexpected tensor {key!r} for {self.name!r} (slots {self.slots})")
            array = np.array(value, dtype=np.float64)
            if not np.isfinite(array).all():
                raise ConfigError(f"strategy state: tensor {key!r} is not finite")
            slots[slot][name] = array
        self._check_loaded(slots)
        self._slots = slots
        self.steps = steps
        self.last_round = last_round

    def _check_loaded(self, slots: dict[str, dict[str, np.ndarray]]) -> None:
        """Subclass hook: raise :class:`ConfigError` for inconsistent restored slots."""
        names = [set(values) for values in slots.values()]
        if names and any(n != names[0] for n in names):
            raise ConfigError(f"strategy state: slots {self.slots} do not cover the same tensors")
