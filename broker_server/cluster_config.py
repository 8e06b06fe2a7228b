"""Which server settings clustered FL (``ServerConfig.clusters``) runs with, checked once at start-up.

Clustering keeps one model per cluster and aggregates each cluster from its members' decoded
updates (:mod:`broker_server.cluster_rounds`). What assumes one global model is refused with a
:class:`ConfigError` naming the key and why:

* ``mode = "async"`` — FedBuff folds every update into the one current version;
* ``late_updates = "async"`` — a straggler's update would be folded into a later round's model,
  and that round has no per-cluster late buffer;
* ``robust`` — the rules run over one round-wide buffer; a cluster averages its members plainly;
* ``trust`` — tiered trust scores every update against the one global aggregate;
* ``privacy`` — central DP's noise and accountant are calibrated to one mean per round.

A round sends at most ``ceil(clients_per_round × over_selection)`` tasks, and every accepted
update is kept decoded until the round closes, so that count must not exceed
``clusters.max_devices`` (memory: ``ClusterConfig.memory_bytes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_agent.errors import ConfigError

if TYPE_CHECKING:
    from broker_server.server_config import ServerConfig

__all__ = ["check_clusters"]


def _conflicts(config: ServerConfig) -> list[tuple[str, str]]:
    found = []
    if config.mode == "async":
        found.append(("mode", "async mode (FedBuff) keeps one model"))
    if config.late_updates == "async":
        found.append(("late_updates", "a straggler's update would join a later round of another model"))
    if config.robust:
        found.append(("robust", "each cluster averages its members' updates plainly"))
    if config.trust is not None:
        found.append(("trust", "tiered trust measures updates against one global aggregate"))
    if getattr(config, "privacy", None) is not None:
        found.append(("privacy", "central DP is calibrated to one mean per round"))
    return found


def check_clusters(config: ServerConfig) -> None:
    """Raise :class:`ConfigError` for a bad ``clusters`` table or a setting it cannot run with."""
    clusters = config.cluster_settings()  # ConfigError naming the bad clusters key
    if clusters is None:
        return
    for key, why in _conflicts(config):
        raise ConfigError(f"clusters: cannot be combined with {key} = {getattr(config, key)!r} ({why})")
    tasks = config.selection_policy().target(config.clients_per_round * 10**6)
    if tasks > clusters.max_devices:
        raise ConfigError(
            f"clusters.max_devices = {clusters.max_devices} is below the {tasks} tasks a round sends "
            "(clients_per_round x over_selection); raise max_devices or select fewer devices"
        )
