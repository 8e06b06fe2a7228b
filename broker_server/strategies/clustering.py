"""Clustered FL: group devices by the direction of their updates, keep one model per group.

Pure and deterministic. The intended use follows CFL (Sattler et al. 2020): every cluster has its
own model; after a round, the updates of a cluster's members are compared with
:func:`cluster_updates` (``max_clusters=2`` is CFL's bipartition). If they fall into groups that
point in opposing directions (average cosine similarity below ``threshold``) the cluster is split
with :meth:`ClusterAssignments.split`, each part continuing from the parent's model, so clusters
form recursively over rounds. Devices the assignments do not know train the root cluster 0.

**When to split** (:func:`check_split`, CFL's criterion): only a cluster whose FedAvg has become
*stationary* — its weighted mean update is small next to its members' updates,
``‖mean‖ < stationarity × max_i ‖Δ_i‖`` (CFL's ε1, here relative so one default fits every
model scale) — while some member still moves, ``max_i ‖Δ_i‖ > min_update_norm`` (CFL's ε2,
absolute), and whose updates fall into groups with mean cosine similarity below ``threshold``.
The server side is :mod:`broker_server.cluster_rounds`.

**Algorithm.** Agglomerative clustering, average linkage on the cosine similarity of the
flattened updates: start with one cluster per update, repeatedly merge the two clusters with the
highest mean pairwise similarity while it is ``>= threshold`` (and, beyond that, while there are
more than ``max_clusters``). Ties go to the lowest indices, so the result is a pure function of
the input; permuting the updates permutes the labels' owners but not the partition (unless two
candidate merges tie exactly). A zero update has similarity 0 with every other update.

**Memory.** Unlike the FedAvg family, this needs every update of the round at once: the caller
holds the decoded float32 deltas of at most :attr:`ClusterConfig.max_devices` devices (check
``clients_per_round <= max_devices`` at start-up), i.e. ``max_devices × 4 B × model parameters``
(:meth:`ClusterConfig.memory_bytes`), e.g. 64 devices × 1 M parameters = 256 MB. This function adds
two ``n × n`` float64 matrices and, for tensor-set input, one tensor stacked across devices at a
time (never the whole flattened matrix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker_server.strategies.base import number
from edge_agent.errors import ConfigError

#: ``format`` of :meth:`ClusterAssignments.to_json`
ASSIGNMENTS_FORMAT = 1
#: the cluster every unassigned device belongs to (the initial global model)
ROOT_CLUSTER = 0

Updates = Sequence[Mapping[str, np.ndarray]] | np.ndarray


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    #: most groups one cluster is split into per round (2: CFL's bipartition)
    max_clusters: int = 2
    #: groups whose mean cosine similarity is below this stay apart, in [-1, 1]
    threshold: float = 0.0
    #: most updates clustered at once; bounds the memory (see the module docstring)
    max_devices: int = 64
    #: CFL's ε1, relative to the largest member update: a cluster is *stationary* (a split
    #: candidate) when ``‖weighted mean update‖ < stationarity × max_i ‖Δ_i‖``, in (0, 1]
    stationarity: float = 0.5
    #: CFL's ε2: split only while ``max_i ‖Δ_i‖ > min_update_norm`` (0: any non-zero update);
    #: raise it to the update norm of a converged model so noise alone never splits a cluster
    min_update_norm: float = 0.0

    def __post_init__(self) -> None:
        for key in ("max_clusters", "max_devices"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        if not -1.0 <= number(self.threshold, "threshold") <= 1.0:
            raise ConfigError(f"threshold must be in [-1, 1], got {self.threshold!r}")
        if not 0.0 < number(self.stationarity, "stationarity") <= 1.0:
            raise ConfigError(f"stationarity must be in (0, 1], got {self.stationarity!r}")
        if not number(self.min_update_norm, "min_update_norm") >= 0.0:
            raise ConfigError(f"min_update_norm must be a number >= 0, got {self.min_update_norm!r}")

    def memory_bytes(self, model_parameters: int) -> int:
        """Upper bound of one round's clustering memory: float32 updates plus two similarity matrices."""
        return self.max_devices * model_parameters * 4 + 2 * self.max_devices**2 * 8


@dataclass(frozen=True)
class SplitCheck:
    """CFL's split test for one cluster's round: the norms it compared and the proposed groups."""

    #: ``‖Σ w_i Δ_i / Σ w_i‖`` and ``max_i ‖Δ_i‖``
    mean_norm: float
    max_norm: float
    #: one label per update (from :func:`cluster_updates`); None when the cluster stays whole
    labels: np.ndarray | None
    #: why it stays whole ("" when it splits)
    reason: str


