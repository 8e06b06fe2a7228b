"""The task table's view of an asynchronous TASK and the binding rules its UPDATE must meet (pure).

:class:`~broker_server.fedbuff.FedBuff` asks its ``task_of`` for the :class:`IssuedTask` an
update names and refuses it with :func:`issued_refusal`'s reason: ``cross_device`` (issued to
another device), ``cross_round`` (the update's round is not the TASK's), ``bad_nonce``,
``wrong_base`` (another base digest, or another model version than the TASK's). The rules are
those of :func:`edge_agent.protocol.binding.binding_refusal`, shared with the synchronous rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.protocol.binding import TaskBinding, WrongBase, binding_refusal
from edge_agent.protocol.messages import UpdateMessage

__all__ = ["IssuedTask", "issued_refusal"]


@dataclass(frozen=True, kw_only=True)
class IssuedTask:
    """What the caller's task table knows of an async task."""

    device_id: str
    model_version: int
    #: the round (buffer number) the TASK carried; None: not checked
    round: int | None = None
    #: the TASK's nonce and base digest (empty: issued unbound, by a server that predates binding)
    binding: TaskBinding = field(default_factory=TaskBinding)


def issued_refusal(update: UpdateMessage, task: IssuedTask) -> tuple[str, str] | None:
    """``(code, detail)`` if ``update`` does not answer ``task`` as issued, else None."""
    refusal = binding_refusal(
        device_id=update.device_id,
        nonce=update.nonce,
        base_digest=update.base_digest,
        owner=task.device_id,
        binding=task.binding,
        task_id=update.task_id,
    )
    if refusal is None and task.round is not None and update.round != task.round:
        return "cross_round", f"task {update.task_id!r} was issued in round {task.round}, update says {update.round}"
    if refusal is None and task.model_version != update.model_version:
        refusal = WrongBase(
            f"task {update.task_id!r} was issued at v{task.model_version}, update says v{update.model_version}"
        )
    return None if refusal is None else (refusal.code, refusal.reason)
