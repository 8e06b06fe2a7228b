"""The agent's side of models over the air: glue between its loop and a :class:`ModelUpdater`.

Routes MODEL announcements, model CHUNKs and FETCH errors to the updater, publishes what it
returns, asks for a download when the eligibility gate allows the ``download`` phase, and tells
the agent to switch its running model after an install or a rollback (docs/protocol.md §8.5).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.errors import TransportError
from edge_agent.ota import InstallReport, ModelUpdater
from edge_agent.protocol.messages import Message

log = logging.getLogger("fedflock.agent")


class ModelUpdates:
    """``publish(topic, envelope)`` sends at QoS 1; ``switch(bundle_dir)`` makes the agent run
    the model installed there (and report it); ``report()`` publishes the device's STATUS, which
    carries :attr:`last_report`; ``may_download()`` is the gate's current ``download`` answer."""

    def __init__(
        self,
        updater: ModelUpdater,
        *,
        publish: Callable[[str, bytes], None],
        switch: Callable[[Path], None],
        report: Callable[[], None],
        may_download: Callable[[], bool],
    ) -> None:
        self.updater = updater
        self._publish = publish
        self._switch = switch
        self._report = report
        self._may_download = may_download
        #: the last install or rollback, reported in STATUS
        self.last_report: InstallReport | None = None

    @property
    def topic(self) -> str:
        return self.updater.channel_topic

    def install_status(self) -> dict[str, Any] | None:
        """:attr:`last_report` as STATUS carries it (``install``)."""
        return self.last_report.as_dict() if self.last_report is not None else None

    def accepts(self, message: Message) -> bool:
        return self.updater.accepts(message)

    def handle(self, message: Message) -> None:
        reply, report = self.updater.handle(message, may_download=self._may_download())
        if reply is not None:
            self._send(reply)
        if report is not None:
            self._after(report)

    def tick(self) -> None:
        """Ask for a pending announcement's archive when a FETCH is due and downloads are allowed."""
        if self.updater.pending is None:
            return
        fetch = self.updater.due_fetch(self._may_download())
        if fetch is not None:
            self._send(fetch)

    def rollback(self, reason: str) -> None:
        """Back to the previous model (the running one trains to a non-finite loss)."""
        if self.updater.store.previous() is None:
            log.error("model produces %s and there is no previous model to roll back to", reason)
            return
        self._after(self.updater.rollback(reason))

    def _send(self, envelope: bytes) -> None:
        try:
            self._publish(self.updater.results_topic, envelope)
        except TransportError as exc:  # a FETCH is asked again after its timeout; a lost ack, re-sent
            log.warning("cannot publish to %s: %s", self.updater.results_topic, exc.reason)

    def _after(self, report: InstallReport) -> None:
        self.last_report = report
        try:
            if not report.ok:
                log.warning("model v%s not installed (%s): %s", report.version, report.stage, report.reason)
                self._report()
                return
            current = self.updater.store.current()
            if current is None:  # pragma: no cover - the store just reported success
                return
            log.info("running model v%d %s… now (%s)", current.version, current.digest[:12], report.stage)
            self._switch(current.path)
        except TransportError as exc:  # the STATUS only (the switch is done); re-sent after a reconnect
            log.warning("cannot publish the install report: %s", exc.reason)
