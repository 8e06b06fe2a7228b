"""The device's check of signed artifacts before a MODEL is acted on or a bundle installed (issue #7).

:class:`ReleaseGate` is what :class:`~edge_agent.ota.updater.ModelUpdater` asks, in this order:

1. :meth:`ReleaseGate.refusal` when a MODEL for this device arrives, *before* anything is
   remembered or fetched: the release statement must be signed by a trusted key and hold at the
   device's wall clock (not expired, not issued in the future: :mod:`edge_agent.crypto.freshness`;
   both stage ``signature``, with their own codes), and must pass the replay and downgrade rules
   of :mod:`.authority` (stage ``downgrade``). Refusals of directed MODELs and every signature
   failure are reported in STATUS ``install`` (with ``version`` null, so a rogue publisher's
   MODEL never counts as a failed install in a rollout's health); a channel announcement the
   rules set aside is only logged (a retained baseline announcement during a rollout is normal).
2. :meth:`ReleaseGate.accept` once a directed MODEL passed: it becomes the newest directed statement.
3. :attr:`ReleaseGate.verify_bundle`, the model store's ``signature`` hook: ``manifest.sig`` by a
   trusted key, checked in staging before the bundle is run (validated) or activated.

Without trusted keys the gate is disabled: every method lets everything through (integrity from
the digests only, as before issue #7; the agent warns once at start).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.crypto.trust import SignatureError, TrustedKeys
from edge_agent.errors import ContractViolation, FedflockError
from edge_agent.ota.authority import ReleaseAuthority, statement_refusal
from edge_agent.ota.reports import InstalledModel, InstallReport
from edge_agent.ota.store import Verify
from edge_agent.protocol.model_messages import ModelMessage

__all__ = ["Refusal", "ReleaseGate"]

_log = logging.getLogger("fedflock.ota")


@dataclass(frozen=True)
class Refusal:
    """A MODEL the device will not act on: the install stage, the error, and whether STATUS reports it."""

    stage: str
    error: FedflockError
    report: bool


class ReleaseGate:
    """``wall_clock``: Unix seconds, the device's time against which statements must hold."""

    def __init__(
        self, trusted: TrustedKeys, authority: ReleaseAuthority, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.trusted, self.authority = trusted, authority
        self._wall_clock = wall_clock
        self._reported: set[ModelMessage] = set()  # refused MODELs reported (retained ones come again)

    @property
    def enabled(self) -> bool:
        return bool(self.trusted)

    @property
    def verify_bundle(self) -> Verify | None:
        """The model store's ``signature`` hook (None when disabled)."""
        if not self.enabled:
            return None

        def verify(directory: Path) -> None:
            name = self.trusted.check_bundle(directory)
            _log.info("bundle signature by key %s verified", name)

        return verify

    def refusal(self, model: ModelMessage, *, directed: bool, installed: InstalledModel | None) -> Refusal | None:
        """Why ``model`` must not be acted on (None: it may, or the gate is disabled)."""
        if not self.enabled:
            return None
        try:
            self.trusted.check_statement(model, now_ms=int(self._wall_clock() * 1000))
        except SignatureError as exc:
            return Refusal("signature", exc, report=True)
        last = self.authority.last_directed()
        reason = statement_refusal(model, directed=directed, installed=installed, last_directed=last)
        if reason is not None:
            return Refusal("downgrade", ContractViolation(reason), report=directed)
        return None

    def accept(self, model: ModelMessage, *, directed: bool) -> None:
        """``model`` passed :meth:`refusal`: a directed one is now the newest directed statement."""
        if self.enabled and directed:
            self.authority.accept_directed(model)

    def refused(self, model: ModelMessage, refusal: Refusal, *, device_id: str, at: float) -> InstallReport | None:
        """Log a refused MODEL; its STATUS report (once per distinct message) when the refusal has one."""
        what = f"{'directed ' if model.channel == device_id else ''}model v{model.version} ({model.channel})"
        reason = refusal.error.reason
        if model in self._reported:
            _log.info("%s: %s refused again (%s): %s", device_id, what, refusal.stage, reason)
            return None
        _log.warning("%s: refusing %s (%s): %s", device_id, what, refusal.stage, reason)
        if not refusal.report:
            return None
        if len(self._reported) >= 64:
            self._reported.clear()
        self._reported.add(model)
        return InstallReport(
            ok=False,
            version=None,  # nothing was attempted: a rogue MODEL must not count as a failed install
            stage=refusal.stage,
            reason=f"{what}: {reason}",
            code=refusal.error.code,
            digest=model.bundle_digest,
            at=at,
        )
