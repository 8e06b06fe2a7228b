"""What a drill measured, and the exactly-once verdict read from the server's store.

:func:`read_ledger` reads, for each round, what the server *committed*: the tasks it issued,
the ones it accepted (with the idempotency key of the accepted copy) and the round's stored
aggregate checkpoint (``count`` and ``total_weight``, the example-weighted sum every accepted
update was folded into). :func:`check_exactly_once` turns that into the verdict, without I/O:

* **lost**: a task issued and never accepted;
* **counted twice**: an aggregate holding more updates than accepted task ids, or more example
  weight than the accepted devices have examples (an update folded in twice).

:class:`DrillReport` is one drill's figures, printed as one JSON line (``DRILL {...}``) by the
tests and collected into a table by ``benchmarks/drills.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from broker_server.persistence import ServerStore

__all__ = ["DeliveryCheck", "DrillReport", "RoundLedger", "check_exactly_once", "read_ledger"]


@dataclass(frozen=True, kw_only=True)
class RoundLedger:
    """One round as the server's store holds it."""

    round: int
    status: str
    #: task id -> device id, every task the round issued
    tasks: Mapping[str, str]
    #: task id -> idempotency key (``device/task/attempt``) of the copy that was accepted
    accepted: Mapping[str, str]
    count: int
    total_weight: float


def read_ledger(store: ServerStore, rounds: Iterable[int]) -> list[RoundLedger]:
    """The stored ledger of ``rounds`` (each must exist in the store)."""
    ledgers = []
    for number in rounds:
        snapshot = store.load_round(number)
        accepted = {t.task_id: t.key or "" for t in snapshot.tasks if t.state == "accepted"}
        ledgers.append(
            RoundLedger(
                round=number,
                status=snapshot.round.status,
                tasks={t.task_id: t.device_id for t in snapshot.tasks},
                accepted=accepted,
                count=snapshot.checkpoint.count,
                total_weight=snapshot.checkpoint.total_weight,
            )
        )
    return ledgers


@dataclass(frozen=True, kw_only=True)
class DeliveryCheck:
    """The verdict over some rounds: ``ok`` when nothing was lost and nothing counted twice."""

    issued: int
    accepted: int
    lost: tuple[str, ...]
    counted_twice: int
    #: accepted copies that were not the first send (a device re-sent after a fault)
    resent_accepted: int

    @property
    def ok(self) -> bool:
        return not self.lost and self.counted_twice == 0


def check_exactly_once(ledgers: Iterable[RoundLedger], examples: Mapping[str, int]) -> DeliveryCheck:
    """Exactly-once over ``ledgers``; ``examples`` maps each device id to its training examples
    (an update's weight in the aggregate)."""
    issued = accepted = counted_twice = resent = 0
    lost: list[str] = []
    for ledger in ledgers:
        issued += len(ledger.tasks)
        accepted += len(ledger.accepted)
        lost += [
            f"round {ledger.round} task {task} ({device})"
            for task, device in ledger.tasks.items()
            if task not in ledger.accepted
        ]
        counted_twice += max(0, ledger.count - len(ledger.accepted))
        weight = sum(examples[ledger.tasks[task]] for task in ledger.accepted)
        if ledger.total_weight > weight + 1e-6:
            counted_twice += max(1, round((ledger.total_weight - weight) / max(min(examples.values()), 1)))
        resent += sum(not key.endswith("/1") for key in ledger.accepted.values())
    return DeliveryCheck(
        issued=issued, accepted=accepted, lost=tuple(lost), counted_twice=counted_twice, resent_accepted=resent
    )


@dataclass(frozen=True, kw_only=True)
class DrillReport:
    """One drill's figures (times in seconds)."""

    drill: str
    devices: int
    rounds: int
    faults: int
    updates_issued: int
    updates_accepted: int
    lost: int
    counted_twice: int
    #: from the fault to the first update accepted after it (None: no update was pending)
    recover_s: float | None = None
    reconnects: int = 0
    #: sends of a result after the first (outbox attempts - 1, summed over results)
    retransmits: int = 0
    duplicates_refused: int = 0
    wall_s: float = 0.0
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, drill: str, check: DeliveryCheck, **figures: Any) -> DrillReport:
        """A report whose issued/accepted/lost/counted-twice come from ``check``."""
        return cls(
            drill=drill,
            updates_issued=check.issued,
            updates_accepted=check.accepted,
            lost=len(check.lost),
            counted_twice=check.counted_twice,
            **figures,
        )

    def json_line(self) -> str:
        """``DRILL {...}``: one line, keys sorted, floats rounded to milliseconds."""
        data = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        return "DRILL " + json.dumps(data, sort_keys=True, default=str)
