"""ServerMetrics: the names, types and values the server's events produce on /metrics."""

from __future__ import annotations

import threading

import pytest

from broker_server.ops.metrics import ServerMetrics
from broker_server.server_config import RoundResult
from tests.broker_server.ops.test_prometheus import Family, parse_exposition

EXPECTED = {
    "fedflock_rounds_total": "counter",
    "fedflock_devices_online": "gauge",
    "fedflock_devices_known": "gauge",
    "fedflock_updates_accepted_total": "counter",
    "fedflock_update_bytes_accepted_total": "counter",
    "fedflock_updates_rejected_total": "counter",
    "fedflock_bytes_received_total": "counter",
    "fedflock_bytes_sent_total": "counter",
    "fedflock_aggregation_seconds": "histogram",
    "fedflock_round_duration_seconds": "histogram",
    "fedflock_model_version": "gauge",
    "fedflock_round_test_accuracy": "gauge",
    "fedflock_trust_decisions_total": "counter",
    "fedflock_devices_quarantined": "gauge",
    "fedflock_robust_updates_total": "counter",
}


def result(*, completed: bool = True, version: int = 1, accuracy: float | None = 0.8, duration: float = 12.0):
    return RoundResult(
        round=version,
        model_version=version,
        selected=3,
        reported=3 if completed else 0,
        failed=0,
        num_examples=30,
        duration_s=duration,
        completed=completed,
        reason="" if completed else "too few updates",
        test_accuracy=accuracy,
    )


def scrape(metrics: ServerMetrics) -> dict[str, Family]:
    return parse_exposition(metrics.render())


def test_every_metric_is_exposed_with_help_and_type_before_any_event() -> None:
    families = scrape(ServerMetrics())
    assert {name: f.type for name, f in families.items()} == EXPECTED
    assert all(f.help for f in families.values())
    rounds = families["fedflock_rounds_total"]
    assert rounds.value(outcome="completed") == rounds.value(outcome="abandoned") == 0
    assert families["fedflock_bytes_sent_total"].value() == 0
    assert families["fedflock_round_test_accuracy"].samples == {}  # unknown, not 0


def test_round_finished_counts_outcome_duration_version_and_accuracy() -> None:
    m = ServerMetrics()
    m.round_finished(result(version=1, accuracy=0.5, duration=3.0))
    m.round_finished(result(version=2, accuracy=None, duration=40.0))
    m.round_finished(result(completed=False, version=2, accuracy=0.1, duration=60.0))
    f = scrape(m)
    assert f["fedflock_rounds_total"].value(outcome="completed") == 2
    assert f["fedflock_rounds_total"].value(outcome="abandoned") == 1
    assert f["fedflock_model_version"].value() == 2
    # round 2 had no accuracy and the abandoned round's is not a model's: round 1's stays
    assert f["fedflock_round_test_accuracy"].value() == 0.5
    durations = f["fedflock_round_duration_seconds"]
    assert durations.value("fedflock_round_duration_seconds_count") == 3
    assert durations.value("fedflock_round_duration_seconds_sum") == 103.0
    assert durations.value("fedflock_round_duration_seconds_bucket", le="5") == 1
    assert durations.value("fedflock_round_duration_seconds_bucket", le="60") == 3


def test_updates_rejections_bytes_devices_and_aggregation() -> None:
    m = ServerMetrics()
    m.update_accepted("int8", 1000)
    m.update_accepted("int8", 500)
    m.update_accepted("fp32", 4000)
    m.message_rejected("contract_violation")
    m.message_rejected("malformed_message")
    m.message_rejected("contract_violation")
    m.bytes_received(7)
    m.bytes_sent(11)
    m.bytes_sent(4)
    m.devices(online=3, known=5)
    m.aggregation_took(0.02)
    m.set_model_version(9)
    f = scrape(m)
    assert f["fedflock_updates_accepted_total"].value(codec="int8") == 2
    assert f["fedflock_updates_accepted_total"].value(codec="fp32") == 1
    assert f["fedflock_update_bytes_accepted_total"].value(codec="int8") == 1500
    assert f["fedflock_updates_rejected_total"].value(reason="contract_violation") == 2
    assert f["fedflock_updates_rejected_total"].value(reason="malformed_message") == 1
    assert f["fedflock_bytes_received_total"].value() == 7
    assert f["fedflock_bytes_sent_total"].value() == 15
    assert f["fedflock_devices_online"].value() == 3 and f["fedflock_devices_known"].value() == 5
    assert f["fedflock_aggregation_seconds"].value("fedflock_aggregation_seconds_bucket", le="0.01") == 0
    assert f["fedflock_aggregation_seconds"].value("fedflock_aggregation_seconds_bucket", le="0.025") == 1
    assert f["fedflock_model_version"].value() == 9


@pytest.mark.parametrize("value", ["has space", 'quote"', "x" * 65, "", "new\nline"])
def test_wire_chosen_label_values_outside_the_pattern_count_as_other(value: str) -> None:
    m = ServerMetrics()
    m.message_rejected(value)
    m.update_accepted(value, 1)
    f = scrape(m)
    assert f["fedflock_updates_rejected_total"].samples == {
        ("fedflock_updates_rejected_total", (("reason", "other"),)): 1
    }
    assert f["fedflock_updates_accepted_total"].value(codec="other") == 1


def test_events_from_many_threads_add_up_exactly() -> None:
    m = ServerMetrics()
    threads, per_thread = 6, 2000

    def work() -> None:
        for _ in range(per_thread):
            m.update_accepted("fp16", 3)
            m.message_rejected("contract_violation")
            m.bytes_sent(2)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    f = scrape(m)
    total = threads * per_thread
    assert f["fedflock_updates_accepted_total"].value(codec="fp16") == total
    assert f["fedflock_update_bytes_accepted_total"].value(codec="fp16") == 3 * total
    assert f["fedflock_updates_rejected_total"].value(reason="contract_violation") == total
    assert f["fedflock_bytes_sent_total"].value() == 2 * total
