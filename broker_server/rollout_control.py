"""A staged rollout wired to the fleet: directed targets, FETCH gating, STATUS folding, persistence.

:class:`RolloutController` drives one :class:`~broker_server.rollout.RolloutState` on one model
channel for the :class:`~broker_server.models.ModelPublisher` that owns it (docs/protocol.md §8.5):

* **Targets.** Each device learns the version it should run from a *directed* MODEL: the
  release's announcement with ``channel`` = the device id, published **retained** on the device's
  inbox (``{prefix}/devices/{id}/tasks``, which the ACL lets only that device read). A device
  gets one when its target differs from the channel's announced version, when the bundle it
  reports differs from its target's, or when it was directed before; it is re-sent only when the
  target changes (and once per device after a server restart). The channel keeps announcing
  the baseline until the rollout completes; then it announces the new version.
* **FETCH gating.** While a rollout exists, a FETCH for any version but the device's target is
  refused (:meth:`fetch_refusal`), so devices outside the canary never download the new version.
* **Health.** Every STATUS ``install`` report is folded into the state
  (:func:`~broker_server.rollout_reports.install_observations`); :meth:`tick` lets soak time
  count. A rollback decision re-targets the canary to the baseline (a directed downgrade the
  devices accept); a halt stops widening and keeps targets.
* **Persistence.** With a server store, the state, the bundle directory of each version and the
  last decisions are saved (``put_rollout_state(channel, ...)``) after every change and loaded on
  first use (:meth:`load`), so a restarted server continues the rollout.

Single-threaded (the server's loop); :meth:`to_status` returns a copy safe to hand to another thread.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from broker_server.persistence.base import ServerStore
from broker_server.registry import device_class_of
from broker_server.rollout import Decision, Observation, RolloutState
from broker_server.rollout_config import RolloutSettings
from broker_server.rollout_reports import install_observations
from broker_server.rollout_view import rollout_status
from edge_agent.errors import ConfigError, StorageError
from edge_agent.protocol.messages import StatusMessage, encode_message
from edge_agent.protocol.model_messages import ModelMessage
from edge_agent.protocol.topics import Topics
from edge_agent.transport.base import Transport

__all__ = ["RolloutController"]

log = logging.getLogger("fedflock.server.rollout")

_FORMAT = 1
#: seconds between health checks without new reports (soak time counts)
TICK_S = 1.0


class Releases(Protocol):
    """What the controller needs of its publisher."""

    def announcement_of(self, version: int, channel: str, rollout_id: str = "") -> ModelMessage | None: ...

    def digest_of(self, version: int) -> str | None: ...

    def announced(self, channel: str) -> int | None: ...


@dataclass(frozen=True)
class _Device:
    device_class: str
    digest: str
    online: bool


class RolloutController:
    def __init__(
        self,
        settings: RolloutSettings,
        topics: Topics,
        releases: Releases,
        *,
        clock: Callable[[], float],
        store: ServerStore | None = None,
        on_complete: Callable[[Transport, int], None],
    ) -> None:
        self.settings, self.channel, self.topics = settings, settings.channel, topics
        self.state: RolloutState | None = None
        #: recent decisions, oldest first: {"kind", "stage", "reason", "at"}
        self.decisions: deque[dict[str, Any]] = deque(maxlen=50)
        #: version -> bundle directory (re-added by the publisher after a restart)
        self.bundles: dict[int, str] = {}
        self._releases, self._clock, self._store, self._on_complete = releases, clock, store, on_complete
        self._devices: dict[str, _Device] = {}
        self._directed: dict[str, int] = {}  # device -> version of the directed MODEL sent
        self._last_tick = -math.inf
        self._loaded = False

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self) -> bool:
        """Read the saved rollout once (True: one was found); later calls do nothing."""
        if self._loaded:
            return False
        self._loaded = True
        raw = self._store.get_rollout_state(self.channel) if self._store is not None else None
        if not raw or raw.get("state") is None:
            return False
        if raw.get("format") != _FORMAT:
            raise StorageError(f"saved rollout of channel {self.channel!r} has an unknown format")
        try:
            self.state = RolloutState.from_json(raw["state"])
            self.bundles = {int(v): str(path) for v, path in raw["bundles"].items()}
            self.decisions.extend(dict(d) for d in raw.get("decisions", []))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise StorageError(f"saved rollout of channel {self.channel!r} is unreadable: {exc}") from exc
        log.info("resuming rollout %s: %s", self.state.plan.rollout_id, self._describe())
        return True

    def start(
        self, transport: Transport, version: int, baseline: int, bundles: Mapping[int, str], rollout_id: str = ""
    ) -> RolloutState:
        if self.running:
            raise ConfigError(f"a rollout on channel {self.channel!r} is {self._describe()}; resume or roll it back")
        plan = self.settings.plan(rollout_id or f"{self.channel}-v{version}-{uuid.uuid4().hex[:8]}", version, baseline)
        now = self._clock()
        self.state, self.bundles = RolloutState.start(plan, now), dict(bundles)
        self._record(Decision(kind="advance", stage=0, reason=f"started: v{baseline} -> v{version}"), now)
        self._save()
        self._sync_all(transport)
        return self.state

    def retire(self, transport: Transport, version: int) -> None:
        """A plain announcement of ``version`` ends the rollout: directed devices follow it too."""
        rollout_id = self.state.plan.rollout_id if self.state is not None else ""
        self.state = None
        for device_id in list(self._directed):
            self._direct(transport, device_id, version, rollout_id)
        self._save()

    @property
    def running(self) -> bool:
        return self.state is not None and self.state.status in ("active", "halted")

    # -- inputs ----------------------------------------------------------------------------------

    def observe(self, transport: Transport, status: StatusMessage) -> None:
        """A device's STATUS: remember its class and bundle, fold its install report in."""
        known = self._devices.get(status.device_id)
        device_class = device_class_of(status.capabilities) if status.capabilities or known is None else None
        self._devices[status.device_id] = _Device(
            device_class=device_class or (known.device_class if known else device_class_of({})),
            digest=status.bundle_digest,
            online=status.online,
        )
        if self.state is None:
            return
        self._apply(transport, self._observations(status), device_id=status.device_id)

    def tick(self, transport: Transport) -> None:
        """Let soak time count: re-check an active rollout at most every :data:`TICK_S`."""
        now = self._clock()
        if self.state is not None and self.state.status == "active" and now - self._last_tick >= TICK_S:
            self._last_tick = now
            self._apply(transport, [])

    def resume(self, transport: Transport) -> None:
        """Operator: continue a halted rollout."""
        if self.state is None:
            raise ConfigError(f"no rollout on channel {self.channel!r}")
        now = self._clock()
        self.state = self.state.resume(now)
        self._record(Decision(kind="advance", stage=self.state.stage, reason="resumed by the operator"), now)
        self._save()

    def rollback(self, transport: Transport, reason: str) -> None:
        """Operator: send every unpinned device back to the baseline."""
        if self.state is None:
            raise ConfigError(f"no rollout on channel {self.channel!r}")
        self.state = self.state.rollback(reason)
        self._record(Decision(kind="rollback", stage=self.state.stage, reason=reason), self._clock())
        self._save()
        self._sync_all(transport)

    # -- outputs ---------------------------------------------------------------------------------

    def target(self, device_id: str) -> int | None:
        """The version ``device_id`` should run (None: no rollout)."""
        if self.state is None:
            return None
        known = self._devices.get(device_id)
        return self.state.target_version(device_id, known.device_class if known else None)

    def fetch_refusal(self, device_id: str, version: int) -> str | None:
        """Why ``device_id`` may not download ``version`` now (None: it may)."""
        target = self.target(device_id)
        if target is None or target == version:
            return None
        assert self.state is not None
        return (
            f"model version {version} is not {device_id}'s target in rollout {self.state.plan.rollout_id} (v{target})"
        )

    def to_status(self) -> dict[str, Any]:
        """The rollout for the ops view (docs/protocol.md §8.5 lists the keys)."""
        digests = {v: self._releases.digest_of(v) for v in self._versions()}
        devices = [(d.digest, d.online) for d in self._devices.values()]
        return rollout_status(self.channel, self.state, devices, digests, list(self.decisions), self._clock())

    # -- internals -------------------------------------------------------------------------------

    def _observations(self, status: StatusMessage) -> list[Observation]:
        assert self.state is not None
        plan = self.state.plan
        new_digest = self._releases.digest_of(plan.version)
        if not status.install or new_digest is None:
            return []
        baseline_digest = self._releases.digest_of(plan.baseline_version)
        return install_observations(
            status.device_id, status.install, plan, new_digest=new_digest, baseline_digest=baseline_digest
        )

    def _apply(self, transport: Transport, observations: list[Observation], *, device_id: str | None = None) -> None:
        assert self.state is not None
        now = self._clock()
        state, decisions = self.state.step(observations, now)
        changed, self.state = state != self.state, state
        for decision in decisions:
            self._record(decision, now)
        if changed or decisions:
            self._save()
        if decisions:
            if state.status == "complete":
                self._on_complete(transport, state.plan.version)  # first: pins now differ from it
            self._sync_all(transport)
        elif device_id is not None:
            self._sync(transport, device_id)

    def _record(self, decision: Decision, now: float) -> None:
        entry = {"kind": decision.kind, "stage": decision.stage, "reason": decision.reason, "at": now}
        self.decisions.append(entry)
        level = logging.WARNING if decision.kind in ("halt", "rollback") else logging.INFO
        log.log(level, "rollout on %s: %s (stage %d): %s", self.channel, decision.kind, decision.stage, decision.reason)

    def _sync_all(self, transport: Transport) -> None:
        for device_id in sorted(self._devices):
            self._sync(transport, device_id)

    def _sync(self, transport: Transport, device_id: str) -> None:
        target = self.target(device_id)
        if target is None or self._directed.get(device_id) == target:
            return
        differs = target != self._releases.announced(self.channel)
        wrong_bundle = self._devices[device_id].digest != self._releases.digest_of(target)
        if differs or wrong_bundle or device_id in self._directed:
            self._direct(transport, device_id, target)

    def _direct(self, transport: Transport, device_id: str, version: int, rollout_id: str | None = None) -> None:
        if rollout_id is None:
            rollout_id = self.state.plan.rollout_id if self.state is not None else ""
        # signed (with a signer) and stamped: the statement names the device, the version and the rollout
        model = self._releases.announcement_of(version, device_id, rollout_id)
        if model is None:
            log.error("cannot direct %s to v%d: the version is not held", device_id, version)
            return
        transport.publish(self.topics.tasks(device_id), encode_message(model), qos=1, retain=True)
        self._directed[device_id] = version
        log.info("directed %s to model v%d", device_id, version)

    def _save(self) -> None:
        if self._store is None:
            return
        self._store.put_rollout_state(
            self.channel,
            {
                "format": _FORMAT,
                "state": self.state.to_json() if self.state is not None else None,
                "bundles": {str(v): path for v, path in self.bundles.items()},
                "decisions": list(self.decisions),
            },
        )

    def _versions(self) -> set[int]:
        if self.state is None:
            return set()
        plan = self.state.plan
        return {plan.version, plan.baseline_version, *plan.pins.values()}

    def _describe(self) -> str:
        if self.state is None:
            return "none"
        plan = self.state.plan
        return f"v{plan.baseline_version} -> v{plan.version} {self.state.status} at {self.state.percent:g}%"
