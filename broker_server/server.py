"""The federated server: one object wiring the transport, the rounds (or FedBuff) and the store.

:class:`FederatedServer` connects the pieces, each in its own module:

* :mod:`broker_server.server_config` — :class:`ServerConfig`, :class:`RoundResult`, :class:`Rejection`;
* :mod:`broker_server.dispatch` — inbound messages (STATUS, FETCH, UPDATE/ERROR, chunks), with
  bad messages logged and counted in :attr:`FederatedServer.rejections`, never fatal;
* :mod:`broker_server.round_engine` — selection, TASKs, the collect loop and the strategy step;
  stragglers' late updates dropped or (``late_updates="async"``) kept for the next round
  (:mod:`broker_server.late_updates`);
* :mod:`broker_server.async_engine` — ``mode="async"``: buffered asynchronous aggregation
  (FedBuff) instead of rounds, every buffer a new version (``asynchronous`` table,
  :mod:`broker_server.async_config`);
* :mod:`broker_server.cluster_rounds` — clustered FL (``config.clusters``): one model per cluster
  of devices, split by update similarity;
* :mod:`broker_server.safeguards` — robust aggregation (``config.robust``) and tiered trust
  (``config.trust``): quarantines, trust weights, and :attr:`FederatedServer.trust_events`;
* :mod:`broker_server.journal` — the optional :class:`~broker_server.persistence.ServerStore`:
  every accepted update committed, and a restarted server resuming where it stopped;
* :mod:`broker_server.models` — model bundles announced and served to devices that FETCH them
  whenever the server pumps messages (in rounds, while waiting for devices, or in :meth:`serve`);
* :mod:`broker_server.blob_service` — ``config.blobs``: large updates and archives by claim check.

All traffic goes through one :class:`Transport`; clocks and randomness are injected. The
file-based ``out_dir`` (every version as files, ``metrics.jsonl``) is for people and plots; the
server store is what a restart resumes from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from broker_server.blob_service import ServerBlobs
from broker_server.cluster_models import ClusterBook
from broker_server.cluster_rounds import ClusterRounds, cluster_dirs
from broker_server.events import ServerEvents
from broker_server.journal import OpenRound, RoundJournal
from broker_server.models import ModelPublisher
from broker_server.participation import RoundSelector
from broker_server.persistence import ServerStore
from broker_server.privacy_wiring import CentralPrivacy
from broker_server.registry import DeviceRegistry
from broker_server.robust import Reputation, TrustDecision
from broker_server.rollout import RolloutState
from broker_server.round_engine import Evaluator, RoundEngine
from broker_server.safeguards import PRIVACY_SETTING, TRUST_SETTING, RobustRound, Safeguards
from broker_server.secagg_async import AsyncEngine, async_engine_class, secagg_handler
from broker_server.secagg_dispatch import SecAggDispatcher
from broker_server.secagg_round import secagg_rounds
from broker_server.server_config import Rejection, RoundResult, ServerConfig
from broker_server.store import ModelStore
from broker_server.strategies import Strategy, TaskSettings, check_task_settings
from edge_agent.errors import ConfigError
from edge_agent.protocol.messages import ModelMessage
from edge_agent.protocol.topics import RESULTS, STATUS
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import EvalResult
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import InboundMessage, Transport

__all__ = ["Evaluator", "FederatedServer", "Rejection", "RoundResult", "ServerConfig"]

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]


class FederatedServer:
    def __init__(
        self,
        transport: Transport,
        bundle: Bundle,
        config: ServerConfig,
        *,
        out_dir: str | Path | None = None,
        evaluator: Evaluator | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        publisher: ModelPublisher | None = None,
        strategy: Strategy | None = None,
        store: ServerStore | None = None,
        privacy_rng: np.random.Generator | None = None,
        events: ServerEvents | None = None,
    ) -> None:
        """``publisher`` announces and serves model bundles (default: one for ``config.topics``).

        ``strategy`` replaces the one ``config.strategy`` describes (give one or the other).
        ``store`` makes the federation durable and resumable; the caller opens and closes it.
        ``wall_clock`` stamps what outlives the process (round deadlines, participation budgets).
        ``privacy_rng`` draws central DP's noise (default: seeded from the OS's CSPRNG).
        ``events`` hears every counted update and every rejected message (e.g. ServerMetrics).
        """
        if strategy is not None and config.strategy:
            raise ConfigError("give the strategy either as FederatedServer(strategy=...) or in config.strategy")
        self.config, self.bundle = config, bundle
        self.registry = DeviceRegistry()
        self.results: list[RoundResult] = []
        self.strategy = strategy if strategy is not None else config.make_strategy()
        self.publisher = (
            publisher
            if publisher is not None
            else ModelPublisher(
                config.topics,
                max_chunk_bytes=config.chunk_bytes,
                rollout=config.rollout_settings(),
                store=store,
                clock=wall_clock,
            )
        )
        #: The evaluation of version 0, when an evaluator is given (not on a resumed federation).
        self.baseline: EvalResult | None = None
        self._transport, self._evaluator, self._clock = transport, evaluator, clock
        self._out = Path(out_dir) if out_dir is not None else None
        self._models = ModelStore(self._out / "models") if self._out is not None else None
        self._journal = RoundJournal(store, wall_clock=wall_clock)
        link, rng = TransferLink(transport, clock=clock), rng or random.Random(config.seed)
        self._selector = RoundSelector(config.selection_policy(), window_s=config.budget_window_s, rng=rng)
        dp, specs = config.privacy_config(), bundle.manifest.aggregated_tensors
        privacy = CentralPrivacy(dp, specs, rng=privacy_rng) if dp is not None else None
        self._clusters = ClusterRounds.configured(config, bundle, self.strategy, self._journal, evaluator)
        self._safeguards = Safeguards(config.robust_settings(), config.trust_config(), specs, privacy=privacy)
        self._engine = RoundEngine(
            config,
            bundle,
            transport=transport,
            link=link,
            registry=self.registry,
            strategy=self.strategy,
            journal=self._journal,
            selector=self._selector,
            safeguards=self._safeguards,
            pump=self._pump,
            evaluator=evaluator,
            clock=clock,
            wall_clock=wall_clock,
            clusters=self._clusters,
            secagg=secagg_rounds(config, specs, transport, self.registry, self._journal, self._pump, clock),
        )
        #: the FedBuff engine (``mode="async"``; None in sync mode)
        self.asynchronous: AsyncEngine | None = None
        if config.mode == "async":
            async_policy = dataclasses.replace(config.selection_policy(), k=config.fedbuff_settings().concurrency)
            self.asynchronous = async_engine_class(config)(
                config.fedbuff_settings(),
                self._engine,
                transport=transport,
                link=link,
                registry=self.registry,
                journal=self._journal,
                selector=RoundSelector(async_policy, window_s=config.budget_window_s, rng=rng),
                pump=self._pump,
                evaluator=evaluator,
                clock=clock,
                wall_clock=wall_clock,
            )
        self._dispatcher = SecAggDispatcher(
            transport,
            config.topics,
            link=link,
            registry=self.registry,
            publisher=self.publisher,
            on_result=self.asynchronous.on_result if self.asynchronous is not None else self._engine.on_result,
            clock=clock,
            events=events,
            on_secagg=secagg_handler(self._engine, self.asynchronous),
        )
        self.blobs = ServerBlobs.attach(config.blobs_config(), self._engine, self._dispatcher)  # claim checks
        self._next_round = 1
        self._resumable: OpenRound | None = None

    # -- state -----------------------------------------------------------------------------------

    @property
    def weights(self) -> Tensors:
        return self._engine.weights

    @property
    def model_version(self) -> int:
        return self._engine.model_version

    @property
    def clusters(self) -> ClusterBook | None:
        """Clustered FL's assignments and per-cluster models (None unless ``config.clusters`` is set)."""
        return self._clusters.book if self._clusters is not None else None

    def cluster_status(self) -> list[dict[str, object]] | None:
        """Per cluster: id, members, version, lineage, accuracy (``build_status(clusters=...)``); None when off."""
        return self._clusters.status() if self._clusters is not None else None

    @property
    def rejections(self) -> deque[Rejection]:
        return self._dispatcher.rejections

    @property
    def trust_events(self) -> deque[TrustDecision]:
        """Every tiered-trust decision (outlier, quarantine, extend, release), newest last."""
        return self._safeguards.events

    @property
    def reputation(self) -> Reputation | None:
        """The devices' trust (None unless ``config.trust`` is set)."""
        return self._safeguards.reputation

    @property
    def robust_round(self) -> RobustRound | None:
        """What the robust rule did in the last completed round (None without a rule)."""
        return self._safeguards.last_round

    @property
    def privacy(self) -> dict[str, Any] | None:
        """Central DP's status (ε spent and budget, noise, clip norm); None when DP is off."""
        return self._safeguards.privacy.view() if self._safeguards.privacy is not None else None

    @property
    def stopped(self) -> str:
        """Why the federation ended before ``config.rounds`` (the privacy budget), else ""."""
        return self._safeguards.stopped

    @property
    def late_updates(self) -> int:
        """Updates dropped because their round had already closed."""
        return self._engine.late_updates

    @property
    def late_folded(self) -> int:
        """Late updates kept for the next round's aggregate (``late_updates="async"``)."""
        return self._engine.late.accepted if self._engine.late is not None else 0

    @property
    def next_round(self) -> int:
        """The number :meth:`run` gives the next new round (after the stored ones when resumed)."""
        return self._next_round

    @property
    def resumable_round(self) -> int | None:
        """The stored round :meth:`run` continues first, if start() found one."""
        return self._resumable.state.round if self._resumable is not None else None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, weights: Tensors | None = None) -> None:
        """Store version 0 (the bundle's initial weights by default), or resume the store's
        federation; then connect and subscribe. Configuration errors surface before connecting."""
        resuming = self._journal.holds_versions()
        if resuming and weights is not None:
            raise ConfigError("the server store already holds a federation; start() resumes it and takes no weights")
        held = [*self._models.versions(), *cluster_dirs(self._models.root)] if self._models else []
        if self._models is not None and held and not resuming:
            raise ConfigError(
                f"{self._models.root} already holds model versions {held[-3:]}...; "
                "use a new output directory (or resume with the server store the federation ran with)"
            )
        first = self._engine.plan(1, wanted=self.config.clients_per_round)
        check_task_settings(TaskSettings(hyperparameters=first.hyperparameters), self.bundle.manifest)
        self._safeguards.check()
        initial = weights if weights is not None else self.bundle.initial_weights()
        resumption = self._journal.begin(self.bundle, initial, self.strategy)
        if resumption is None:
            self._engine.weights = initial
        else:
            self._engine.weights, self._engine.model_version = resumption.weights, resumption.model_version
            self._next_round, self._resumable = resumption.next_round, resumption.open_round
            self._selector.load_json(self._journal.load_setting(RoundSelector.SETTING))
            self._safeguards.load_state(self._journal.load_setting(TRUST_SETTING))
            self._safeguards.load_privacy(self._journal.load_setting(PRIVACY_SETTING))
        if self._clusters is not None:  # the stored clusters of this version, or the root alone
            self._engine.weights = self._clusters.begin(self._engine.weights, self._engine.model_version, self.strategy)
        if self._engine.late is not None:
            self._engine.late.resume(self._engine.model_version)
        if self.asynchronous is not None:  # FedBuff continues its buffer; the open round is its record
            self.asynchronous.begin(self._resumable, next_round=self._next_round)
            self._resumable = None
        topics = self.config.topics
        self.blobs.start()  # the local blob store's HTTP endpoint, if any
        self._transport.start()
        self._transport.subscribe(topics.all_devices(STATUS), qos=1)
        self._transport.subscribe(topics.all_devices(RESULTS), qos=1)
        channel = self.config.model_channel
        if channel is not None and self.publisher.announced(channel) is None:
            self.publisher.announce(self._transport, channel, self.config.model_version, self.bundle.directory)
        if resumption is None:
            if self._evaluator is not None:
                self.baseline = self._evaluator(self.weights)
            self._save_version(0, {"parent": None, "bundle_digest": self.bundle.digest})

    def close(self) -> None:
        """Disconnect (the server store, if any, stays open: its owner closes it)."""
        self._transport.close()
        self.blobs.close()

    def announce_model(self, version: int, bundle_dir: str | Path, *, channel: str = "current") -> ModelMessage:
        """Publish bundle ``bundle_dir`` as ``version`` on ``channel`` (retained); devices FETCH it."""
        return self.publisher.announce(self._transport, channel, version, bundle_dir)

    def start_rollout(self, version: int, bundle_dir: str | Path, *, rollout_id: str = "") -> RolloutState:
        """Roll bundle ``bundle_dir`` out as ``version`` in the stages of ``config.rollout``
        (canary first; halted or rolled back automatically, see broker_server.rollout_control)."""
        return self.publisher.start_rollout(self._transport, version, bundle_dir, rollout_id=rollout_id)

    def serve(self, duration_s: float) -> None:
        """Handle inbound messages and transfers (e.g. model downloads) for ``duration_s`` seconds."""
        deadline = self._clock() + duration_s
        while (left := deadline - self._clock()) > 0:
            self._pump(min(0.25, left))

    # -- rounds ----------------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
        """Finish the resumed round (if any), then run rounds up to ``config.rounds``.

        In async mode: run FedBuff until ``asynchronous.versions`` versions exist; each version is
        reported as a :class:`RoundResult` whose ``round`` is its buffer's number.
        """
        if self.asynchronous is not None:
            self.wait_for_devices(self.config.min_clients, self.config.wait_for_clients_s)

            def report(result: RoundResult) -> None:
                self._finish(result)
                if on_round is not None:
                    on_round(result)

            self.asynchronous.run(report)
            return self.results
        if self._resumable is not None:
            opened, self._resumable = self._resumable, None
            result = self._finish(self._engine.resume(opened))
            if on_round is not None:
                on_round(result)
        while self._next_round <= self.config.rounds and not self._safeguards.stopped:
            result = self.run_round(self._next_round)
            if on_round is not None:
                on_round(result)
        return self.results

    def run_round(self, number: int) -> RoundResult:
        started = self._clock()
        if not self._safeguards.stop_reason():  # a spent privacy budget ends the federation at once
            self.wait_for_devices(self.config.min_clients, self.config.wait_for_clients_s)
        self._next_round = max(self._next_round, number + 1)
        return self._finish(self._engine.run_round(number, started=started))

    def wait_for_devices(self, count: int, timeout_s: float) -> list[str]:
        """Process inbound messages until ``count`` eligible devices are online or time runs out."""
        deadline = self._clock() + timeout_s
        while len(eligible := self.registry.eligible(self.bundle.digest)) < count and self._clock() < deadline:
            self._pump(min(0.25, max(deadline - self._clock(), 0.0)))
        return eligible

    def handle(self, inbound: InboundMessage) -> None:
        """Dispatch one inbound message; anything unacceptable is logged and counted, never raised."""
        self._dispatcher.handle(inbound)

    def _pump(self, timeout: float) -> None:
        self._dispatcher.pump(timeout)

    def _finish(self, result: RoundResult) -> RoundResult:
        self.results.append(result)
        if result.completed:
            log.info(
                "round %d: v%d from %d/%d updates (%d examples), test accuracy %s, %.1fs",
                result.round,
                result.model_version,
                result.reported,
                result.selected,
                result.num_examples,
                "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}",
                result.duration_s,
            )
            meta = {"parent": result.model_version - 1, "round": result.round, "metrics": asdict(result)}
            self._save_version(result.model_version, meta)
        else:
            log.warning("round %d abandoned: %s", result.round, result.reason)
        if self._out is not None:
            self._out.mkdir(parents=True, exist_ok=True)
            with open(self._out / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(result)) + "\n")
        return result

    def _save_version(self, version: int, meta: dict[str, object]) -> None:
        if self._models is None:
            return
        if self._clusters is not None:  # models/cluster-<id>/v<cluster version>, lineage in meta
            return self._clusters.save_files(self._models.root, version, meta)
        if self._models.has(version):  # a resumed federation whose files got ahead of its store
            log.warning("%s already holds model version %d; not overwritten", self._models.root, version)
            return
        self._models.save(version, self.weights, meta)
