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

**CFL's ε2 by default** (:func:`split_floor`). A cluster splits when its FedAvg is stationary (ε1,
``stationarity``) while some member update is still large: ``max_i ‖Δ_i‖ > ε2``. With ε2 = 0 a
converged cluster of *one* distribution keeps splitting on noise: its members' updates (SGD noise,
client drift) are small but never zero, their mean is smaller still (stationary), and their
directions are random, so the cosine test always finds two "groups". What tells a real conflict
apart is scale: at the stationary point of a mixture of conflicting distributions every member
still pulls toward its own optimum, with updates about as large as when training started, while
a converged cluster's updates shrink to their noise floor. An absolute ε2 has to be tuned per
model (``min_update_norm``, as in the paper); the default is relative and fits every scale:
``min_update_norm = 0`` means ε2 = :data:`SPLIT_NORM_RATIO` (0.5) × the cluster's *peak norm*,
the largest per-round median member-update norm the cluster and its ancestors have seen
(:attr:`~broker_server.cluster_models.ClusterModel.peak_norm`; a median, so one outlying device
does not set the scale; over the lineage, so a split-off part is compared with the scale its
training started at).

Measured on the digits MLP of ``tests/broker_server/test_clusters_digits.py`` (8 devices, 2 local
epochs): the label-shifted root splits at ``max ‖Δ_i‖ / peak = 1.02``, while every split ε2 = 0
made on noise — each label group refined once it converged, and the root of a run without label
shift (near-IID, 20 rounds) — came at ratios of 0.39 or less; 0.5 leaves a margin on both sides.
A model whose updates are already at their noise floor when clustering starts (a pre-trained
model, clustering switched on late) has no large peak to compare with: give it an absolute
``min_update_norm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_agent.errors import ConfigError

if TYPE_CHECKING:
    from broker_server.server_config import ServerConfig

__all__ = ["SPLIT_NORM_RATIO", "check_clusters", "split_floor"]

#: ε2 relative to the cluster's peak norm when ``min_update_norm`` is 0 (see the module docstring)
SPLIT_NORM_RATIO = 0.5


def split_floor(min_update_norm: float, peak_norm: float) -> float:
    """CFL's ε2 for one cluster: ``min_update_norm`` when set (> 0), else ``SPLIT_NORM_RATIO × peak_norm``."""
    return min_update_norm if min_update_norm > 0 else SPLIT_NORM_RATIO * peak_norm


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