def check_split(rows: np.ndarray, weights: np.ndarray, config: ClusterConfig) -> SplitCheck:
    """Whether a cluster whose members sent ``rows`` (``n × d``, weights ``n``) splits, per CFL.

    It splits when it is stationary (``mean_norm < stationarity × max_norm``), some update is
    still large (``max_norm > min_update_norm``), and :func:`cluster_updates` finds more than one
    group (groups whose mean cosine similarity is below ``threshold``).
    """
    n = rows.shape[0]
    if weights.shape != (n,):
        raise ValueError(f"need one weight per row: {n} rows, weights of shape {weights.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64)) if n else np.zeros(0)
    mean = (weights.astype(np.float64) @ rows.astype(np.float64)) / float(weights.sum()) if n else np.zeros(0)
    mean_norm, max_norm = float(np.linalg.norm(mean)), float(norms.max()) if n else 0.0
    reason = ""
    if n < 2:
        reason = f"{n} member update(s); a split needs 2"
    elif not max_norm > config.min_update_norm:
        reason = f"largest update norm {max_norm:.4g} <= min_update_norm {config.min_update_norm:g}"
    elif not mean_norm < config.stationarity * max_norm:
        reason = f"not stationary: mean norm {mean_norm:.4g} >= {config.stationarity:g} x max norm {max_norm:.4g}"
    if reason:
        return SplitCheck(mean_norm, max_norm, None, reason)
    labels = cluster_updates(rows, max_clusters=config.max_clusters, threshold=config.threshold)
    if int(labels.max()) == 0:
        return SplitCheck(
            mean_norm, max_norm, None, f"the updates agree (similarity >= threshold {config.threshold:g})"
        )
    return SplitCheck(mean_norm, max_norm, labels, "")


def cosine_similarity(updates: Updates) -> np.ndarray:
    """``n × n`` float64 cosine similarities of the flattened updates (rows of a matrix, or tensor sets)."""
    gram = _gram(updates)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    scale = np.where(norms > 0, norms, 1.0)
    sim = gram / scale[:, None] / scale[None, :]
    sim[norms == 0, :] = 0.0
    sim[:, norms == 0] = 0.0
    np.fill_diagonal(sim, 1.0)
    return np.clip(sim, -1.0, 1.0)


def _gram(updates: Updates) -> np.ndarray:
    if isinstance(updates, np.ndarray):
        if updates.ndim != 2:
            raise ValueError(f"an update matrix must be 2-D (devices × values), got shape {updates.shape}")
        flat = updates.astype(np.float64)
        return flat @ flat.T
    n = len(updates)
    gram = np.zeros((n, n), dtype=np.float64)
    if n == 0:
        return gram
    names = sorted(updates[0])
    for i, update in enumerate(updates):
        if sorted(update) != names:
            raise ValueError(f"update {i} has tensors {sorted(update)[:5]}, update 0 has {names[:5]}")
    for name in names:
        shape = np.shape(updates[0][name])
        for i, update in enumerate(updates):
            if np.shape(update[name]) != shape:
                raise ValueError(f"update {i}: tensor {name!r} has shape {np.shape(update[name])}, not {shape}")
        stacked = np.stack([np.asarray(u[name], dtype=np.float64).reshape(-1) for u in updates])
        gram += stacked @ stacked.T
    return gram


def cluster_updates(updates: Updates, *, max_clusters: int, threshold: float) -> np.ndarray:
    """Cluster labels (int64, ``0..k-1`` numbered by first member) of ``n`` updates; see the module doc."""
    if isinstance(max_clusters, bool) or not isinstance(max_clusters, int) or max_clusters < 1:
        raise ValueError(f"max_clusters must be an integer >= 1, got {max_clusters!r}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1], got {threshold!r}")
    sim = cosine_similarity(updates)
    n = sim.shape[0]
    owner = np.arange(n)  # cluster (index of its representative row) of every update
    # sums[a, b]: total pairwise similarity between the members of clusters a and b
    sums = sim.copy()
    sizes = np.ones(n, dtype=np.float64)
    active = np.ones(n, dtype=bool)
    pair = np.triu(np.ones((n, n), dtype=bool), k=1)
    clusters = n
    while clusters > 1:
        linkage = np.where(pair & active[:, None] & active[None, :], sums / np.outer(sizes, sizes), -np.inf)
        a, b = np.unravel_index(int(np.argmax(linkage)), linkage.shape)
        if linkage[a, b] < threshold and clusters <= max_clusters:
            break
        sums[a, :] += sums[b, :]
        sums[:, a] += sums[:, b]
        sizes[a] += sizes[b]
        active[b] = False
        owner[owner == b] = a
        clusters -= 1
    return _canonical(owner)


def _canonical(owner: np.ndarray) -> np.ndarray:
    labels = np.empty(len(owner), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, cluster in enumerate(owner.tolist()):
        labels[i] = seen.setdefault(cluster, len(seen))
    return labels


class ClusterAssignments:
    """Device id → cluster id, persisted as JSON; unknown devices belong to :data:`ROOT_CLUSTER`."""

    def __init__(self, devices: Mapping[str, int] | None = None, *, next_id: int | None = None) -> None:
        self._devices: dict[str, int] = dict(devices or {})
        used = max([ROOT_CLUSTER, *self._devices.values()]) + 1
        if next_id is not None and next_id < used:
            raise ValueError(f"next_id {next_id} would reuse cluster ids (highest in use is {used - 1})")
        self.next_id = used if next_id is None else next_id

    def cluster_of(self, device_id: str) -> int:
        return self._devices.get(device_id, ROOT_CLUSTER)

    def members(self, cluster_id: int) -> tuple[str, ...]:
        """Devices assigned to ``cluster_id``, sorted (devices never assigned or split are in the root too)."""
        return tuple(sorted(d for d, c in self._devices.items() if c == cluster_id))

    def clusters(self) -> tuple[int, ...]:
        """Cluster ids in use, sorted: the root and every cluster some device is assigned to."""
        return tuple(sorted({ROOT_CLUSTER, *self._devices.values()}))

    def split(self, cluster_id: int, device_ids: Sequence[str], labels: Sequence[int]) -> dict[int, int]:
        """Split ``cluster_id`` by ``labels`` (from :func:`cluster_updates` over ``device_ids``' updates).

        The largest group keeps ``cluster_id`` (ties: the group with the smallest device id); every
        other group gets a fresh id, in order of its smallest device id, so the outcome does not
        depend on the order of ``device_ids``. Returns ``{new cluster id: cluster_id}``: the caller
        copies the parent's model and strategy state for each. Devices of the cluster that are not
        in ``device_ids`` stay in it.
        """
        if len(device_ids) != len(labels) or len(set(device_ids)) != len(device_ids):
            raise ValueError("split needs one label per device and no device twice")
        strangers = [d for d in device_ids if self.cluster_of(d) != cluster_id]
        if strangers:
            raise ValueError(f"devices {sorted(strangers)[:5]} are not in cluster {cluster_id}")
        groups: dict[int, list[str]] = {}
        for device, label in zip(device_ids, labels, strict=True):
            groups.setdefault(int(label), []).append(device)
        ordered = sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))
        for device in ordered[0]:
            self._devices[device] = cluster_id
        forks: dict[int, int] = {}
        for group in sorted(ordered[1:], key=lambda g: g[0]):
            new_id = self.next_id
            self.next_id += 1
            forks[new_id] = cluster_id
            for device in group:
                self._devices[device] = new_id
        return forks

    def assign(self, device_id: str, cluster_id: int) -> None:
        if not ROOT_CLUSTER <= cluster_id < self.next_id:
            raise ValueError(f"cluster {cluster_id} was never created (next id {self.next_id})")
        self._devices[device_id] = cluster_id

    def to_json(self) -> dict[str, Any]:
        return {"format": ASSIGNMENTS_FORMAT, "next_id": self.next_id, "devices": dict(sorted(self._devices.items()))}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ClusterAssignments:
        """Parse :meth:`to_json` output; raises :class:`ConfigError` naming the bad field."""
        if raw.get("format") != ASSIGNMENTS_FORMAT:
            raise ConfigError(f"cluster assignments: format {raw.get('format')!r} is not {ASSIGNMENTS_FORMAT}")
        devices, next_id = raw.get("devices"), raw.get("next_id")
        if not isinstance(devices, Mapping) or not all(
            isinstance(d, str) and isinstance(c, int) and not isinstance(c, bool) and c >= 0 for d, c in devices.items()
        ):
            raise ConfigError("cluster assignments: devices must map device ids to cluster ids >= 0")
        if isinstance(next_id, bool) or not isinstance(next_id, int):
            raise ConfigError(f"cluster assignments: next_id must be an integer, got {next_id!r}")
        try:
            return cls(devices, next_id=next_id)
        except ValueError as exc:
            raise ConfigError(f"cluster assignments: {exc}") from exc
