"""Errors of the server store, all :class:`~edge_agent.errors.StorageError` subclasses.

::

    StorageError                 any failure to read or write the store (driver errors translated)
    ├── StoreConflict            the write contradicts what is stored: an existing model version,
    │                            a round already closed, a checkpoint not based on the stored one,
    │                            a deadlock or serialization failure (retry the call)
    ├── RecordNotFound           the round, task or parent model version does not exist
    └── StoreUnavailable         the database cannot be reached (server down, file locked)

Driver exceptions (``sqlite3.Error``, ``psycopg.Error``) never escape a store method; they are
mapped with ``raise ... from exc`` and every message names the store (path or host/database,
never a password).
"""

from __future__ import annotations

from edge_agent.errors import StorageError

__all__ = ["RecordNotFound", "StorageError", "StoreConflict", "StoreUnavailable"]


class StoreConflict(StorageError):
    code = "store_conflict"


class RecordNotFound(StorageError):
    code = "record_not_found"


class StoreUnavailable(StorageError):
    code = "store_unavailable"
