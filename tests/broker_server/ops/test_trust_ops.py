"""Tiered trust and robust rules on /metrics, in the status document and on the dashboard."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from broker_server.ops.metrics import ServerMetrics
from broker_server.ops.status import MAX_TRUST_TEXT, build_status, trust_view
from broker_server.robust import Observation, Reputation, TrustConfig, TrustDecision
from broker_server.safeguards import RobustRound
from broker_server.server import FederatedServer
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import fake_fleet
from tests.broker_server.ops.test_dashboard_chromium import Node, dashboard  # noqa: F401  (a fixture)
from tests.broker_server.ops.test_metrics import scrape
from tests.broker_server.ops.test_status import sample_status
from tests.broker_server.test_server_robust import ATTACKERS, HONEST, config, fleet

OUTLIER = Observation(distance=1.0, cosine=-0.9)
FINE = Observation(distance=0.1, cosine=0.9)


def decision(device_id: str, round_: int, action: str, reason: str = "why") -> TrustDecision:
    return TrustDecision(device_id=device_id, round=round_, action=action, reason=reason, score=0.25)  # type: ignore[arg-type]


def quarantining() -> Reputation:
    """mal-1 quarantined after two outlier rounds (its reason says so), dev-a fine."""
    reputation = Reputation(TrustConfig(quarantine_after=2, min_round_size=1))
    for number in (1, 2):
        reputation.update(number, {"mal-1": OUTLIER, "dev-a": FINE})
    assert reputation.quarantined == ("mal-1",)
    return reputation


# -- /metrics ------------------------------------------------------------------------------------


def test_trust_decisions_are_counted_once_per_round_by_action() -> None:
    m = ServerMetrics()
    history = [decision("a", 1, "outlier"), decision("b", 1, "outlier")]
    m.trust_observed(history, quarantined=0)
    history += [decision("a", 2, "quarantine"), decision("c", 2, "bogus action!")]
    m.trust_observed(history, quarantined=1)
    m.trust_observed(history, quarantined=1)  # the same history again: nothing new
    history += [decision("a", 9, "release")]
    m.trust_observed(history[-2:], quarantined=0)  # a history whose oldest entries were forgotten
    f = scrape(m)
    trust = f["fedflock_trust_decisions_total"]
    assert {a: trust.value(action=a) for a in ("outlier", "quarantine", "extend", "release", "other")} == {
        "outlier": 2,
        "quarantine": 1,
        "extend": 0,
        "release": 1,
        "other": 1,
    }
    assert f["fedflock_devices_quarantined"].value() == 0


def test_robust_outcomes_are_counted_once_per_round() -> None:
    m = ServerMetrics()
    m.robust_observed(None)
    m.robust_observed(RobustRound(1, "krum f=2 m=1", 10, excluded=9))
    m.robust_observed(RobustRound(1, "krum f=2 m=1", 10, excluded=9))  # asked twice after round 1
    m.robust_observed(RobustRound(2, "clip 1", 10, clipped=3))
    robust = scrape(m)["fedflock_robust_updates_total"]
    assert (robust.value(effect="excluded"), robust.value(effect="clipped")) == (9, 3)


# -- the status document -------------------------------------------------------------------------


def test_status_marks_quarantined_devices_with_the_reason_and_lists_decisions() -> None:
    reputation = quarantining()
    events = [decision("mal-1", r, "outlier", f"r{r}") for r in range(1, 30)]
    status = sample_status(reputation=reputation, trust_events=events)
    json.dumps(status, allow_nan=False)
    reason = reputation.status("mal-1").reason
    assert reason.startswith("quarantined: ")
    assert status["trust"]["quarantined"] == [
        {"device_id": "mal-1", "reason": reason, "score": reputation.status("mal-1").score, "strikes": 1}
    ]
    recent = status["trust"]["recent"]
    assert [e["reason"] for e in recent] == [f"r{r}" for r in range(10, 30)]  # the newest 20, oldest first
    assert recent[0] == {"device_id": "mal-1", "round": 10, "action": "outlier", "reason": "r10", "score": 0.25}


def test_a_quarantined_device_is_not_eligible_and_says_why() -> None:
    from tests.broker_server.ops.test_status import devices, record

    reputation = quarantining()
    status = sample_status(devices=[*devices(), record("mal-1")], reputation=reputation)
    views = {d["device_id"]: d for d in status["devices"]}
    held = views["mal-1"]
    assert held["quarantined"] and not held["eligible"]
    assert held["reasons"] == [{"code": "quarantined", "text": reputation.status("mal-1").reason, "source": "server"}]
    assert views["dev-a"]["eligible"] and not views["dev-a"]["quarantined"]
    assert status["device_counts"]["eligible"] == 1  # dev-a only


def test_without_trust_the_document_says_so() -> None:
    status = sample_status()
    assert status["trust"] is None and not any(d["quarantined"] for d in status["devices"])


def test_trust_reasons_are_clipped() -> None:
    view = trust_view(quarantining(), [decision("x", 1, "outlier", "z" * 5000)])
    assert view["recent"][0]["reason"] == "z" * MAX_TRUST_TEXT


# -- a real server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def observe(server: FederatedServer, metrics: ServerMetrics) -> None:
    """The glue ``fedflock.broker_cli.observe_round`` runs after every round."""
    reputation = server.reputation
    metrics.trust_observed(server.trust_events, len(reputation.quarantined) if reputation is not None else 0)
    metrics.robust_observed(server._safeguards.last_round)  # FederatedServer.robust_round, once the lead wires it


def test_a_server_quarantining_attackers_shows_it_on_metrics_and_status(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    metrics = ServerMetrics()
    devices = fleet(broker, bundle)
    with fake_fleet(devices):  # type: ignore[arg-type]
        server = FederatedServer(
            InMemoryTransport(broker, "server"),
            bundle,
            config(rounds=3, robust={"rule": "krum", "f": 3, "m": 4}, trust={}),
        )
        server.start()
        server.wait_for_devices(len(devices), 10)
        server.run(on_round=lambda result: observe(server, metrics))
        server.close()
    f = scrape(metrics)
    trust = f["fedflock_trust_decisions_total"]
    assert (trust.value(action="outlier"), trust.value(action="quarantine")) == (6, 3)
    assert f["fedflock_devices_quarantined"].value() == 3
    assert f["fedflock_robust_updates_total"].value(effect="excluded") == 3 * 6  # Krum kept 4 of 10 each round
    status = build_status(
        config=server.config,
        strategy=server.strategy.name,
        model_version=server.model_version,
        bundle_digest=server.bundle.digest,
        devices=server.registry.records(),
        rounds=list(server.results),
        now=0.0,
        reputation=server.reputation,
        trust_events=list(server.trust_events),
    )
    assert [q["device_id"] for q in status["trust"]["quarantined"]] == ATTACKERS
    views = {d["device_id"]: d for d in status["devices"]}
    assert all(views[d]["quarantined"] and views[d]["reasons"][0]["code"] == "quarantined" for d in ATTACKERS)
    assert not any(views[d]["quarantined"] for d in HONEST)


# -- the dashboard -------------------------------------------------------------------------------


def test_dashboard_lists_quarantined_devices_with_reasons(dashboard: Callable[..., tuple[Node, str]]) -> None:  # noqa: F811
    reputation = quarantining()
    events = [decision("mal-1", 1, "outlier", "far <b>away</b>"), decision("mal-1", 2, "quarantine", "enough")]
    dom, console = dashboard(lambda: sample_status(reputation=reputation, trust_events=events))
    assert "Uncaught" not in console, console
    assert "hidden" in dom.by_id("trust-off").attrs
    (held,) = dom.by_id("quarantined").find_all("tr", **{"class": "quarantined"})
    cells = [c.text() for c in held.find_all("td")]
    assert cells[0] == "mal-1" and cells[3] == reputation.status("mal-1").reason
    rows = dom.by_id("trust-events").find_all("tr", **{"class": "trust-event"})
    assert [[c.text() for c in r.find_all("td")][:3] for r in rows] == [
        ["2", "mal-1", "quarantine"],
        ["1", "mal-1", "outlier"],
    ]
    assert not dom.by_id("trust-events").find_all("b")  # reasons are text, never markup


def test_dashboard_without_trust_says_it_is_off(dashboard: Callable[..., tuple[Node, str]]) -> None:  # noqa: F811
    dom, console = dashboard(lambda: sample_status())
    assert "Uncaught" not in console, console
    assert "hidden" not in dom.by_id("trust-off").attrs
    assert "hidden" in dom.by_id("quarantined").attrs and "hidden" in dom.by_id("trust-events").attrs
