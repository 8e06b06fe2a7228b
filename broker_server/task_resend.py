"""When to send a round's TASK again: after a device or the server itself reconnected.

A TASK is a QoS 1 message on a clean session: one published while its device is reconnecting,
or while the server's own link is down, is lost, and the round would wait for its deadline
(found by the flaky-links fault drill, docs/drills.md). Sending it again is safe: an agent
answers a task id it already holds with its stored result (or keeps training it), so nothing is
trained or counted twice.

:class:`TaskResends` is pure bookkeeping. The engine tells it the device's connection count when
it sends a task (:attr:`broker_server.registry.DeviceRecord.connects`, which grows when an online STATUS
follows the device's offline will) and asks, while the round runs, which outstanding tasks are due again: those of
devices that connected since, and all of them once the server's link came back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["TaskResends"]


class TaskResends:
    def __init__(self, connects_of: Callable[[str], int]) -> None:
        self._connects_of = connects_of
        self._sent: dict[str, int] = {}
        self._link_up = True

    def sent(self, device_id: str) -> None:
        """``device_id``'s task was just published."""
        self._sent[device_id] = self._connects_of(device_id)

    def due(self, outstanding: Mapping[str, str], *, link_up: bool) -> dict[str, str]:
        """The tasks (task id -> device id) of ``outstanding`` to publish again now."""
        came_back = link_up and not self._link_up
        self._link_up = link_up
        if not link_up:
            return {}
        return {
            task_id: device_id
            for task_id, device_id in outstanding.items()
            # a device unknown when its task was sent (0: a server that just started) is not
            # "back" on its first STATUS, only on a later connect
            if came_back or self._connects_of(device_id) > max(self._sent.get(device_id, 0), 1)
        }
