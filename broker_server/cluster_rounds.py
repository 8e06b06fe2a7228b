"""Clustered FL in the synchronous round engine (CFL, Sattler et al. 2020; ``ServerConfig.clusters``).

:class:`ClusterRounds` is the round engine's hook when ``clusters`` is set. Every cluster has its
own model, version counter and strategy object (:mod:`broker_server.cluster_models`); devices the
assignments do not know (never seen, or never split off) train the root cluster 0.

A round, as the engine runs it:

1. **Selection** is unchanged (clusters are not sampled separately); the config check
   (:mod:`broker_server.cluster_config`) guarantees a round sends at most ``max_devices`` tasks.
2. **Tasks** — :meth:`ClusterRounds.prepare` gives the round an
   :class:`~broker_server.robust.UpdateBuffer` with one float32 row per task, so memory is bounded
   by ``max_devices × 4 B × aggregated parameters`` (the buffer is allocated for the round's
   tasks and refuses more; it is dropped when the round closes). Each TASK carries the weights
   of the device's cluster, encoded once per cluster per round (:meth:`ClusterRounds.payload`).
   Its ``model_version`` is the *federation* version (completed rounds), which names all the
   clusters' models at once, so the engine's acceptance checks are unchanged.
3. **Closing** (:meth:`ClusterRounds.complete`, :func:`advance`) — the accepted rows are grouped
   by their device's cluster. Per cluster, CFL's split test runs on its members' rows
   (:func:`~broker_server.strategies.clustering.check_split`: stationary mean, a large update,
   groups with cosine similarity below ``threshold``), where "large" is ``min_update_norm`` or, by
   default, half the cluster's peak update norm (:func:`broker_server.cluster_config.split_floor`:
   a converged cluster does not split on noise); a split forks the parent's model and
   strategy state for the new groups (:meth:`ClusterAssignments.split`; the largest group keeps the
   id). Then, as in CFL's Algorithm 1, every (new) cluster aggregates its own members' rows of this
   round — the weighted mean ``Σ n_i Δ_i / Σ n_i`` through its ``strategy.apply`` — so the round
   that splits already trains the parts apart. A cluster without an update this round keeps its
   model and version.
4. **Evaluation** — the evaluator (if any) runs on every changed cluster's model.
   ``RoundResult.cluster_accuracy`` holds every cluster's latest accuracy; ``test_loss`` and
   ``test_accuracy`` are the unweighted means over the clusters (a mean over *models*: with one
   shared test set it tells how good a typical cluster model is on that set; per-population test
   sets are for the caller, through :meth:`FederatedServer.cluster_weights`).
5. **Storing** — the new :class:`ClusterBook` is written as a store setting, then the round's
   model version (holding the root cluster's weights and strategy state) is committed; see
   :mod:`broker_server.cluster_models` for why in that order.

After a restart a round that was open is re-collected through the engine's refill path
(:class:`~broker_server.rounds.Refill`): the accepted updates' TASKs are sent again and agents
answer with their stored results, which refill the rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from broker_server.cluster_config import split_floor
from broker_server.cluster_models import ClusterBook, ClusterModel, setting_key
from broker_server.journal import RoundJournal
from broker_server.robust import BufferConfig, Flattener, UpdateBuffer
from broker_server.rounds import Refill, RoundState
from broker_server.server_config import RoundResult, ServerConfig
from broker_server.store import ModelStore
from broker_server.strategies import Strategy, plain_tensor_names
from broker_server.strategies.clustering import ROOT_CLUSTER, ClusterConfig, check_split
from edge_agent.protocol.binding import payload_digest
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.tensors import encode_tensors
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import EvalResult

__all__ = ["Advance", "ClusterRounds", "advance", "cluster_dirs"]

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]
Evaluator = Callable[[Tensors], EvalResult]


@dataclass(frozen=True)
class Advance:
    """One round's effect on the clusters."""

    book: ClusterBook
    #: ids of the clusters whose model changed (aggregated this round), sorted
    changed: tuple[int, ...]
    #: ``{new cluster id: parent cluster id}`` of this round's splits
    forks: dict[int, int]
    #: ``{cluster id: members who reported}`` this round
    reporters: dict[int, int]


