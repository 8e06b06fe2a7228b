"""Server strategies: how a round's TASKs are configured and how its mean delta becomes a model.

* :class:`Strategy` — the protocol (``configure_task``, ``apply``, ``state``/``load_state``);
  :mod:`.base` documents the contract, memory and why buffers are averaged plainly.
* :class:`FedAvg`, :class:`FedProx`, :class:`FedAvgM` (:mod:`.fedavg`) and :class:`FedAdagrad`,
  :class:`FedAdam`, :class:`FedYogi` (:mod:`.adaptive`), each configured by a frozen dataclass.
* :func:`make_strategy` / :func:`parse_strategy` — from a name and keywords or a config table.
* :func:`cluster_updates`, :class:`ClusterAssignments` (:mod:`.clustering`) — clustered FL.

Everything here is pure numpy: no I/O, no clocks, no transport.
"""

from broker_server.strategies.adaptive import AdagradConfig, AdamConfig, FedAdagrad, FedAdam, FedYogi
from broker_server.strategies.base import (
    FedAvgConfig,
    Strategy,
    StrategyState,
    TaskSettings,
    check_task_settings,
    plain_tensor_names,
)
from broker_server.strategies.clustering import (
    ROOT_CLUSTER,
    ClusterAssignments,
    ClusterConfig,
    cluster_updates,
    cosine_similarity,
)
from broker_server.strategies.config import STRATEGIES, make_strategy, parse_cluster_config, parse_strategy
from broker_server.strategies.fedavg import FEDPROX_MU, FedAvg, FedAvgM, FedAvgMConfig, FedProx, FedProxConfig

__all__ = [
    "FEDPROX_MU",
    "ROOT_CLUSTER",
    "STRATEGIES",
    "AdagradConfig",
    "AdamConfig",
    "ClusterAssignments",
    "ClusterConfig",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgConfig",
    "FedAvgM",
    "FedAvgMConfig",
    "FedProx",
    "FedProxConfig",
    "FedYogi",
    "Strategy",
    "StrategyState",
    "TaskSettings",
    "check_task_settings",
    "cluster_updates",
    "cosine_similarity",
    "make_strategy",
    "parse_cluster_config",
    "parse_strategy",
    "plain_tensor_names",
]
