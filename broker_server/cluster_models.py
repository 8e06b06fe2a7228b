"""Clustered FL's state: every cluster's model, and which device belongs to which cluster.

:class:`ClusterBook` is what a clustered federation is after ``federation_version`` completed
rounds: the :class:`~broker_server.strategies.clustering.ClusterAssignments` and one
:class:`ClusterModel` per cluster (weights, its own version counter, its own strategy object and
the lineage it was forked from). It is pure data; :mod:`broker_server.cluster_rounds` changes it.

**Persistence.** :meth:`ClusterBook.to_json` is one JSON document (tensors as base64 of the wire
tensor format, :func:`edge_agent.protocol.tensors.encode_tensors`; strategy state as its tensors
plus meta). The server keeps it as the store setting :func:`setting_key` of the federation
version it describes, written *before* the round's model version commits: a crash in between
leaves the round open and the previous version's document intact, so a restart resumes the round
from consistent clusters and never applies a round to a cluster twice. One document per version
is kept (like the store's model versions, which keep every version's weights).
"""

from __future__ import annotations

import base64
import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker_server.strategies import Strategy, StrategyState
from broker_server.strategies.clustering import ROOT_CLUSTER, ClusterAssignments
from edge_agent.errors import ConfigError, FedflockError, StorageError
from edge_agent.protocol.tensors import decode_tensors, encode_tensors

__all__ = ["BOOK_FORMAT", "ClusterBook", "ClusterModel", "setting_key"]

Tensors = dict[str, np.ndarray]

#: ``format`` of :meth:`ClusterBook.to_json`
BOOK_FORMAT = 1


def setting_key(federation_version: int) -> str:
    """The store setting holding the clusters after ``federation_version`` completed rounds."""
    return f"clusters/v{federation_version:06d}"


@dataclass(kw_only=True)
class ClusterModel:
    cluster_id: int
    weights: Tensors
    #: this cluster's own version counter (+1 every round that changed its model)
    version: int
    strategy: Strategy
    #: ``(cluster id, version)`` this cluster was forked from (None: the root's initial model)
    parent: tuple[int, int] | None = None
    #: the round that made this version (None: version 0, or restored from before clustering)
    round: int | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    #: the largest per-round median member-update norm this cluster and its ancestors have seen:
    #: the scale of the default split floor (:func:`broker_server.cluster_config.split_floor`; 0: none yet)
    peak_norm: float = 0.0

    def fork(self, cluster_id: int) -> ClusterModel:
        """A new cluster continuing from this model and a copy of its strategy state."""
        return ClusterModel(
            cluster_id=cluster_id,
            weights={name: np.array(value) for name, value in self.weights.items()},
            version=self.version,
            strategy=copy.deepcopy(self.strategy),
            parent=(self.cluster_id, self.version),
            round=self.round,
            test_loss=self.test_loss,
            test_accuracy=self.test_accuracy,
            peak_norm=self.peak_norm,
        )


@dataclass(kw_only=True)
class ClusterBook:
    assignments: ClusterAssignments
    models: dict[int, ClusterModel]
    #: the server's model version (completed rounds) these clusters belong to
    federation_version: int

    @classmethod
    def root_only(cls, weights: Tensors, strategy: Strategy, *, federation_version: int) -> ClusterBook:
        """One cluster (the root) holding ``weights``: a fresh clustered federation."""
        root = ClusterModel(cluster_id=ROOT_CLUSTER, weights=dict(weights), version=0, strategy=strategy)
        return cls(assignments=ClusterAssignments(), models={ROOT_CLUSTER: root}, federation_version=federation_version)

    @property
    def root(self) -> ClusterModel:
        return self.models[ROOT_CLUSTER]

    def model_of(self, device_id: str) -> ClusterModel:
        return self.models[self.assignments.cluster_of(device_id)]

    def members(self, cluster_id: int) -> tuple[str, ...]:
        return self.assignments.members(cluster_id)

    # -- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BOOK_FORMAT,
            "federation_version": self.federation_version,
            "assignments": self.assignments.to_json(),
            "clusters": [_model_json(self.models[c]) for c in sorted(self.models)],
        }

    @classmethod
    def from_json(cls, raw: Any, template: Strategy) -> ClusterBook:
        """Parse :meth:`to_json`; every cluster's strategy is a copy of ``template`` with its stored state.

        Raises :class:`StorageError` naming what is wrong (the store holds something unusable).
        """
        try:
            return _book(raw, template)
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            detail = exc.reason if isinstance(exc, FedflockError) else f"{type(exc).__name__}: {exc}"
            raise StorageError(f"the stored clusters are unusable: {detail}") from exc


def _b64(tensors: Mapping[str, np.ndarray]) -> str:
    return base64.b64encode(encode_tensors(tensors)).decode("ascii")


def _tensors(text: Any) -> Tensors:
    if not isinstance(text, str):
        raise TypeError(f"tensors must be base64 text, got {type(text).__name__}")
    try:
        return decode_tensors(base64.b64decode(text, validate=True))
    except FedflockError as exc:
        raise ValueError(exc.reason) from exc


def _optional_float(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _norm(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"peak_norm must be a finite number >= 0, got {value!r}")
    return float(value)


def _model_json(model: ClusterModel) -> dict[str, Any]:
    state = model.strategy.state()
    return {
        "id": model.cluster_id,
        "version": model.version,
        "parent": list(model.parent) if model.parent is not None else None,
        "round": model.round,
        "test_loss": model.test_loss,
        "test_accuracy": model.test_accuracy,
        "peak_norm": model.peak_norm,
        "weights": _b64(model.weights),
        "strategy": {"name": model.strategy.name, "meta": state.meta, "tensors": _b64(state.tensors)},
    }


def _book(raw: Any, template: Strategy) -> ClusterBook:
    if not isinstance(raw, Mapping) or raw.get("format") != BOOK_FORMAT:
        raise ValueError(f"format is not {BOOK_FORMAT}")
    assignments = ClusterAssignments.from_json(raw["assignments"])
    models: dict[int, ClusterModel] = {}
    for item in raw["clusters"]:
        strategy = copy.deepcopy(template)
        saved = item["strategy"]
        if saved["name"] != strategy.name:
            raise ValueError(f"cluster {item['id']} ran strategy {saved['name']!r}, the server runs {strategy.name!r}")
        strategy.load_state(StrategyState(tensors=_tensors(saved["tensors"]), meta=dict(saved["meta"])))
        parent = item["parent"]
        model = ClusterModel(
            cluster_id=int(item["id"]),
            weights=_tensors(item["weights"]),
            version=int(item["version"]),
            strategy=strategy,
            parent=(int(parent[0]), int(parent[1])) if parent is not None else None,
            round=None if item["round"] is None else int(item["round"]),
            test_loss=_optional_float(item["test_loss"]),
            test_accuracy=_optional_float(item["test_accuracy"]),
            peak_norm=_norm(item.get("peak_norm", 0.0)),  # absent in books stored before it was kept
        )
        models[model.cluster_id] = model
    missing = sorted(set(assignments.clusters()) - set(models))
    if missing:
        raise ValueError(f"devices are assigned to clusters {missing}, which have no model")
    return ClusterBook(assignments=assignments, models=models, federation_version=int(raw["federation_version"]))
