"""Store-and-forward for the device agent: an on-disk SQLite inbox and outbox (issue #5).

:class:`DeviceStore` is the whole public surface; see :mod:`edge_agent.store.device_store` for
the design (durability, threads, corruption), :mod:`edge_agent.store.connection` for the SQLite
pragmas and :mod:`edge_agent.store.schema` for the tables and the migration hook. It is fast
enough on a ``tmp_path`` that tests of other components can use the real thing as their double.
"""

from __future__ import annotations

from edge_agent.store.config import ON_CORRUPT_CHOICES, OnCorrupt, StoreConfig
from edge_agent.store.connection import StorageFull, StoreCorrupt
from edge_agent.store.device_store import DeviceStore
from edge_agent.store.records import InboxTask, OutboxItem, PurgeReport, StoreSizes
from edge_agent.store.schema import SCHEMA_VERSION

__all__ = [
    "ON_CORRUPT_CHOICES",
    "SCHEMA_VERSION",
    "DeviceStore",
    "InboxTask",
    "OnCorrupt",
    "OutboxItem",
    "PurgeReport",
    "StorageFull",
    "StoreConfig",
    "StoreCorrupt",
    "StoreSizes",
]
