"""Federated terms of a train step: FedProx, per-tensor trainable masks, personal tensors.

* **FedProx** adds ``μ/2·Σ‖w − w_global‖²`` over the shared trainable parameters to the loss. Its
  gradient ``μ·(w − w_global)`` is added to the data gradient directly (exact, and independent of
  the forward/backward precision); the reported ``loss`` stays the data loss. ``μ``
  (``fedprox_mu``) and the global weights (``global.<name>``) are graph inputs, present only
  when FedProx is enabled at export.
* **Trainable masks** (``mask.<name>``, float32 scalar per trainable parameter): 0 freezes the
  tensor for the step, i.e. its value *and* its optimizer state come out unchanged (a ``Where``,
  so exactly unchanged); any other value trains it.
* **Personal** tensors (names or ``fnmatch`` patterns, e.g. ``head.*``) are trained on the device
  but never uploaded or aggregated: ``aggregate: false, personal: true`` in the manifest. They
  get no FedProx term (there is no global value to stay close to).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent.errors import ExportError

GLOBAL_PREFIX = "global."
MASK_PREFIX = "mask."
MU_NAME = "fedprox_mu"


@dataclass(frozen=True, kw_only=True)
class FederatedSpec:
    #: default μ of the FedProx term; ``None`` leaves FedProx out of the graph
    fedprox_mu: float | None = None
    #: add one ``mask.<name>`` input per trainable parameter
    trainable_masks: bool = False
    #: tensor names or fnmatch patterns of personal tensors
    personal: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.fedprox_mu is not None and not self.fedprox_mu >= 0.0:
            raise ExportError(f"fedprox: mu must be >= 0, got {self.fedprox_mu}")
        if isinstance(self.personal, str):
            raise ExportError("personal must be a tuple of names or patterns, not one string")


def personal_names(patterns: Sequence[str], names: Sequence[str]) -> tuple[str, ...]:
    """Names matched by any pattern, in model order; a pattern matching nothing is an error."""
    matched: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ExportError(f"personal pattern {pattern!r} matches no tensor; the model has: {shown}")
        matched.extend(hits)
    chosen = set(matched)
    if chosen == set(names):
        raise ExportError("every tensor is personal: nothing would be federated")
    return tuple(n for n in names if n in chosen)
