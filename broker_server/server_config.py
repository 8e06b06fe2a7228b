"""The synchronous server's configuration and what it reports per round (frozen dataclasses).

:class:`ServerConfig` is parsed once (by the CLI or the caller) and validated whole in its
constructor: a bad strategy table or selection setting is a :class:`ConfigError` before anything
connects. ``rounds`` counts the rounds of the whole federation: a server resumed from its store
continues the numbering and stops after round ``rounds``. The ``robust`` and ``trust`` tables are
described in :mod:`broker_server.robust_config`; the ``privacy`` table (central DP) in
:mod:`broker_server.privacy.config`, with the settings it cannot be combined with refused here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker_server.async_config import AsyncSettings, parse_async
from broker_server.blobs import BlobsConfig, parse_blobs_config
from broker_server.cluster_config import check_clusters
from broker_server.privacy.config import CentralDPConfig
from broker_server.robust import TrustConfig
from broker_server.robust_config import RobustSettings, parse_trust
from broker_server.rollout_config import RolloutSettings, parse_rollout
from broker_server.secagg_config import SecAggSettings, check_secagg
from broker_server.selection import SelectionPolicy
from broker_server.strategies import FedAvg, FedAvgConfig, Strategy, parse_strategy
from broker_server.strategies.clustering import ClusterConfig
from broker_server.strategies.config import parse_cluster_config
from edge_agent.codecs import CodecSpec
from edge_agent.errors import ConfigError
from edge_agent.protocol.messages import MIN_CHUNK_BYTES
from edge_agent.protocol.topics import Topics

__all__ = ["Rejection", "RoundResult", "ServerConfig"]


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    rounds: int = 20
    #: updates a round wants (it completes as soon as this many arrived)
    clients_per_round: int = 10
    #: A round starts once this many eligible devices are online ...
    min_clients: int = 2
    #: ... waiting at most this long for them.
    wait_for_clients_s: float = 60.0
    #: A round is abandoned (model unchanged) with fewer updates than this by the deadline.
    min_reports: int = 1
    #: from the moment a round's TASKs are sent
    round_timeout_s: float = 60.0
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    #: η of the default strategy (FedAvg); a ``strategy`` table sets its own ``server_lr``
    server_lr: float = 1.0
    seed: int = 0
    topics: Topics = Topics()
    #: sent in every TASK: values for the bundle's graph-input hyper-parameters (e.g. class_weights);
    #: the strategy's own (e.g. FedProx's fedprox_mu) take precedence
    hyperparameters: dict[str, float | tuple[float, ...]] = field(default_factory=dict)
    #: sent in every TASK: tensors to freeze (bundles exported with trainable masks)
    frozen: tuple[str, ...] = ()
    #: update codecs devices may use, in the server's order of preference (edge_agent.codecs);
    #: each device picks from these by its network type. fp32 keeps updates exact.
    codecs: tuple[str, ...] = ("int8", "fp16", "fp32")
    #: largest CHUNK payload for transfers to and from devices (below a 1 MB broker packet limit)
    chunk_bytes: int = 256 * 1024
    #: start() announces the server's bundle as ``model_version`` on this model channel (None: not)
    model_channel: str | None = "current"
    model_version: int = 1
    #: the server strategy as a table (broker_server.strategies.parse_strategy), e.g.
    #: ``{"name": "fedadam", "server_lr": 0.01}``; {} is FedAvg with ``server_lr``
    strategy: Mapping[str, Any] = field(default_factory=dict)
    #: select ``ceil(over_selection × clients_per_round)`` devices; the round completes with the
    #: first ``clients_per_round`` updates and drops the stragglers' late ones
    over_selection: float = 1.0
    #: split each selection across device classes (STATUS capabilities ``device_class``)
    stratify: bool = False
    #: a device takes part in at most this many rounds per ``budget_window_s`` (give both or neither)
    max_rounds_per_window: int | None = None
    budget_window_s: float | None = None
    #: robust aggregation as a table, e.g. ``{"rule": "krum", "f": 2}`` or ``{"rule": "clip", "clip": 1.0}``
    #: (broker_server.robust_config); {} is plain streaming FedAvg
    robust: Mapping[str, Any] = field(default_factory=dict)
    #: tiered trust: None (off) or TrustConfig fields as a table ({} for the defaults)
    trust: Mapping[str, Any] | None = None
    #: "sync": rounds (selection, deadline, aggregate); "async": buffered asynchronous aggregation
    #: (FedBuff) with the settings of the ``asynchronous`` table
    mode: str = "sync"
    #: FedBuff settings as a table (buffer size, concurrency, staleness), used when mode is "async"
    asynchronous: Mapping[str, Any] = field(default_factory=dict)
    #: what a sync round does with its stragglers' updates: "drop" them, or "async": fold them into
    #: the next version with staleness weighting
    late_updates: str = "drop"
    #: staged rollout of announced model versions as a table (keys: broker_server.rollout_config);
    #: None: every device is offered the announced version
    rollout: Mapping[str, Any] | None = None
    #: central differential privacy as a table (keys: broker_server.privacy.config; docs/privacy.md);
    #: None: off. ``clients_per_round`` defaults to the server's and must equal it.
    privacy: Mapping[str, Any] | None = None
    #: clustered FL as a table (keys: broker_server.strategies.clustering.ClusterConfig): one model
    #: per cluster of devices, split by update similarity (broker_server.cluster_rounds); None: off
    clusters: Mapping[str, Any] | None = None
    #: secure aggregation as a table (keys: broker_server.secagg_config; docs/secagg.md): the server
    #: learns only each round's sum; None: off
    secagg: Mapping[str, Any] | None = None
    #: blob store and claim checks as a table (keys: broker_server.blobs.BlobsConfig; docs/blobs.md):
    #: updates and model archives above its threshold travel by reference; None: everything by MQTT
    blobs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.clients_per_round < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ConfigError("rounds, clients_per_round, local_epochs and batch_size must be >= 1")
        if not self.min_clients >= 1:
            raise ConfigError("min_clients must be >= 1")
        if not 1 <= self.min_reports <= self.clients_per_round:
            raise ConfigError("min_reports must be between 1 and clients_per_round")
        if self.round_timeout_s <= 0 or self.lr <= 0:
            raise ConfigError("round_timeout_s and lr must be positive")
        if not self.codecs:
            raise ConfigError("codecs must name at least one update codec (e.g. fp32)")
        for name in self.codecs:
            CodecSpec.parse(name)  # raises ConfigError naming the valid codecs
        if self.chunk_bytes < MIN_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be >= {MIN_CHUNK_BYTES}")
        if self.model_channel is not None:
            self.topics.model_channel(self.model_channel)  # raises ConfigError for a bad name
        if self.model_version < 1:
            raise ConfigError("model_version must be >= 1")
        if (self.max_rounds_per_window is None) != (self.budget_window_s is None):
            raise ConfigError("give both max_rounds_per_window and budget_window_s, or neither")
        if self.budget_window_s is not None and not (math.isfinite(self.budget_window_s) and self.budget_window_s > 0):
            raise ConfigError(f"budget_window_s must be a positive number, got {self.budget_window_s!r}")
        if self.strategy and self.server_lr != 1.0:
            raise ConfigError("server_lr applies to the default FedAvg; set server_lr in the strategy table instead")
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        if self.late_updates not in ("drop", "async"):
            raise ConfigError(f"late_updates must be 'drop' or 'async', got {self.late_updates!r}")
        self.fedbuff_settings()  # ConfigError naming the bad asynchronous key
        robust_rule = self.robust_settings()
        if robust_rule is not None and robust_rule.buffered and "async" in (self.mode, self.late_updates):
            which = "mode" if self.mode == "async" else "late_updates"
            raise ConfigError(
                f"{which}: 'async' cannot use robust rule {robust_rule.describe()} (it needs every update of a "
                "round at once); use robust = {rule = 'clip', ...} or the sync mode"
            )
        self.selection_policy()  # ConfigError for a bad over_selection or budget
        self.make_strategy()  # ConfigError naming the bad strategy key
        self.trust_config()  # ConfigError naming the bad trust key
        self.rollout_settings()  # ConfigError naming the bad rollout key
        check_clusters(self)  # ConfigError naming the bad clusters key or the combination it cannot run
        self.privacy_config()  # ConfigError naming the bad privacy key or the combination DP cannot keep
        self.secagg_settings()  # ConfigError naming the bad secagg key or what cannot see only the sum
        self.blobs_config()  # ConfigError naming the bad blobs key
        robust = self.robust_settings()  # ConfigError naming the bad robust key
        if robust is not None and robust.min_updates > self.clients_per_round:
            raise ConfigError(
                f"robust: {robust.describe()} needs at least {robust.min_updates} updates per round; "
                f"clients_per_round is {self.clients_per_round}"
            )

    def selection_policy(self) -> SelectionPolicy:
        return SelectionPolicy(
            k=self.clients_per_round,
            over_selection=self.over_selection,
            stratify=self.stratify,
            max_rounds_per_window=self.max_rounds_per_window,
        )

    def make_strategy(self) -> Strategy:
        """A fresh strategy as configured (``strategy`` table, or FedAvg with ``server_lr``)."""
        if not self.strategy:
            return FedAvg(FedAvgConfig(server_lr=self.server_lr))
        return parse_strategy(self.strategy)

    def robust_settings(self) -> RobustSettings | None:
        """The parsed ``robust`` table (None: plain streaming FedAvg)."""
        return RobustSettings.parse(self.robust)

    def fedbuff_settings(self) -> AsyncSettings:
        """The parsed ``asynchronous`` table (broker_server.async_config; defaults from ``rounds``
        and ``round_timeout_s``)."""
        return parse_async(self.asynchronous, rounds=self.rounds, round_timeout_s=self.round_timeout_s)

    def rollout_settings(self) -> RolloutSettings | None:
        """The parsed ``rollout`` table (None: no staged rollouts)."""
        return parse_rollout(self.rollout)

    def privacy_config(self) -> CentralDPConfig | None:
        """The parsed ``privacy`` table (None: central DP off); refuses what would void the guarantee."""
        if self.privacy is None:
            return None
        if not isinstance(self.privacy, Mapping):
            raise ConfigError(f"privacy must be a table, got {self.privacy!r}")
        table = dict(self.privacy)
        table.setdefault("clients_per_round", self.clients_per_round)
        config = CentralDPConfig.parse(table)
        for key, why in _dp_conflicts(self):
            raise ConfigError(f"{key}: {why} cannot be combined with central DP (privacy table); docs/privacy.md")
        if config.clients_per_round != self.clients_per_round:
            raise ConfigError(
                f"privacy.clients_per_round ({config.clients_per_round}) must equal clients_per_round "
                f"({self.clients_per_round}): it is both the tasks a round sends and the mean's fixed denominator"
            )
        return config

    def blobs_config(self) -> BlobsConfig | None:
        """The parsed ``blobs`` table (None: no blob store, no claim checks)."""
        if self.blobs is None:
            return None
        if not isinstance(self.blobs, Mapping):
            raise ConfigError(f"blobs must be a table, got {self.blobs!r}")
        return parse_blobs_config(self.blobs)

    def secagg_settings(self) -> SecAggSettings | None:
        """The parsed ``secagg`` table (None: off); refuses what needs single updates."""
        return check_secagg(self)

    def cluster_settings(self) -> ClusterConfig | None:
        """The parsed ``clusters`` table (None: clustered FL off)."""
        return parse_cluster_config(self.clusters)

    def trust_config(self) -> TrustConfig | None:
        """The parsed ``trust`` table (None: tiered trust off)."""
        return parse_trust(self.trust)


def _dp_conflicts(config: ServerConfig) -> list[tuple[str, str]]:
    """The settings that break central DP's assumptions (each device: one update, weight 1, clipped)."""
    found = []
    if config.mode != "sync":
        found.append(("mode", "'async' (FedBuff: no per-round sampling for the accountant)"))
    if config.late_updates != "drop":
        found.append(("late_updates", "'async' (a straggler's update would join a later round unclipped)"))
    if config.robust:
        found.append(("robust", "a robust rule (its own weighting and buffering)"))
    if config.trust is not None:
        found.append(("trust", "tiered trust (per-device weights past the clip norm)"))
    if config.over_selection != 1.0:
        found.append(("over_selection", "over-selection (the round must send exactly clients_per_round tasks)"))
    return found


@dataclass(frozen=True)
class Rejection:
    device_id: str
    code: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    round: int
    model_version: int
    selected: int
    reported: int
    failed: int
    num_examples: int
    duration_s: float
    completed: bool
    reason: str = ""
    train_metrics: dict[str, float] = field(default_factory=dict)
    test_loss: float | None = None
    test_accuracy: float | None = None
    #: seconds from the round's collected updates to the next model (robust rule or mean, strategy
    #: step), None when the round made no model (the streaming fold itself happens as updates arrive)
    aggregation_s: float | None = None
    #: clustered FL: cluster id (as text) -> test accuracy of that cluster's model after the round;
    #: ``test_loss``/``test_accuracy`` are then the unweighted means over the clusters
    cluster_accuracy: dict[str, float] = field(default_factory=dict)
