"""What a device's STATUS says about a rollout (pure functions, no I/O).

:func:`install_observations` turns a STATUS ``install`` object (docs/protocol.md §3, §8.5) into
:mod:`broker_server.rollout` observations. Versions are recognised by bundle digest, since a
device numbers its first model 0 while the server announces the same bundle as 1:

* an install of the new version: an :class:`InstallReport` (ok or not) and, when it carries
  ``metrics``, an :class:`EvalReport` of the new version; its ``previous_metrics`` (the replaced
  model measured on the same rows) are an :class:`EvalReport` of the baseline when the replaced
  model is the baseline's bundle;
* a device that left the new version by itself (a rollback after a non-finite training loss:
  ``ok`` with ``previous_digest`` the new bundle) counts as a failed install;
* anything malformed is ignored (a STATUS is untrusted input; it never stops the server).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from broker_server.rollout import EvalReport, InstallReport, Observation, RolloutPlan

__all__ = ["install_observations"]


def install_observations(
    device_id: str, install: Mapping[str, Any], plan: RolloutPlan, *, new_digest: str, baseline_digest: str | None
) -> list[Observation]:
    """Observations for ``plan`` in one device's STATUS ``install`` object."""
    ok, version, digest = install.get("ok"), install.get("version"), install.get("digest")
    previous_digest = install.get("previous_digest")
    out: list[Observation] = []
    if ok is True and digest == new_digest:
        out.append(InstallReport(device_id=device_id, version=plan.version, ok=True))
        if metrics := _metrics(install.get("metrics")):
            out.append(EvalReport(device_id=device_id, version=plan.version, metrics=metrics))
        if previous_digest == baseline_digest and (previous := _metrics(install.get("previous_metrics"))):
            out.append(EvalReport(device_id=device_id, version=plan.baseline_version, metrics=previous))
    elif _left_new_version(ok, version, digest, previous_digest, plan.version, new_digest):
        out.append(InstallReport(device_id=device_id, version=plan.version, ok=False))
    return out


def _left_new_version(
    ok: object, version: object, digest: object, previous_digest: object, new_version: int, new_digest: str
) -> bool:
    """A failed install of the new version, or a device that rolled it back by itself."""
    failed = ok is False and version == new_version and digest in (None, new_digest)
    return failed or (ok is True and previous_digest == new_digest)


def _metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        return {}
    return {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