def advance(
    book: ClusterBook,
    rows: np.ndarray,
    weights: np.ndarray,
    device_ids: Sequence[str],
    *,
    config: ClusterConfig,
    flattener: Flattener,
    round: int,
    plain: frozenset[str],
) -> Advance:
    """Split and aggregate one round (see the module docstring); ``book`` itself is not changed.

    ``rows`` (``n × d`` float32) are the round's accepted updates, ``weights`` their example
    counts. The clusters that change get new :class:`ClusterModel` objects; their strategy objects
    are stepped (a strategy is state the new book owns; on a failed commit the server stops).
    """
    assignments = type(book.assignments).from_json(book.assignments.to_json())
    models = dict(book.models)
    groups: dict[int, list[int]] = {}
    for index in sorted(range(len(device_ids)), key=lambda i: device_ids[i]):
        groups.setdefault(assignments.cluster_of(device_ids[index]), []).append(index)
    forks: dict[int, int] = {}
    peaks: dict[int, float] = {}
    for cluster_id, members in sorted(groups.items()):
        peaks[cluster_id] = peak = max(book.models[cluster_id].peak_norm, _median_norm(rows[members]))
        floor = replace(config, min_update_norm=split_floor(config.min_update_norm, peak))
        check = check_split(rows[members], weights[members], floor)
        if check.labels is None:
            log.debug("round %d: cluster %d stays whole: %s", round, cluster_id, check.reason)
            continue
        made = assignments.split(cluster_id, [device_ids[i] for i in members], check.labels.tolist())
        log.info(
            "round %d: cluster %d split into %s (mean update norm %.4g, largest %.4g)",
            round,
            cluster_id,
            ", ".join(str(c) for c in [cluster_id, *made]),
            check.mean_norm,
            check.max_norm,
        )
        for child in made:
            models[child] = replace(book.models[cluster_id].fork(child), peak_norm=peak)
        forks.update(made)
    regrouped: dict[int, list[int]] = {}
    for index in range(len(device_ids)):
        regrouped.setdefault(assignments.cluster_of(device_ids[index]), []).append(index)
    for cluster_id, members in sorted(regrouped.items()):
        model = models[cluster_id]
        w = weights[members].astype(np.float64)
        mean = (w @ rows[members].astype(np.float64)) / w.sum()
        delta = flattener.unflatten(mean.astype(np.float32))
        models[cluster_id] = ClusterModel(
            cluster_id=cluster_id,
            weights=model.strategy.apply(model.weights, delta, round=round, plain=plain),
            version=model.version + 1,
            strategy=model.strategy,
            parent=(model.cluster_id, model.version) if cluster_id not in forks else model.parent,
            round=round,
            peak_norm=peaks.get(cluster_id, model.peak_norm),
        )
    new_book = ClusterBook(assignments=assignments, models=models, federation_version=book.federation_version + 1)
    reporters = {c: len(m) for c, m in sorted(regrouped.items())}
    return Advance(book=new_book, changed=tuple(sorted(regrouped)), forks=forks, reporters=reporters)


def _median_norm(rows: np.ndarray) -> float:
    """The median L2 norm of ``rows`` (float64 sums)."""
    return float(np.median(np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))))


