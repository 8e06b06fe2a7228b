"""Configuration of the device store, validated once when it is built.

The defaults suit a Raspberry-Pi-class device with an SD card and a model of up to a few
million parameters (an fp32 UPDATE of 10M parameters is 40 MB; the codecs shrink it 4-32x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from edge_agent.errors import ConfigError

__all__ = ["ON_CORRUPT_CHOICES", "OnCorrupt", "StoreConfig"]

DAY_S = 86_400.0
MIB = 1024 * 1024

OnCorrupt = Literal["fail", "move-aside"]
ON_CORRUPT_CHOICES: tuple[OnCorrupt, ...] = ("fail", "move-aside")


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Limits and timings of a :class:`~edge_agent.store.DeviceStore`.

    ``retention_s``
        How long delivered results, completed-task markers and participation history are kept
        (default 7 days). Delivered results are kept so a task the broker re-delivers can be
        answered from the store instead of retrained; the participation history feeds the
        device's budget, so this must be at least the longest budget window.
    ``max_result_bytes``
        Largest envelope :meth:`put_result` accepts; a larger one raises ``StorageError``.
    ``max_outbox_bytes``
        Cap on the envelope bytes held in the outbox (pending and delivered). A new result that
        would exceed it evicts the least useful results first (delivered or expired, then the
        oldest pending), each with a log line; see :meth:`DeviceStore.put_result` for why the
        newest result wins on a device that was offline for days.
    ``max_db_bytes``
        Hard cap on the database file (SQLite ``max_page_count``), 0 for none. When it is reached
        writes fail with ``StorageFull`` exactly as on a full disk; useful when the store shares
        a small partition with logs and data.
    ``busy_timeout_s``
        How long a write waits for another process holding the database lock (the
        ``fedflock agent status`` command reading it, say) before failing.
    ``check_on_open``
        Run ``PRAGMA quick_check`` when opening, so corruption is found at start-up, not halfway
        through a round. It reads every page: about a second for 100 MB on an SD card.
    """

    retention_s: float = 7 * DAY_S
    max_result_bytes: int = 64 * MIB
    max_outbox_bytes: int = 256 * MIB
    max_db_bytes: int = 0
    busy_timeout_s: float = 5.0
    check_on_open: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.retention_s) and self.retention_s > 0):
            raise ConfigError(f"store retention_s must be a positive number of seconds, got {self.retention_s!r}")
        if self.max_result_bytes < 1:
            raise ConfigError(f"store max_result_bytes must be at least 1, got {self.max_result_bytes}")
        if self.max_outbox_bytes < self.max_result_bytes:
            raise ConfigError(
                f"store max_outbox_bytes ({self.max_outbox_bytes}) must be at least "
                f"max_result_bytes ({self.max_result_bytes}), or a single result could never be stored"
            )
        if self.max_db_bytes < 0:
            raise ConfigError(f"store max_db_bytes must be 0 (no cap) or positive, got {self.max_db_bytes}")
        if not (math.isfinite(self.busy_timeout_s) and self.busy_timeout_s >= 0):
            raise ConfigError(f"store busy_timeout_s must be >= 0, got {self.busy_timeout_s!r}")


def validate_on_corrupt(value: str) -> OnCorrupt:
    """``value`` as an :data:`OnCorrupt` choice; raises ``ConfigError`` for anything else."""
    for choice in ON_CORRUPT_CHOICES:
        if value == choice:
            return choice
    raise ConfigError(f"on_corrupt must be one of {list(ON_CORRUPT_CHOICES)}, got {value!r}")
