"""The scale-out coordinator's TASKs: publishing a live round's tasks, and when to send one again.

:class:`TaskSender` publishes TASKs whole (QoS 1; a chunked download's acks would reach the
workers), each with the round's binding nonce and the time left to the round's deadline. A TASK
is sent again in three cases, all safe because an agent answers a task id it already holds with
its stored result (or keeps training it) and the workers' claims count a result once:

* its update was claimed by a worker that was fenced before flushing it (the coordinator's
  ``_watch``);
* its device reconnected since it was sent, or the coordinator's own link came back — the
  single server's rule, the same :class:`~broker_server.task_resend.TaskResends` — unless a
  worker already claimed its result (:meth:`TaskSender.due_again`);
* a restarted coordinator resumes the round (every task without a claim).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from broker_server.round_plan import RoundPlan
from broker_server.rounds import RoundState
from broker_server.task_resend import TaskResends
from edge_agent.protocol.messages import encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.transport.base import Transport

__all__ = ["LiveRound", "TaskSender"]


@dataclass(frozen=True, kw_only=True, eq=False)
class LiveRound:
    """The round being collected: its state, plan, TASK payload and deadline (coordinator clock)."""

    state: RoundState
    plan: RoundPlan
    payload: bytes
    deadline: float


class TaskSender:
    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        *,
        bundle_digest: str,
        connects_of: Callable[[str], int],
        clock: Callable[[], float],
    ) -> None:
        self._transport, self._topics, self._digest, self._clock = transport, topics, bundle_digest, clock
        self._resends = TaskResends(connects_of)
        #: TASKs published again (after a fence, a reconnect or a restart)
        self.resent = 0

    def send(self, live: LiveRound, tasks: Mapping[str, str], *, again: bool = False) -> None:
        """Publish ``tasks`` (task id -> device id) of ``live``; nothing once its deadline passed."""
        state = live.state
        deadline_s = live.deadline - self._clock()
        if deadline_s <= 0 or not tasks:
            return
        for task_id, device_id in tasks.items():
            task = live.plan.task(
                device_id=device_id,
                round=state.round,
                task_id=task_id,
                model_version=state.model_version,
                bundle_digest=self._digest,
                deadline_s=deadline_s,
            )
            task = dataclasses.replace(task, nonce=state.bindings[task_id].nonce)
            self._resends.sent(device_id)
            self._transport.publish(self._topics.tasks(device_id), encode_message(task, payload=live.payload), qos=1)
        if again:
            self.resent += len(tasks)

    def due_again(self, state: RoundState, claimed: Callable[[], Mapping[str, object]]) -> dict[str, str]:
        """The tasks to send again after a reconnect: due by :class:`TaskResends` and not claimed.

        ``claimed()`` reads the round's claims; it is called only when some task is due. A claimed
        task is marked as sent, so it is not due again until its device reconnects again.
        """
        is_connected = getattr(self._transport, "is_connected", None)
        due = self._resends.due(state.tasks, link_up=bool(is_connected()) if callable(is_connected) else True)
        if due:
            for task_id in due.keys() & claimed().keys():
                self._resends.sent(due.pop(task_id))
        return due
