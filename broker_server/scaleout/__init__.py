"""Scale-out (issue #9): one coordinator runs the rounds, N workers count the device results.

Workers share the devices' results through an MQTT shared subscription
(``$share/{group}/{prefix}/devices/+/results``), claim each result exactly once in PostgreSQL
(a primary key on ``(round, task_id)``), fold it into their own partial
:class:`~broker_server.aggregate.WeightedMean`, and flush the partial to the store; the
coordinator combines the partials when the round closes (FedAvg's sums are associative) and
checks that they hold exactly the accepted updates. docs/scaleout.md has the design, the
guarantees and what scale-out mode refuses.

* :mod:`.config` — the ``[scaleout]`` table and the refusals (``check_scaleout``);
* :mod:`.partials` — pure: a worker's partial and :func:`combine_partials`;
* :mod:`.worker` — :class:`ScaleoutWorker`;
* :mod:`.coordinator` and :mod:`.closing` — :class:`ScaleoutCoordinator`;
* :mod:`.liveness` — pure: which workers still beat, which claims count towards an outcome;
* :mod:`broker_server.persistence.scaleout` — the tables and their transactions.
"""

from broker_server.scaleout.config import ROLES, ScaleoutSettings, check_scaleout, parse_scaleout
from broker_server.scaleout.coordinator import ScaleoutCoordinator
from broker_server.scaleout.partials import PartialsMismatch, checkpoint_of_partial, combine_partials
from broker_server.scaleout.worker import ScaleoutWorker, shared_results_filter

__all__ = [
    "ROLES",
    "PartialsMismatch",
    "ScaleoutCoordinator",
    "ScaleoutSettings",
    "ScaleoutWorker",
    "check_scaleout",
    "checkpoint_of_partial",
    "combine_partials",
    "parse_scaleout",
    "shared_results_filter",
]
