"""What the federated server counts, in Prometheus names (:class:`ServerMetrics`).

The server calls one method per event, from any thread; :meth:`ServerMetrics.render` is what
``GET /metrics`` returns. Metric names (all prefixed ``fedflock_``):

==========================================  =========  ==================================================
``rounds_total{outcome}``                   counter    rounds finished, ``completed`` or ``abandoned``
``devices_online`` / ``devices_known``      gauge      devices whose retained STATUS says online / all
``updates_accepted_total{codec}``           counter    updates folded into a round, by update codec
``update_bytes_accepted_total{codec}``      counter    payload bytes of those updates (codec efficiency)
``updates_rejected_total{reason}``          counter    messages rejected, by stable error code
``bytes_received_total``                    counter    payload bytes of every inbound message
``bytes_sent_total``                        counter    payload bytes of every published message
``aggregation_seconds``                     histogram  time to turn a round's mean update into a model
``round_duration_seconds``                  histogram  a round's duration (completed or abandoned)
``model_version``                           gauge      the version of the server's current model
``round_test_accuracy``                     gauge      the last completed round's test accuracy
``trust_decisions_total{action}``           counter    tiered-trust decisions: outlier, quarantine, extend,
                                                       release
``devices_quarantined``                     gauge      devices tiered trust holds in quarantine
``robust_updates_total{effect}``            counter    updates a robust rule left out of the aggregate
                                                       (``excluded``: not among Krum's picks) or scaled
                                                       down (``clipped``: norm clipping)
``dp_epsilon_spent``                        gauge      central DP: ε the accountant has charged so far
``dp_epsilon_budget``                       gauge      central DP: the ε budget (training stops before it)
==========================================  =========  ==================================================

The two DP gauges appear once :meth:`ServerMetrics.privacy_observed` was called (central DP on).

Tiered trust and the robust rules are fed once per finished round from the server's state
(:meth:`ServerMetrics.trust_observed`, :meth:`ServerMetrics.robust_observed`); both count only
rounds newer than the last one counted, so passing the whole (bounded) event history each time
counts every decision once. Results refused from quarantined devices are
``updates_rejected_total{reason="quarantined"}``.

Label values a peer could choose (the reason, the codec) are checked against a conservative
pattern and counted as ``other`` otherwise, so a misbehaving device cannot create unbounded
series. Bytes in and out are counted at the transport boundary
(:class:`~broker_server.ops.metered.MeteredTransport`), so chunked transfers, STATUS and FETCH
traffic are included and nothing is counted twice.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Protocol

from broker_server.ops.prometheus import Counter, Gauge, Histogram, MetricFamily, render

__all__ = [
    "AGGREGATION_BUCKETS",
    "ROUND_BUCKETS",
    "TRUST_ACTIONS",
    "RobustOutcome",
    "RoundOutcome",
    "ServerMetrics",
    "TrustEvent",
]

#: seconds; aggregation of small edge models takes milliseconds, large ones seconds
AGGREGATION_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: seconds; rounds wait for devices to train, from seconds to an hour
ROUND_BUCKETS: tuple[float, ...] = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

#: a label value taken from the wire: an error code or a codec name
_SAFE_LABEL = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")
OTHER = "other"


class RoundOutcome(Protocol):
    """What :meth:`ServerMetrics.round_finished` reads (:class:`~broker_server.server_config.RoundResult`)."""

    @property
    def completed(self) -> bool: ...
    @property
    def model_version(self) -> int: ...
    @property
    def duration_s(self) -> float: ...
    @property
    def test_accuracy(self) -> float | None: ...


#: the actions of :class:`~broker_server.robust.TrustDecision`
TRUST_ACTIONS: tuple[str, ...] = ("outlier", "quarantine", "extend", "release")
ROBUST_EFFECTS: tuple[str, ...] = ("excluded", "clipped")


class TrustEvent(Protocol):
    """What :meth:`ServerMetrics.trust_observed` reads of a :class:`~broker_server.robust.TrustDecision`."""

    @property
    def round(self) -> int: ...
    @property
    def action(self) -> str: ...


class RobustOutcome(Protocol):
    """What :meth:`ServerMetrics.robust_observed` reads (:class:`~broker_server.safeguards.RobustRound`)."""

    @property
    def round(self) -> int: ...
    @property
    def excluded(self) -> int: ...
    @property
    def clipped(self) -> int: ...


def _label(value: str) -> str:
    return value if _SAFE_LABEL.match(value) else OTHER


class ServerMetrics:
    """The federated server's Prometheus metrics; every method is thread-safe and cheap."""

    def __init__(
        self,
        *,
        aggregation_buckets: Sequence[float] = AGGREGATION_BUCKETS,
        round_buckets: Sequence[float] = ROUND_BUCKETS,
    ) -> None:
        self._rounds = Counter("fedflock_rounds_total", "Rounds finished, by outcome.", ["outcome"])
        for outcome in ("completed", "abandoned"):
            self._rounds.declare(outcome=outcome)
        self._online = Gauge("fedflock_devices_online", "Devices whose retained STATUS says they are online.")
        self._known = Gauge("fedflock_devices_known", "Devices the server has seen a STATUS from.")
        self._accepted = Counter(
            "fedflock_updates_accepted_total", "Updates folded into a round, by update codec.", ["codec"]
        )
        self._accepted_bytes = Counter(
            "fedflock_update_bytes_accepted_total", "Payload bytes of the accepted updates, by codec.", ["codec"]
        )
        self._rejected = Counter(
            "fedflock_updates_rejected_total", "Messages rejected, by stable error code.", ["reason"]
        )
        self._bytes_in = Counter("fedflock_bytes_received_total", "Payload bytes of every inbound message.")
        self._bytes_out = Counter("fedflock_bytes_sent_total", "Payload bytes of every published message.")
        self._aggregation = Histogram(
            "fedflock_aggregation_seconds",
            "Seconds to turn a round's mean update into the next model.",
            aggregation_buckets,
        )
        self._round_duration = Histogram(
            "fedflock_round_duration_seconds", "Duration of finished rounds (completed or abandoned).", round_buckets
        )
        self._model_version = Gauge("fedflock_model_version", "Version of the server's current model.")
        self._accuracy = Gauge(
            "fedflock_round_test_accuracy", "Test accuracy of the model the last completed round produced."
        )
        self._trust = Counter("fedflock_trust_decisions_total", "Tiered-trust decisions, by action.", ["action"])
        for action in TRUST_ACTIONS:
            self._trust.declare(action=action)
        self._quarantined = Gauge("fedflock_devices_quarantined", "Devices tiered trust holds in quarantine.")
        self._robust = Counter(
            "fedflock_robust_updates_total",
            "Updates a robust rule left out of the aggregate (excluded) or scaled down (clipped).",
            ["effect"],
        )
        for effect in ROBUST_EFFECTS:
            self._robust.declare(effect=effect)
        self._dp_spent = Gauge("fedflock_dp_epsilon_spent", "Central DP: epsilon spent so far (at the budget's delta).")
        self._dp_budget = Gauge("fedflock_dp_epsilon_budget", "Central DP: the epsilon budget.")
        self._dp_on = False
        #: the newest round whose trust decisions / robust outcome were counted
        self._trust_round = 0
        self._robust_round = 0
        self._observed = threading.Lock()
        self._families: tuple[MetricFamily, ...] = (
            self._rounds,
            self._online,
            self._known,
            self._accepted,
            self._accepted_bytes,
            self._rejected,
            self._bytes_in,
            self._bytes_out,
            self._aggregation,
            self._round_duration,
            self._model_version,
            self._accuracy,
            self._trust,
            self._quarantined,
            self._robust,
        )

    def render(self) -> str:
        """The text exposition format 0.0.4 (:data:`~broker_server.ops.prometheus.CONTENT_TYPE`)."""
        families = self._families + ((self._dp_spent, self._dp_budget) if self._dp_on else ())
        return render(families)

    # -- events the server reports ---------------------------------------------------------------

    def round_finished(self, result: RoundOutcome) -> None:
        """A round closed: count its outcome, time it, and (if completed) record the new model."""
        self._rounds.inc(outcome="completed" if result.completed else "abandoned")
        if math.isfinite(result.duration_s) and result.duration_s >= 0:
            self._round_duration.observe(result.duration_s)
        if result.completed:
            self._model_version.set(result.model_version)
            accuracy = result.test_accuracy
            if accuracy is not None and math.isfinite(accuracy):
                self._accuracy.set(accuracy)

    def update_accepted(self, codec: str, nbytes: int) -> None:
        """An update of ``nbytes`` payload bytes in ``codec`` was folded into a round."""
        label = _label(codec)
        self._accepted.inc(codec=label)
        self._accepted_bytes.inc(nbytes, codec=label)

    def message_rejected(self, reason: str) -> None:
        """A message was rejected; ``reason`` is a stable code (``FedflockError.code``), not prose."""
        self._rejected.inc(reason=_label(reason))

    def bytes_received(self, nbytes: int) -> None:
        """An inbound message carried ``nbytes`` payload bytes."""
        self._bytes_in.inc(nbytes)

    def bytes_sent(self, nbytes: int) -> None:
        """``nbytes`` payload bytes were published."""
        self._bytes_out.inc(nbytes)

    def devices(self, online: int, known: int) -> None:
        """How many devices are online and how many the registry knows."""
        self._online.set(online)
        self._known.set(known)

    def aggregation_took(self, seconds: float) -> None:
        """Aggregating a round (``strategy.apply`` on the mean update) took ``seconds``."""
        self._aggregation.observe(seconds)

    def set_model_version(self, version: int) -> None:
        """The server's current model (at start, and on a resumed federation)."""
        self._model_version.set(version)

    def trust_observed(self, events: Iterable[TrustEvent], quarantined: int) -> None:
        """Count the trust decisions of rounds not counted yet; ``quarantined`` devices now.

        Pass the server's whole decision history (``FederatedServer.trust_events``) after each round.
        """
        with self._observed:
            newest = self._trust_round
            for event in events:
                if event.round > self._trust_round:
                    self._trust.inc(action=_label(event.action))
                    newest = max(newest, event.round)
            self._trust_round = newest
        self._quarantined.set(quarantined)

    def privacy_observed(self, epsilon_spent: float, epsilon_budget: float) -> None:
        """Central DP's accountant now: ε spent and the budget (call at start and after every round)."""
        self._dp_spent.set(epsilon_spent)
        self._dp_budget.set(epsilon_budget)
        self._dp_on = True

    def robust_observed(self, outcome: RobustOutcome | None) -> None:
        """Count what the robust rule did in a round (once per round; None: nothing to count)."""
        if outcome is None:
            return
        with self._observed:
            if outcome.round <= self._robust_round:
                return
            self._robust_round = outcome.round
        if outcome.excluded:
            self._robust.inc(outcome.excluded, effect="excluded")
        if outcome.clipped:
            self._robust.inc(outcome.clipped, effect="clipped")
