"""Tests of the device store, with the small helpers they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.store import DeviceStore, StoreConfig

T0 = 1_700_000_000.0
HOUR = 3600.0
DAY = 86_400.0


@dataclass
class Clock:
    """A settable clock to inject as ``clock=``."""

    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def open_store(tmp_path: Path, clock: Clock, config: StoreConfig | None = None) -> DeviceStore:
    """The store in ``tmp_path/device.db``."""
    return DeviceStore.open(tmp_path / "device.db", clock=clock, config=config)
