"""What every TASK of one round carries, fixed when the round opens.

A :class:`RoundPlan` merges the server's configuration with the strategy's settings for that
round (:meth:`Strategy.configure_task`: FedProx's ``fedprox_mu``, client ``lr``/``epochs``
overrides). It is stored with the round (``RoundRow.config``), so a resumed round re-sends
exactly the TASKs it sent before the restart and is judged with the codecs and report count it
was opened with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker_server.server_config import ServerConfig
from broker_server.strategies import TaskSettings
from edge_agent.codecs import CodecSpec
from edge_agent.errors import FedflockError, StorageError
from edge_agent.protocol.messages import TaskMessage

__all__ = ["RoundPlan"]

HyperValue = float | tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    epochs: int
    batch_size: int
    lr: float
    hyperparameters: Mapping[str, HyperValue]
    frozen: tuple[str, ...]
    #: codec specs the TASKs offer, in the server's order of preference
    codecs: tuple[str, ...]
    max_chunk_bytes: int
    #: updates the round wants (k, before over-selection)
    wanted: int
    timeout_s: float
    #: the strategy's name (informational: what produced the round's model)
    strategy: str

    @classmethod
    def make(cls, config: ServerConfig, settings: TaskSettings, *, wanted: int, strategy: str) -> RoundPlan:
        """The config's TASK fields, with the strategy's ``settings`` taking precedence."""
        return cls(
            epochs=settings.epochs if settings.epochs is not None else config.local_epochs,
            batch_size=config.batch_size,
            lr=settings.lr if settings.lr is not None else config.lr,
            hyperparameters={**config.hyperparameters, **settings.hyperparameters},
            frozen=config.frozen,
            codecs=config.codecs,
            max_chunk_bytes=config.chunk_bytes,
            wanted=wanted,
            timeout_s=config.round_timeout_s,
            strategy=strategy,
        )

    @property
    def codec_names(self) -> frozenset[str]:
        """The codec names (``CodecSpec.name``) an update of this round may use."""
        return frozenset(CodecSpec.parse(spec).name for spec in self.codecs)

    def task(
        self, *, device_id: str, round: int, task_id: str, model_version: int, bundle_digest: str, deadline_s: float
    ) -> TaskMessage:
        """The TASK for one device (its weights travel as the envelope's payload)."""
        return TaskMessage(
            device_id=device_id,
            round=round,
            task_id=task_id,
            model_version=model_version,
            bundle_digest=bundle_digest,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            deadline_s=deadline_s,
            hyperparameters=dict(self.hyperparameters),
            frozen=self.frozen,
            codecs=self.codecs,
            max_chunk_bytes=self.max_chunk_bytes,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "hyperparameters": {k: list(v) if isinstance(v, tuple) else v for k, v in self.hyperparameters.items()},
            "frozen": list(self.frozen),
            "codecs": list(self.codecs),
            "max_chunk_bytes": self.max_chunk_bytes,
            "wanted": self.wanted,
            "timeout_s": self.timeout_s,
            "strategy": self.strategy,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, round: int) -> RoundPlan:
        """The plan stored with round ``round`` (``StorageError`` if it is not one)."""
        try:
            plan = cls(
                epochs=int(data["epochs"]),
                batch_size=int(data["batch_size"]),
                lr=float(data["lr"]),
                hyperparameters={
                    str(k): tuple(float(x) for x in v) if isinstance(v, list) else float(v)
                    for k, v in data["hyperparameters"].items()
                },
                frozen=tuple(str(name) for name in data["frozen"]),
                codecs=tuple(str(spec) for spec in data["codecs"]),
                max_chunk_bytes=int(data["max_chunk_bytes"]),
                wanted=int(data["wanted"]),
                timeout_s=float(data["timeout_s"]),
                strategy=str(data["strategy"]),
            )
            _ = plan.codec_names  # ConfigError for a codec this version does not know
        except (KeyError, TypeError, ValueError, AttributeError, FedflockError) as exc:
            raise StorageError(f"round {round}: the stored round plan is unusable ({exc!r})") from exc
        return plan
