"""What the device's model store holds and reports: installed models and install outcomes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["InstallReport", "InstalledModel"]


@dataclass(frozen=True, kw_only=True)
class InstalledModel:
    version: int
    digest: str
    path: Path
    installed_at: float
    #: ``issued_at`` of the signed release statement it was installed with (0: none; edge_agent.ota.authority)
    issued_at: int = 0


@dataclass(frozen=True, kw_only=True)
class InstallReport:
    """Outcome of an install or rollback, for logs and for the server (:meth:`as_dict`)."""

    ok: bool
    #: the version installed or attempted (rollback: the version now current); None: no model
    version: int | None
    #: one of :data:`STAGES`: where it failed, ``"done"`` on success
    stage: str
    reason: str = ""
    #: the :class:`FedflockError` code of a failure (``"integrity_error"``, ...)
    code: str | None = None
    digest: str | None = None
    previous_version: int | None = None
    #: the store's clock when the report was made
    at: float = 0.0
    #: validation metrics of ``version`` measured by this install (e.g. loss, accuracy)
    metrics: dict[str, float] = field(default_factory=dict)
    #: the model this install or rollback replaced, and its metrics on the same rows (if measured)
    previous_digest: str | None = None
    previous_metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
