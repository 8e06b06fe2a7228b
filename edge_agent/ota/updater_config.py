"""Settings of the device's :class:`~edge_agent.ota.updater.ModelUpdater` (a frozen dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.crypto.trust import TrustedKeys
from edge_agent.errors import ConfigError
from edge_agent.protocol.messages import MIN_CHUNK_BYTES
from edge_agent.protocol.topics import DEVICE_ID_PATTERN

__all__ = ["UpdaterConfig"]


@dataclass(frozen=True, kw_only=True)
class UpdaterConfig:
    #: the model channel this device follows (topic ``{prefix}/models/{channel}``)
    channel: str = "current"
    #: chunk size asked for in FETCH (the server may lower it); keep it stable: a staged download
    #: resumes only with the same chunk size
    chunk_size: int = 64 * 1024
    #: announcements of larger archives are ignored (nothing is fetched or allocated)
    max_archive_bytes: int = 256 * 2**20
    #: FETCH again when no chunk was stored for this long (doubling while unanswered)
    fetch_timeout_s: float = 30.0
    max_backoff_s: float = 600.0
    #: downloads of one announcement failing verification before it is given up (until restart)
    max_attempts: int = 3
    #: Ed25519 keys whose signatures this device accepts on MODELs and bundles (issue #7); empty:
    #: nothing is authenticated (integrity only)
    trusted_keys: TrustedKeys = field(default_factory=lambda: TrustedKeys(()))

    def __post_init__(self) -> None:
        if not DEVICE_ID_PATTERN.match(self.channel):
            raise ConfigError(f"invalid model channel {self.channel!r}")
        if self.chunk_size < MIN_CHUNK_BYTES or self.max_archive_bytes < 1 or self.max_attempts < 1:
            raise ConfigError(f"need chunk_size >= {MIN_CHUNK_BYTES}, max_archive_bytes >= 1, max_attempts >= 1")
        if not 0 < self.fetch_timeout_s <= self.max_backoff_s:
            raise ConfigError("need 0 < fetch_timeout_s <= max_backoff_s")
