"""Which TASKs a round sends again: after the device's reconnect, or the server's own."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from broker_server.registry import DeviceRegistry
from broker_server.task_resend import TaskResends
from edge_agent.presence import status_message
from edge_agent.protocol.messages import StatusMessage


def _status(device_id: str, *, online: bool = True, eligibility: dict[str, Any] | None = None) -> StatusMessage:
    status = status_message(device_id, online=online, bundle_digest="d" * 64, num_examples=10)
    return status if eligibility is None else replace(status, eligibility=eligibility)


def test_the_registry_counts_comebacks_not_reports() -> None:
    registry = DeviceRegistry()
    registry.observe(_status("a"), 0.0)
    assert registry.connects("a") == 1
    registry.observe(_status("a", eligibility={"eligible": True, "phase": "train"}), 1.0)
    assert registry.connects("a") == 1  # a report from a connected device
    registry.observe(_status("a", online=False), 2.0)
    registry.observe(_status("a", eligibility={"eligible": True, "phase": "train"}), 3.0)
    assert registry.connects("a") == 2  # online again after offline
    registry.observe(_status("a"), 4.0)
    assert registry.connects("a") == 2  # an agent's own STATUS (e.g. after an install) is no reconnect
    assert registry.connects("never-seen") == 0


def test_only_tasks_of_devices_that_came_back_are_due() -> None:
    registry = DeviceRegistry()
    for device in ("a", "b"):
        registry.observe(_status(device), 0.0)
    resends = TaskResends(registry.connects)
    resends.sent("a")
    resends.sent("b")
    outstanding = {"t-a": "a", "t-b": "b"}
    assert resends.due(outstanding, link_up=True) == {}
    registry.observe(_status("b", online=False), 1.0)  # b's will: its link dropped
    registry.observe(_status("b"), 1.5)  # b reconnected: its TASK may be lost
    assert resends.due(outstanding, link_up=True) == {"t-b": "b"}
    resends.sent("b")
    assert resends.due(outstanding, link_up=True) == {}


def test_every_outstanding_task_is_due_once_when_the_server_link_comes_back() -> None:
    registry = DeviceRegistry()
    registry.observe(_status("a"), 0.0)
    resends = TaskResends(registry.connects)
    resends.sent("a")
    assert resends.due({"t-a": "a"}, link_up=False) == {}
    assert resends.due({"t-a": "a"}, link_up=True) == {"t-a": "a"}
    assert resends.due({"t-a": "a"}, link_up=True) == {}


def test_the_first_status_of_a_device_unknown_at_send_time_is_no_reconnect() -> None:
    registry = DeviceRegistry()
    resends = TaskResends(registry.connects)
    resends.sent("a")  # a restarted server re-sends before the retained STATUS arrives
    registry.observe(_status("a"), 0.0)
    assert resends.due({"t-a": "a"}, link_up=True) == {}
    registry.observe(_status("a", online=False), 1.0)
    registry.observe(_status("a"), 2.0)  # a real reconnect later
    assert resends.due({"t-a": "a"}, link_up=True) == {"t-a": "a"}
