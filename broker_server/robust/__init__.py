"""Byzantine-robust aggregation and tiered trust (pure numpy, no I/O).

Two modes, chosen per deployment:

* **streaming** (O(model) memory, any number of devices): FedAvg through
  :class:`ClippedWeightedMean`, a drop-in :class:`~broker_server.aggregate.WeightedMean` that clips
  every update to an L2 norm bound before folding it in, weighted by
  ``num_examples x Reputation.multiplier``;
* **buffered** (rules that need every update): an :class:`UpdateBuffer` holds the round's decoded
  updates as one ``[n, d]`` float32/float16 matrix under a hard byte cap (refuses when full,
  never evicts), and a rule — :class:`Median`, :class:`TrimmedMean`, :class:`Krum`,
  :class:`ClippedMean` — reduces it in column blocks of bounded working memory.

:class:`Reputation` turns per-round :class:`Observation` s (distance / cosine to the aggregate,
validation) into weight multipliers, quarantines and releases, with reasons to log.
"""

from broker_server.robust.buffer import BufferConfig, UpdateBuffer
from broker_server.robust.clip import ClippedMean, ClippedWeightedMean, UpdateStats, clip_update, clipped_mean
from broker_server.robust.core import DEFAULT_WORK_BYTES, RowRule, RuleReport, RuleResult
from broker_server.robust.errors import BufferFull, NotEnoughUpdates, RobustAggregationError
from broker_server.robust.flatten import Flattener
from broker_server.robust.rules import Krum, Median, TrimmedMean, coordinate_median, krum, trimmed_mean
from broker_server.robust.trust import Observation, Reputation, TrustConfig, TrustDecision, TrustStatus, observe_rows

RobustRule = Median | TrimmedMean | Krum | ClippedMean

__all__ = [
    "DEFAULT_WORK_BYTES",
    "BufferConfig",
    "BufferFull",
    "ClippedMean",
    "ClippedWeightedMean",
    "Flattener",
    "Krum",
    "Median",
    "NotEnoughUpdates",
    "Observation",
    "Reputation",
    "RobustAggregationError",
    "RobustRule",
    "RowRule",
    "RuleReport",
    "RuleResult",
    "TrimmedMean",
    "TrustConfig",
    "TrustDecision",
    "TrustStatus",
    "UpdateBuffer",
    "UpdateStats",
    "clip_update",
    "clipped_mean",
    "coordinate_median",
    "krum",
    "observe_rows",
    "trimmed_mean",
]
