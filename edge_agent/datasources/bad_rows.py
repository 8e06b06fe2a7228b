"""What to do with a row (a CSV line, an image file) that cannot be used."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from edge_agent.errors import ConfigError

log = logging.getLogger("fedflock.data")


@dataclass
class BadRows:
    """Raise :class:`ConfigError` on the first bad row or, with ``skip``, count them for one warning."""

    source: str
    skip: bool
    count: int = 0
    first: list[str] = field(default_factory=list)

    def report(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if not self.skip:
            raise ConfigError(message + " (set skip_bad_rows = true to leave such rows out)")
        self.count += 1
        if len(self.first) < 3:
            self.first.append(message)

    def report_line(self, line: int, reason: str) -> None:
        self.report(f"{self.source}, line {line}", reason)

    def log_summary(self) -> None:
        if self.count:
            log.warning("%s: skipped %d bad rows; first: %s", self.source, self.count, "; ".join(self.first))
