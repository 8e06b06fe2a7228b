"""The server's signer of MODEL messages (``[ota] signing_key``; docs/protocol.md §8.5).

Every MODEL the server publishes — channel announcements and a staged rollout's directed MODELs —
carries a signed release statement stamped ``issued_at``. Devices order the statements they act
on by it (a replayed older directed MODEL cannot downgrade them), so the stamps of one signer
strictly increase even when the wall clock does not (two MODELs in one millisecond, a clock step
back): ``max(now_ms, last + 1)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.crypto.signing import SigningKey, sign_release
from edge_agent.protocol.model_messages import ModelMessage

__all__ = ["ReleaseSigner"]


class ReleaseSigner:
    """Signs MODEL messages with one key; ``clock`` is wall time in seconds (injected in tests)."""

    def __init__(self, key: SigningKey, *, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self._clock = clock
        self._last = 0

    @classmethod
    def from_file(cls, path: Path, *, source: str = "ota.signing_key") -> ReleaseSigner:
        return cls(SigningKey.load(path, source=source))

    @property
    def key_id(self) -> str:
        return self.key.key_id

    def sign(self, model: ModelMessage) -> ModelMessage:
        """``model`` with ``issued_at``, ``signing_key`` and ``signature`` set."""
        self._last = max(int(self._clock() * 1000), self._last + 1)
        return sign_release(model, self.key, issued_at=self._last)
