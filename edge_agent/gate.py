"""The agent's view of "may I do this now?": sensors + policy + participation history.

:func:`edge_agent.device.eligibility.decide` is the pure decision; this module feeds it (the
latest sensor sample, local time, the device's participation history) and sizes the model's
working set so the memory check and the batch-size adaptation have numbers to work with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from edge_agent.device.eligibility import Decision, decide
from edge_agent.device.load import adapt_batch_size, throttle_sleep
from edge_agent.device.monitor import Monitor
from edge_agent.device.policy import MB, Policy
from edge_agent.device.state import DeviceState, NetworkState
from edge_agent.protocol.manifest import Manifest

#: Activations and their gradients per example, as a multiple of the example's input bytes. A
#: deliberately generous estimate (the digits CNN measures ~40x: 16 and 32 channels over 8x8 from
#: one input channel); a device that runs out of memory is worse than one that trains smaller batches.
ACTIVATION_FACTOR = 64
#: Model, gradients and optimizer state (Adam: two moments) as a multiple of the parameter bytes.
STATE_FACTOR = 4


@dataclass(frozen=True, kw_only=True)
class WorkingSet:
    """Estimated memory of one training step: ``fixed_bytes + batch * bytes_per_example``."""

    fixed_bytes: int
    bytes_per_example: int

    def at(self, batch_size: int) -> int:
        return self.fixed_bytes + batch_size * self.bytes_per_example


def working_set(manifest: Manifest) -> WorkingSet:
    """Estimate a bundle's training working set from its manifest (no session needed)."""
    params = sum(int(np.prod(t.shape)) * 4 for t in manifest.model_tensors)
    example = 4 * int(np.prod([d for d in manifest.input.shape if d is not None]))
    return WorkingSet(fixed_bytes=STATE_FACTOR * params, bytes_per_example=ACTIVATION_FACTOR * max(example, 1))


class StaticMonitor:
    """A monitor without sensors: everything unknown except the network kind it is told."""

    def __init__(self, network: Callable[[], str], wall_clock: Callable[[], float] = time.time) -> None:
        self._network = network
        self._wall_clock = wall_clock

    def sample(self) -> DeviceState:
        return DeviceState(taken_at=self._wall_clock(), network=NetworkState(kind=self._network()))

    def latest(self, max_age_s: float | None = None) -> DeviceState:
        return self.sample()


class Gate:
    """Answers eligibility questions for the agent. ``policy=None`` means "always eligible"
    (in-process agents in tests, the demo and benchmarks, which have no sensors to consult)."""

    def __init__(
        self,
        monitor: Monitor,
        policy: Policy | None,
        *,
        history: Callable[[float], Sequence[float]],
        local_now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.monitor = monitor
        self.policy = policy
        self._history = history
        self._local_now = local_now

    def state(self, max_age_s: float | None = None) -> DeviceState:
        return self.monitor.latest(max_age_s)

    def check(self, phase: str, state: DeviceState, *, working_set_bytes: int = 0) -> Decision:
        if self.policy is None:
            return Decision(phase=phase)
        since = state.taken_at - (self.policy.budget.period_s if self.policy.budget is not None else 0.0)
        history = self._history(since) if self.policy.budget is not None else ()
        return decide(
            state,
            self.policy,
            phase=phase,
            now=self._local_now(),
            history=history,
            working_set_bytes=working_set_bytes,
        )

    def batch_size(self, requested: int, work: WorkingSet, state: DeviceState) -> int | None:
        """The largest batch <= ``requested`` whose working set fits in available memory.

        ``requested`` when memory is unknown or there is no policy; ``None`` when not even a
        batch of 2 fits (the memory check then reports it)."""
        if self.policy is None or state.memory_available_bytes is None:
            return requested
        return adapt_batch_size(
            requested,
            bytes_per_example=work.bytes_per_example,
            fixed_bytes=work.fixed_bytes,
            available_bytes=state.memory_available_bytes,
            headroom_bytes=int(self.policy.min_free_memory_mb * MB),
        )


def throttle(
    policy: Policy | None, *, clock: Callable[[], float], sleep: Callable[[float], None]
) -> Callable[[int, int, float], None] | None:
    """A trainer ``on_step`` callback that sleeps after each step so training uses at most the
    policy's CPU share (``None`` when there is nothing to limit)."""
    share = policy.load.cpu_share if policy is not None else 1.0
    if share >= 1.0:
        return None
    last = [clock()]

    def on_step(steps: int, total: int, loss: float) -> None:
        pause = throttle_sleep(clock() - last[0], share)
        if pause > 0:
            sleep(pause)
        last[0] = clock()

    return on_step
