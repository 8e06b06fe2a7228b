"""Central DP as the synchronous round engine runs it (issue #7): the server-side wiring.

:class:`CentralPrivacy` wraps one :class:`~broker_server.privacy.CentralDP` for the lifetime of a
server; :class:`~broker_server.safeguards.Safeguards` calls it at each step of a round:

1. **Before a round** — :meth:`CentralPrivacy.stop_reason` is non-empty once the next round would
   pass the (ε, δ) budget: the engine sends no TASK and the federation ends (``RoundResult``
   with that reason; ``fedflock broker`` exits 0 printing ε spent).
2. **Collection** — :meth:`CentralPrivacy.prepare` gives the round a
   :class:`~broker_server.privacy.DPMean`: every accepted update (all aggregated tensors, BatchNorm
   buffers included) is clipped to ``C`` and summed with weight 1. A round restored from the
   store continues from its checkpoint (already clipped sums, weight 1 each).
3. **Release** — :meth:`CentralPrivacy.release` charges the accountant *before* drawing noise and
   returns ``(Σ clipped + N(0, (zC)²)) / m``; that delta is what ``strategy.apply`` sees, so
   parameters *and* buffers (``plain``, ``w + Δ``) come from the DP release. A closed round is
   released whatever arrived (even nothing: pure noise), because abandoning a round for lack of
   updates would reveal the count. :meth:`CentralPrivacy.state` is stored (``PRIVACY_SETTING``)
   right after the charge and *before* the round's model is committed: a crash in between
   over-counts one round, never under-counts.
4. **Post-processing** — :meth:`CentralPrivacy.postprocess` clamps BatchNorm ``*running_var``
   tensors at :data:`VARIANCE_FLOOR` (noise can push a variance below zero); post-processing
   costs no privacy.

Randomness: ``rng`` is injected; without one a generator is seeded from the OS's entropy
(:mod:`secrets`), never from the server's ``seed`` — noise anyone can regenerate protects nothing.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from broker_server.privacy import CentralDP, CentralDPConfig, DPMean
from broker_server.rounds import RoundState
from edge_agent.errors import StorageError
from edge_agent.protocol.manifest import TensorSpec

__all__ = ["PRIVACY_SETTING", "VARIANCE_FLOOR", "CentralPrivacy", "secure_rng"]

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]

#: the store setting the accountant (and the adaptive clip norm) is kept under
PRIVACY_SETTING = "privacy"
#: BatchNorm running variances are clamped at this after a noisy round (post-processing)
VARIANCE_FLOOR = 1e-6
_VARIANCE_SUFFIX = "running_var"


def secure_rng() -> np.random.Generator:
    """A generator seeded with 128 bits from the OS's CSPRNG (a fresh, unpredictable stream)."""
    return np.random.default_rng(secrets.randbits(128))


class CentralPrivacy:
    """One server's central DP: the mechanism, the accountant, and the round hooks (module docstring)."""

    def __init__(
        self, config: CentralDPConfig, specs: tuple[TensorSpec, ...], *, rng: np.random.Generator | None = None
    ) -> None:
        self.dp = CentralDP(config, rng=rng if rng is not None else secure_rng())
        self.specs = specs
        self._variances = tuple(s.name for s in specs if s.name.endswith(_VARIANCE_SUFFIX))

    @property
    def config(self) -> CentralDPConfig:
        return self.dp.config

    # -- the budget ------------------------------------------------------------------------------

    def stop_reason(self) -> str:
        """Why no further round may run ("" while the budget allows one more)."""
        if not self.dp.budget_exhausted():
            return ""
        spent = self.dp.spent()
        return (
            f"privacy budget spent: ε={spent.epsilon:.4f} of {self.config.epsilon:g} (δ={self.config.delta:g}) "
            f"after {spent.rounds} rounds; one more round would exceed it"
        )

    # -- a round ---------------------------------------------------------------------------------

    def prepare(self, state: RoundState) -> None:
        """Install the round's :class:`DPMean` (a restored round keeps its clipped sums)."""
        restored = state.mean
        mean = DPMean(self.dp, self.specs)
        if restored.count:
            # the stored sums were clipped when folded in (weight 1 each); whether each of those
            # updates was clipped is not stored: count them as clipped, a data-independent choice
            mean.load(restored.sums(), total_weight=float(restored.count), count=restored.count)
            self.dp.restore({**self.dp.snapshot(), "updates": restored.count, "clipped": restored.count})
        else:
            self.dp.discard_round()  # a round abandoned before its release leaves nothing behind
        state.mean = mean

    def release(self, state: RoundState) -> Tensors:
        """The round's noisy mean delta; :class:`BudgetExhausted` (nothing released) past the budget."""
        mean = state.mean
        if not isinstance(mean, DPMean):
            raise TypeError("a central-DP round needs the DPMean that prepare() installs")
        delta = mean.release()
        release = self.dp.last_release
        if release is not None:
            log.info(
                "round %d: central DP released %d updates (%d clipped at C=%.4g, noise σ=%.4g); ε=%.4f of %g",
                state.round,
                release.updates,
                release.clipped,
                release.clip_norm,
                release.noise_stddev,
                release.spent.epsilon,
                self.config.epsilon,
            )
        return delta

    def postprocess(self, weights: Mapping[str, np.ndarray]) -> Tensors:
        """``weights`` with every BatchNorm running variance clamped at :data:`VARIANCE_FLOOR`."""
        out = dict(weights)
        for name in self._variances:
            if name in out:
                out[name] = np.maximum(out[name], np.asarray(VARIANCE_FLOOR, dtype=out[name].dtype))
        return out

    # -- persistence and status ------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """JSON: the accountant's rounds and the clip norm (stored after every charge)."""
        return self.dp.snapshot()

    def load_state(self, data: Mapping[str, Any] | None) -> None:
        """Continue the budget a previous run spent (``None``: nothing stored, a new budget)."""
        if data is None:
            return
        try:
            self.dp.restore(data)
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(f"the stored privacy accountant ({PRIVACY_SETTING!r}) is unusable: {exc}") from exc
        spent = self.dp.spent()
        budget = self.config.epsilon
        log.info("central DP resumed: ε=%.4f of %g spent in %d rounds", spent.epsilon, budget, spent.rounds)

    def view(self) -> dict[str, Any]:
        """The ``privacy`` section of ``/api/status``."""
        spent = self.dp.spent()
        config = self.config
        return {
            "mode": "central",
            "epsilon_spent": spent.epsilon,
            "epsilon_budget": config.epsilon,
            "delta": config.delta,
            "rounds_charged": spent.rounds,
            "rounds_remaining": self.dp.accountant.remaining_rounds(limit=100_000),
            "noise_multiplier": self.dp.noise_multiplier,
            "clip_norm": self.dp.clip_norm,
            "sampling_rate": config.sampling_rate,
            "clients_per_round": config.clients_per_round,
            "population": config.population,
            "adaptive_clipping": config.adaptive is not None,
            "exhausted": self.dp.budget_exhausted(),
        }
