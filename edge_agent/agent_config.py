"""The device agent's in-process configuration (``fedflock agent --config`` builds it from the
config file, :mod:`edge_agent.config`; tests and the demo build it directly)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.codecs import DEFAULT_PREFERENCES, CodecSpec
from edge_agent.errors import ConfigError, FedflockError
from edge_agent.privacy import LocalDP, LocalDPConfig
from edge_agent.protocol.messages import MIN_CHUNK_BYTES
from edge_agent.protocol.topics import Topics, validate_device_id
from edge_agent.store import StoreConfig


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    device_id: str
    #: announced in STATUS capabilities; the server stratifies selection by it
    device_class: str = "default"
    topics: Topics = Topics()
    seed: int = 0
    #: Stop after this many tasks (tests and batch jobs); ``None`` runs until stopped.
    max_tasks: int | None = None
    #: Where the device keeps state across tasks and restarts (inbox/outbox, checkpoints,
    #: personal tensors, codec residual); ``None`` keeps them in memory only.
    state_dir: Path | None = None
    #: network type -> update codecs this device prefers on it (strongest compression on cellular);
    #: the codec used is the first of these that the task's server accepts (edge_agent.codecs)
    codec_preferences: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PREFERENCES))
    #: keep what a lossy codec dropped and add it to the next update (persisted in state_dir)
    error_feedback: bool = True
    #: results larger than this travel as CHUNKs of this size (unless the task asks for smaller)
    chunk_bytes: int = 256 * 1024
    #: an undelivered result older than this is dropped from the outbox (with a log line)
    result_ttl_s: float = 72 * 3600.0
    #: the inbox/outbox's limits and retention (edge_agent.store)
    store: StoreConfig = field(default_factory=StoreConfig)
    #: local differential privacy (edge_agent.privacy): every update is clipped and noised on the
    #: device before the codec; None: off
    privacy: LocalDPConfig | None = None

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if self.chunk_bytes < MIN_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be >= {MIN_CHUNK_BYTES}")
        if not self.result_ttl_s > 0:
            raise ConfigError(f"result_ttl_s must be > 0, got {self.result_ttl_s}")
        for network, names in self.codec_preferences.items():
            for name in names:
                try:
                    CodecSpec.parse(name)
                except FedflockError as exc:
                    raise ConfigError(f"codec preference for {network!r}: {exc.reason}") from exc

    def local_dp(self) -> LocalDP | None:
        """The device's local DP (None: off), its noise seeded from the OS's CSPRNG, never from
        ``seed``: noise anyone can regenerate protects nothing."""
        if self.privacy is None:
            return None
        return LocalDP(self.privacy, rng=np.random.default_rng(secrets.randbits(128)))
