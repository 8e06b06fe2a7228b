"""The parameters of one secure-aggregation session (one round, or one FedBuff buffer)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.errors import ConfigError
from edge_agent.secagg.crypto import SESSION_BYTES
from edge_agent.secagg.ring import RingSpec
from edge_agent.secagg.shamir import MAX_INDEX

MAX_LENGTH = 0xFFFFFFFF


def default_threshold(cohort: int) -> int:
    """``floor(2n/3) + 1``: more than two thirds must reach the unmasking round.

    It tolerates ``n - t`` dropouts (at least 30% of the cohort for ``n >= 28``, and for some
    smaller cohorts such as 10 and 13; 33 of 100) while the sum stays private against the server
    plus up to ``t - 1`` colluding devices, more than two thirds of the cohort. Small cohorts that
    must survive 30% dropouts can pass a lower threshold explicitly.
    """
    if cohort < 1:
        raise ConfigError(f"secagg.cohort must be >= 1, got {cohort}")
    return 2 * cohort // 3 + 1


@dataclass(frozen=True, kw_only=True)
class SecAggParams:
    """What every member of a session agrees on. Devices are indexed ``1..cohort``.

    ``session`` (16 random bytes, fresh per session) binds every key, share and mask to this
    session, so nothing can be replayed into another round or buffer.
    """

    session: bytes
    cohort: int
    threshold: int
    length: int
    ring: RingSpec

    def __post_init__(self) -> None:
        if not isinstance(self.session, bytes) or len(self.session) != SESSION_BYTES:
            raise ConfigError(f"secagg.session must be {SESSION_BYTES} bytes")
        if not (isinstance(self.cohort, int) and 2 <= self.cohort <= MAX_INDEX):
            raise ConfigError(f"secagg.cohort must be in 2..{MAX_INDEX}, got {self.cohort!r}")
        if not (isinstance(self.threshold, int) and 2 <= self.threshold <= self.cohort):
            raise ConfigError(f"secagg.threshold must be in 2..{self.cohort} (the cohort), got {self.threshold!r}")
        if not (isinstance(self.length, int) and 1 <= self.length <= MAX_LENGTH):
            raise ConfigError(f"secagg.length must be in 1..{MAX_LENGTH}, got {self.length!r}")
        if self.ring.capacity < self.cohort:
            raise ConfigError(
                f"secagg.ring_bits = {self.ring.ring_bits} holds the sum of at most {self.ring.capacity} devices "
                f"with quant_bits = {self.ring.quant_bits}, but the cohort is {self.cohort}"
            )

    def check_index(self, index: int) -> None:
        if not 1 <= index <= self.cohort:
            raise ConfigError(f"secagg.index must be in 1..{self.cohort}, got {index}")