class ClusterRounds:
    """The round engine's clustered-FL hook (see the module docstring)."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        strategy: Strategy,
        specs: tuple[TensorSpec, ...],
        shared: tuple[TensorSpec, ...],
        plain: frozenset[str],
        journal: RoundJournal,
        bundle_digest: str,
        evaluator: Evaluator | None,
    ) -> None:
        """``strategy``: the configured strategy, fresh (every cluster gets its own copy)."""
        self.config = config
        self._template, self._flattener = strategy, Flattener.from_specs(specs)
        self._shared, self._plain = tuple(t.name for t in shared), plain
        self._journal, self._digest, self._evaluator = journal, bundle_digest, evaluator
        self.book = ClusterBook.root_only({}, strategy, federation_version=0)
        #: clusters whose model the last completed round changed (the server writes their files)
        self.last_changed: tuple[int, ...] = ()
        self._payloads: dict[int, bytes] = {}

    @classmethod
    def configured(
        cls,
        config: ServerConfig,
        bundle: Bundle,
        strategy: Strategy,
        journal: RoundJournal,
        evaluator: Evaluator | None,
    ) -> ClusterRounds | None:
        """The hook ``config.clusters`` asks for (None: clustering is off)."""
        settings = config.cluster_settings()
        if settings is None:
            return None
        manifest = bundle.manifest
        return cls(
            settings,
            strategy=strategy,
            specs=manifest.aggregated_tensors,
            shared=manifest.shared_model_tensors,
            plain=plain_tensor_names(manifest),
            journal=journal,
            bundle_digest=bundle.digest,
            evaluator=evaluator,
        )

    @property
    def root(self) -> ClusterModel:
        return self.book.root

    @property
    def memory_bytes(self) -> int:
        """The most a round's update rows take (``max_devices`` float32 rows of the model)."""
        return self.config.memory_bytes(self._flattener.size)

    # -- start -----------------------------------------------------------------------------------

    def begin(self, weights: Tensors, federation_version: int, strategy: Strategy) -> Tensors:
        """Start (or resume) the clusters at ``federation_version`` whose stored model is ``weights``;
        returns the root cluster's weights (the engine's model from now on).

        ``strategy`` is the engine's strategy (restored from the store when resuming); the root
        continues with it when the store holds no clusters (a fresh or a formerly unclustered
        federation). Stored clusters are loaded as they were.
        """
        raw = self._journal.load_setting(setting_key(federation_version))
        if raw is not None:
            self.book = ClusterBook.from_json(raw, self._template)
            log.info("resuming %d clusters at v%d", len(self.book.models), federation_version)
        else:
            if federation_version > 0:
                log.warning("the store holds no clusters for v%d: clustering starts there", federation_version)
            self.book = ClusterBook.root_only(weights, strategy, federation_version=federation_version)
        self._payloads.clear()
        log.info("clusters: a round keeps at most %.1f MB of updates", self.memory_bytes / 2**20)
        return self.book.root.weights

    # -- a round ---------------------------------------------------------------------------------

    def prepare(self, state: RoundState) -> None:
        """Give a new or restored round its update rows (a restored one refills those it had), and
        bind every task to the digest of its cluster's weights (the same digests again on resume)."""
        buffer = BufferConfig(max_bytes=BufferConfig().nbytes(max(1, len(state.tasks)), self._flattener.size))
        state.buffer = UpdateBuffer(self._flattener, rows=max(1, len(state.tasks)), config=buffer)
        if state.accepted and state.refill is None:
            state.refill = Refill.of(state.tasks, state.accepted, state.mean)
        self._payloads.clear()
        for task_id, device_id in state.tasks.items():  # a task is bound to the weights it carries
            bound = state.bindings.get(task_id)
            if bound is not None and bound.base_digest:
                state.bindings[task_id] = replace(bound, base_digest=payload_digest(self.payload(device_id)))

    def payload(self, device_id: str) -> bytes:
        """The TASK payload for ``device_id``: its cluster's shared tensors, encoded once per cluster."""
        model = self.book.model_of(device_id)
        encoded = self._payloads.get(model.cluster_id)
        if encoded is None:
            encoded = encode_tensors({name: model.weights[name] for name in self._shared})
            self._payloads[model.cluster_id] = encoded
        return encoded

    def complete(self, state: RoundState, *, make_result: Callable[..., RoundResult]) -> RoundResult:
        """Split, aggregate, evaluate and store the round; returns its result (see the module docstring).

        ``make_result(test=..., version=...)`` builds the engine's :class:`RoundResult`.
        """
        buffer = state.buffer
        if buffer is None or not len(buffer):
            raise ValueError(f"round {state.round} closed without update rows")
        step = advance(
            self.book,
            buffer.matrix,
            buffer.weights,
            buffer.device_ids,
            config=self.config,
            flattener=self._flattener,
            round=state.round,
            plain=self._plain,
        )
        accuracy = self._evaluate(step)
        result = make_result(test=_mean_eval(step.book), version=step.book.federation_version)
        result = replace(result, cluster_accuracy=accuracy)
        self._journal.save_setting(setting_key(step.book.federation_version), step.book.to_json())
        root = step.book.root
        self._journal.completed(
            state.round,
            version=step.book.federation_version,
            parent=self.book.federation_version,
            bundle_digest=self._digest,
            weights=root.weights,
            metrics={**asdict(result), "clusters": {str(c): n for c, n in step.reporters.items()}},
            strategy=root.strategy,
        )
        self.book, self.last_changed = step.book, step.changed
        self._payloads.clear()
        return result

    def _evaluate(self, step: Advance) -> dict[str, float]:
        if self._evaluator is not None:
            for cluster_id in step.changed:
                model = step.book.models[cluster_id]
                test = self._evaluator(model.weights)
                model.test_loss, model.test_accuracy = test.loss, test.accuracy
        return {str(c): m.test_accuracy for c, m in sorted(step.book.models.items()) if m.test_accuracy is not None}

    # -- views -----------------------------------------------------------------------------------

    def status(self) -> list[dict[str, object]]:
        """One entry per cluster: id, members (assigned devices), version, lineage, last accuracy."""
        book = self.book
        return [
            {
                "cluster_id": c,
                "members": len(book.members(c)),
                "version": m.version,
                "parent": {"cluster_id": m.parent[0], "version": m.parent[1]} if m.parent else None,
                "round": m.round,
                "test_accuracy": m.test_accuracy,
            }
            for c, m in sorted(book.models.items())
        ]

    def save_files(self, models_dir: Path, federation_version: int, meta: dict[str, object]) -> None:
        """Write ``models_dir/cluster-<id>/v<version>`` for the clusters the round that made
        ``federation_version`` changed (the root for version 0), lineage in meta."""
        for cluster_id in self.last_changed if federation_version else (ROOT_CLUSTER,):
            model = self.book.models[cluster_id]
            store = ModelStore(models_dir / f"cluster-{cluster_id}")
            if store.has(model.version):  # a resumed federation whose files got ahead of its store
                log.warning("%s already holds version %d; not overwritten", store.root, model.version)
                continue
            lineage = {
                "cluster": cluster_id,
                "parent": {"cluster": model.parent[0], "version": model.parent[1]} if model.parent else None,
                "federation_version": self.book.federation_version,
                "members": list(self.book.members(cluster_id)),
            }
            store.save(model.version, model.weights, {**meta, **lineage})


def cluster_dirs(models_dir: Path) -> list[str]:
    """The per-cluster model directories under ``models_dir`` (``cluster-<id>``), sorted."""
    return sorted(p.name for p in models_dir.glob("cluster-*") if p.is_dir())


def _mean_eval(book: ClusterBook) -> EvalResult | None:
    """The unweighted mean of the clusters' latest evaluations (None if none was evaluated)."""
    done = [m for m in book.models.values() if m.test_accuracy is not None and m.test_loss is not None]
    if not done:
        return None
    return EvalResult(
        num_examples=0,
        loss=float(np.mean([m.test_loss for m in done])),
        accuracy=float(np.mean([m.test_accuracy for m in done])),
    )
